"""`NSOTrainer` and `NSOMixin`: the noise-stability step (and SAM, ASAM, Flat-LoRA) inside `transformers.Trainer`.

Per micro-batch, `training_step` runs the passes of `pass_plan` (2k at W +/- U_j, plus one at W
when lam > 0; for SAM one at W and one at W + e), each one a call of the parent class's own
`training_step`, so each transformers version keeps its own loss scaling, `num_items_in_batch`
handling, mixed precision and DeepSpeed arguments. The pass's weight is applied to the gradient
inside `compute_loss`, so the loss value Trainer logs stays the plain loss. SAM's ascent pass takes
its gradient there with `torch.autograd.grad` and hands Trainer's backward a loss without a graph,
so `.grad` never sees it (under DeepSpeed that pass bypasses the engine altogether: compat.py).
The weights are put back by copy before the optimizer steps. A step outside the perturbation schedule
(`perturb_start`, `perturb_every`: nso_hf/schedule.py) is the parent's `training_step` alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from nso_hf.compat import (
    count_once,
    defer_gradient_sync,
    refresh_zero3_gathered,
    restore_before_engine_step,
    skip_engine_backward,
    snapshot_counters,
    without_engine,
    zero3_params,
)
from nso_hf.config import MERGED_METHODS, NOISE_METHODS, NSOConfig
from nso_hf.engines import check_engine, engine_name
from nso_hf.merged import lora_targets, merged_row_rms
from nso_hf.noise import Perturbation, draw_seed, filter_parameters, is_sharded, local_tensor, select_parameters
from nso_hf.passes import Pass, pass_plan, scale_gradient
from nso_hf.rng import GlobalRNGState
from nso_hf.sam import sam_perturbation
from nso_hf.schedule import is_perturbed_step, ramp_factor

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A perturbed loss was NaN or infinite (the weights have been restored)."""


@dataclass
class _PassState:
    """What `compute_loss` needs to know about the pass `training_step` is running."""

    plan: Pass
    skipped: bool = False  # its loss was non-finite and it contributes no gradient
    ascent: list[torch.Tensor] | None = None  # SAM's ascent pass: the offset e its gradient gave (None: no ascent)


class NSOMixin:
    """Gives any `transformers.Trainer` subclass the NSO step: `class T(NSOMixin, SFTTrainer): ...`.

    Accepts one keyword more than the Trainer it is mixed into: `nso_config` (default `NSOConfig()`).
    """

    def __init__(self, *args: Any, nso_config: NSOConfig | None = None, **kwargs: Any):
        if nso_config is None:
            nso_config = NSOConfig()
        if not isinstance(nso_config, NSOConfig):
            raise TypeError(f"nso_config must be an NSOConfig, got {type(nso_config).__name__}.")
        self.nso_config = nso_config
        self._nso_pass: _PassState | None = None  # set while a pass of training_step runs
        self._nso_params: tuple[int, list[tuple[str, nn.Parameter]], list[nn.Module]] | None = None
        # (id(model), perturbed parameters, their LoRA layers for the merged-space methods)
        self._nso_warned_zero_ascent = False
        self._nso_window = (-1, 0)  # (global step, micro-batches seen in its accumulation window)
        self.nso_passes = 0  # forward+backward passes training_step ran in this process (the run's compute)
        self._nso_log = _NSOLogAccumulator()
        super().__init__(*args, **kwargs)
        check_engine(self, nso_config)
        if nso_config.method in MERGED_METHODS:
            self._nso_parameters(self.model)  # a model without LoRA layers fails here, before training

    # ------------------------------------------------------------------ the step
    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        cfg = self.nso_config
        step = self.state.global_step
        micro_step = self._nso_window[1] if self._nso_window[0] == step else 0
        self._nso_window = (step, micro_step + 1)
        syncs = self.accelerator.sync_gradients  # does this micro-batch end its accumulation window?
        if cfg.method == "none" or not is_perturbed_step(step, self.state.max_steps, cfg.perturb_start, cfg.perturb_every):
            # A plain step (method 'none', or outside the schedule): Trainer's own step and nothing else: no
            # copy of W, no noise, no replay, no extra collective or host sync.
            self.nso_passes += 1
            self._nso_log.add(clean=None, perturbed=None, skipped=0, step_done=syncs)
            return super().training_step(model, inputs, num_items_in_batch)

        plan = pass_plan(cfg)
        named = self._nso_parameters(model)
        seeds = self._nso_seed_table(named, step, micro_step)

        # Snapshot W (the one extra copy) and the global RNG (so every pass draws the same dropout).
        params = [p for _, p in named]
        perturbation = self._nso_perturbation(params, step)
        rng = GlobalRNGState.capture()
        counters = snapshot_counters(self)
        passes: list[tuple[_PassState, torch.Tensor]] = []
        ascent: list[torch.Tensor] | None = None  # SAM's e, found by the pass at W
        try:
            for i, p in enumerate(plan):
                if p.draw is not None:  # W + U_j, or W - U_j (a reflection of W + U_j)
                    perturbation.apply(p.sign, seeds[p.draw])
                elif p.ascended and ascent is not None:  # W + e, from the backup (no accumulated rounding)
                    perturbation.move_to([1.0], [ascent])
                    ascent = None  # e is not needed past the move: freed before the pass at W + e
                rng.restore()
                # Only the last pass of a syncing micro-batch may all-reduce (DDP) or step (DeepSpeed,
                # which then steps at W: the weights are restored inside the engine's step).
                last = i == len(plan) - 1
                if syncs and not last:
                    ctx = defer_gradient_sync(self, model)
                elif syncs:
                    ctx = restore_before_engine_step(self, perturbation.restore)
                else:  # Trainer's loop has already deferred this micro-batch's sync
                    ctx = contextlib.nullcontext()
                # SAM's ascent pass under DeepSpeed: the engine never sees it (compat.py, without_engine).
                skip = skip_engine_backward(self) if p.ascent else contextlib.nullcontext()
                with ctx, skip:
                    self._nso_pass = _PassState(p)
                    loss = super().training_step(model, inputs, num_items_in_batch)
                passes.append((self._nso_pass, loss))
                if p.ascent:  # e leaves the pass state, so that nothing holds it after the move
                    ascent, self._nso_pass.ascent = self._nso_pass.ascent, None
        finally:
            # Weights go back by copy whatever happened: W + U - U != W in low precision. (A no-op
            # when a DeepSpeed engine already restored W and stepped.)
            self._nso_pass = None
            perturbation.restore()
        self.nso_passes += len(passes)
        count_once(self, counters, len(passes))

        # The loss Trainer logs: the mean over the moved points (W + U_j, W - U_j, W + e); at W for 'none'.
        at_w = [loss for s, loss in passes if s.plan.at_w]
        moved = [s for s, _ in passes if not s.plan.at_w]
        perturbed = [loss for s, loss in passes if not s.plan.at_w and not s.skipped]
        if perturbed:
            logged = torch.stack(perturbed).mean()
        else:  # every moved pass was skipped (nan), or nothing moves (method 'none')
            logged = torch.full_like(passes[-1][1], float("nan")) if moved else at_w[0]
        self._nso_log.add(
            clean=at_w[0] if at_w and moved else None,
            perturbed=logged if perturbed else None,
            skipped=sum(s.skipped for s, _ in passes),
            step_done=syncs,
            perturbed_step=True,
        )
        return logged

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        state = self._nso_pass
        if state is not None and state.plan.ascent:
            model = without_engine(self, model)  # DeepSpeed's forward would hook the ascent's autograd.grad
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if state is None:  # evaluation, or a call outside training_step
            return out
        loss = out[0] if return_outputs else out
        if not state.plan.at_w and not torch.isfinite(loss.detach()).all():  # one host sync per pass
            loss = self._nso_nonfinite(model, loss, state)
        if state.plan.ascent:
            # SAM's pass at W: g goes into e, never into .grad; Trainer's backward gets the same value
            # as a leaf without a graph (a no-op backward: nothing accumulated, nothing all-reduced).
            state.ascent = self._nso_ascent(loss)
            loss = loss.detach().requires_grad_()
        loss = scale_gradient(loss, state.plan.weight)
        return (loss, *out[1:]) if return_outputs else loss

    # transformers >= 5.0 calls this once per optimizer step, after clipping, with the norm already
    # reduced across ranks (so every rank takes the same decision). `check_engine` refuses
    # nonfinite_loss='skip' where it is not called before the update (DeepSpeed, older transformers).
    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.nso_config.nonfinite_loss == "skip" and not math.isfinite(float(grad_norm)):
            # No gradient, no update: optimizers skip a parameter whose grad is None altogether (no
            # weight decay, no moment update, no step count), as GradScaler skips an fp16 step.
            model.zero_grad(set_to_none=True)
            self._nso_log.skipped_steps += 1
            logger.warning(
                "NSO step %d: the gradient norm is %s; the optimizer step is skipped (nonfinite_loss='skip').",
                self.state.global_step,
                grad_norm,
            )
        return grad_norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Never write non-finite weights: a run that diverged says so instead of saving NaN adapters.
        # Local check only (no collective: a user may call save_model on one rank).
        for name, param in filter_parameters((self.model_wrapped or self.model).named_parameters()):
            local = local_tensor(param)
            if local.numel() and not torch.isfinite(local).all():
                raise NonFiniteLossError(
                    f"Refusing to save: parameter {name!r} holds non-finite values (sigma={self.nso_config.sigma}). "
                    "Lower sigma or the learning rate."
                )
        super().save_model(output_dir, _internal_call=_internal_call)

    # ------------------------------------------------------------------ helpers
    def _nso_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters the method moves, selected once per model object.

        nso, rwp, sam, asam: the trainable parameters (filtered by name). flat_lora, nso_merged: the
        frozen base weights of the LoRA layers. none: nothing.
        """
        if self._nso_params is None or self._nso_params[0] != id(model):
            cfg = self.nso_config
            layers: list[nn.Module] = []
            if cfg.method == "none":
                selected: list[tuple[str, nn.Parameter]] = []
            elif cfg.method in MERGED_METHODS:
                targets = lora_targets(model, cfg.perturb_include, cfg.perturb_exclude, method=cfg.method)
                selected, layers = [(t.name, t.weight) for t in targets], [t.layer for t in targets]
            else:
                selected = select_parameters(model.named_parameters(), cfg.perturb_include, cfg.perturb_exclude)
            if self._nso_relative and engine_name(self) == "FSDP1":
                raise ValueError(
                    "NSOConfig.noise_scale='relative' needs whole rows, but FSDP1 shards parameters as flat 1-D "
                    "pieces. Use FSDP2 (fsdp_version: 2; its dim-0 shards keep rows whole) or noise_scale='absolute'."
                )
            self._nso_params = (id(model), selected, layers)
        return self._nso_params[1]

    @property
    def _nso_relative(self) -> bool:
        return self.nso_config.method in NOISE_METHODS and self.nso_config.relative_noise

    def _nso_perturbation(self, params: list[nn.Parameter], step: int) -> Perturbation:
        """The micro-batch's `Perturbation`: it snapshots W (one copy) and scales the noise.

        sigma follows the ramp (`noise_ramp`); relative noise of the merged-space methods is scaled by
        the rows of W0 + s BA, recomputed here because A and B change every step (one weight-sized
        float32 temporary per layer at a time).
        """
        cfg = self.nso_config
        sigma = cfg.sigma * ramp_factor(step, self.state.max_steps, cfg.perturb_start, cfg.noise_ramp)
        layers = self._nso_params[2] if self._nso_params is not None else []
        scales = [merged_row_rms(layer) for layer in layers] if layers and self._nso_relative else None
        zero3 = zero3_params(params)
        return Perturbation(
            params,
            sigma,
            relative=self._nso_relative,
            after_move=(lambda: refresh_zero3_gathered(zero3)) if zero3 else None,
            scales=scales,
        )

    def _nso_ascent(self, loss: torch.Tensor) -> list[torch.Tensor] | None:
        """SAM's / ASAM's offset e from the gradient of this micro-batch's loss at W.

        The gradient is this rank's own, with no communication (the pass runs under DDP's no_sync, and
        beside a DeepSpeed engine, which never sees it), and is taken with `torch.autograd.grad`, so
        `.grad` keeps only the accumulated training gradient. Under fp16 the loss is multiplied by
        GradScaler's current scale (so small gradients do not flush to zero in fp16 activations) and g
        divided by it: the optimizer's single `unscale_` still applies to the accumulated gradient
        alone. (DeepSpeed's own fp16 loss scale is not applied here.)
        """
        cfg = self.nso_config
        params = [p for _, p in self._nso_params[1]]
        scaler = getattr(self.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, params, allow_unused=True)
        # A parameter the loss does not reach has no gradient: 0. Divided by S in at least float32.
        grads = [
            torch.zeros_like(p) if g is None else g if scale == 1.0 else g.to(torch.promote_types(g.dtype, torch.float32)) / scale
            for g, p in zip(grads, params)
        ]
        e = sam_perturbation(grads, cfg.rho, weights=params if cfg.method == "asam" else None)
        if e is None and not self._nso_warned_zero_ascent:
            self._nso_warned_zero_ascent = True
            logger.warning(
                "%s step %d: the gradient at W is zero or not finite, so there is no ascent direction; this micro-batch "
                "takes the gradient at W (plain training). Said once per run.",
                cfg.method.upper(),
                self.state.global_step,
            )
        return e

    def _nso_seed_table(self, named: list[tuple[str, nn.Parameter]], step: int, micro_step: int) -> list[list[int]]:
        """seeds[draw][tensor]: replicated tensors share the draw across ranks when asked; shards never do."""
        cfg = self.nso_config
        seed = cfg.noise_seed if cfg.noise_seed is not None else self.args.seed
        rank = self.args.process_index
        fsdp1 = engine_name(self) == "FSDP1"  # flat 1-D shard views carry no mark of their own
        ranks = [rank if (fsdp1 or is_sharded(p) or not cfg.sync_noise_across_ranks) else 0 for _, p in named]
        return [
            [draw_seed(seed, step, micro_step, r, j, t) for t, r in enumerate(ranks)]
            for j in range(cfg.num_perturbations)
        ]

    def _nso_nonfinite(self, model: nn.Module, loss: torch.Tensor, state: _PassState) -> torch.Tensor:
        p, cfg = state.plan, self.nso_config
        point = "W + e" if p.ascended else f"W {'+' if p.sign > 0 else '-'} U (draw {p.draw})"
        strength = f"rho={cfg.rho}" if p.ascended else f"sigma={cfg.sigma}"
        where = (
            f"NSO step {self.state.global_step}: the loss at {point} is {loss.detach().float().item()} with {strength}."
        )
        if self.nso_config.nonfinite_loss == "raise":
            raise NonFiniteLossError(
                f"{where} The weights were restored. Lower {strength.split('=')[0]} (or use noise_scale='relative'), or set "
                "nonfinite_loss='skip' to drop such passes."
            )
        logger.warning("%s This pass contributes no gradient (nonfinite_loss='skip').", where)
        state.skipped = True
        # A zero loss that reaches every trainable parameter without touching the non-finite
        # activations: its gradient is exactly 0, and DDP still sees every parameter's gradient hook fire.
        return sum((q.sum() * 0.0 for q in model.parameters() if q.requires_grad), loss.new_zeros(()))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log, reached on every process: safe to reduce across ranks
            logs.update(self._nso_log.pop(self.accelerator, count_perturbed=self.nso_config.method != "none"))
        super().log(logs, *args, **kwargs)


class _NSOLogAccumulator:
    """Sums per-micro-batch NSO losses between two training logs, on the device, without host syncs.

    Normalised like Trainer's `loss`: the sum over micro-batches divided by the optimizer steps taken.
    `nso/perturbed_steps` counts the optimizer steps of the window that ran the method's passes (the
    others were plain steps of the schedule, NSOConfig.perturb_start / perturb_every).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clean_sum: torch.Tensor | None = None
        self.gap_sum: torch.Tensor | None = None
        self.skipped = 0
        self.skipped_steps = 0
        self.steps = 0
        self.perturbed_steps = 0

    def add(
        self, clean: torch.Tensor | None, perturbed: torch.Tensor | None, skipped: int, step_done: bool, perturbed_step: bool = False
    ) -> None:
        if clean is not None:
            self.clean_sum = clean if self.clean_sum is None else self.clean_sum + clean
            if perturbed is not None:
                gap = perturbed - clean
                self.gap_sum = gap if self.gap_sum is None else self.gap_sum + gap
        self.skipped += skipped
        self.steps += int(step_done)
        self.perturbed_steps += int(step_done and perturbed_step)

    def pop(self, accelerator, count_perturbed: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        steps = max(self.steps, 1)
        for key, value in (("nso/clean_loss", self.clean_sum), ("nso/sharpness", self.gap_sum)):
            if value is not None:
                out[key] = accelerator.reduce(value.detach() / steps, reduction="mean").item()
        if self.skipped:
            out["nso/skipped_passes"] = self.skipped
        if self.skipped_steps:
            out["nso/skipped_steps"] = self.skipped_steps
        if count_perturbed:  # the same on every rank: the schedule is a function of the step alone
            out["nso/perturbed_steps"] = self.perturbed_steps
        self.reset()
        return out


class NSOTrainer(NSOMixin, Trainer):
    """`transformers.Trainer` with the Noise Stability Optimization step. Swap it for `Trainer`.

    Example:
        >>> trainer = NSOTrainer(model=model, args=args, train_dataset=ds, nso_config=NSOConfig(sigma=0.01))
        >>> trainer.train()
    """
