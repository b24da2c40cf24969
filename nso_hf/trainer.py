"""`NSOTrainer` and `NSOMixin`: the noise-stability step inside `transformers.Trainer`.

Per micro-batch, `training_step` runs the passes of `pass_plan` (2k at W +/- U_j, plus one at W
when lam > 0), each one a call of the parent class's own `training_step`, so each transformers
version keeps its own loss scaling, `num_items_in_batch` handling, mixed precision and DeepSpeed
arguments. The pass's weight is applied to the gradient inside `compute_loss`, so the loss value
Trainer logs stays the plain loss. The weights are put back by copy before the optimizer steps.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from nso_hf.config import NSOConfig
from nso_hf.noise import Perturbation, draw_seed, is_sharded, select_parameters
from nso_hf.passes import Pass, pass_plan, scale_gradient
from nso_hf.rng import GlobalRNGState

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A perturbed loss was NaN or infinite (the weights have been restored)."""


class NSOMixin:
    """Gives any `transformers.Trainer` subclass the NSO step: `class T(NSOMixin, SFTTrainer): ...`.

    Accepts one keyword more than the Trainer it is mixed into: `nso_config` (default `NSOConfig()`).
    """

    # Counters that a parent's `compute_loss` advances once per call (trl's SFTTrainer counts
    # tokens there). The step calls it once per pass, so they are put back to one count per micro-batch.
    nso_counted_per_micro_batch: tuple[str, ...] = ("_total_train_tokens",)

    def __init__(self, *args: Any, nso_config: NSOConfig | None = None, **kwargs: Any):
        if nso_config is None:
            nso_config = NSOConfig()
        if not isinstance(nso_config, NSOConfig):
            raise TypeError(f"nso_config must be an NSOConfig, got {type(nso_config).__name__}.")
        self.nso_config = nso_config
        self._nso_pass: Pass | None = None  # set while a pass of training_step runs
        self._nso_params: tuple[int, list[tuple[str, nn.Parameter]]] | None = None  # (id(model), selection)
        self._nso_window = (-1, 0)  # (global step, micro-batches seen in its accumulation window)
        self._nso_skipped_now = False
        self._nso_log = _NSOLogAccumulator()
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ the step
    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        cfg = self.nso_config
        plan = pass_plan(cfg)
        named = self._nso_parameters(model)
        step = self.state.global_step
        micro_step = self._nso_window[1] if self._nso_window[0] == step else 0
        seeds = self._nso_seed_table(named, step, micro_step)
        syncs = self.accelerator.sync_gradients  # does this micro-batch end its accumulation window?

        # Snapshot W (the one extra copy) and the global RNG (so every pass draws the same dropout).
        perturbation = Perturbation([p for _, p in named], cfg.sigma, relative=cfg.noise_scale == "relative")
        rng = GlobalRNGState.capture()
        counters = {a: getattr(self, a) for a in self.nso_counted_per_micro_batch if hasattr(self, a)}
        losses: list[tuple[Pass, torch.Tensor, bool]] = []
        try:
            for i, p in enumerate(plan):
                if not p.clean:
                    perturbation.apply(p.sign, seeds[p.draw])
                rng.restore()
                # Only the last pass of a syncing micro-batch may all-reduce (DDP) or step (DeepSpeed).
                last = i == len(plan) - 1
                with contextlib.nullcontext() if last or not syncs else self._nso_defer_sync(model):
                    self._nso_pass, self._nso_skipped_now = p, False
                    loss = super().training_step(model, inputs, num_items_in_batch)
                losses.append((p, loss, self._nso_skipped_now))
        finally:
            # Weights go back by copy whatever happened: W + U - U != W in low precision.
            self._nso_pass = None
            perturbation.restore()
        self._nso_window = (step, micro_step + 1)
        self._nso_count_once(counters, len(losses))

        perturbed = [loss for p, loss, skipped in losses if not p.clean and not skipped]
        mean_perturbed = torch.stack(perturbed).mean() if perturbed else torch.full_like(losses[-1][1], float("nan"))
        clean = [loss for p, loss, _ in losses if p.clean]
        self._nso_log.add(
            clean=clean[0] if clean else None,
            perturbed=mean_perturbed if perturbed else None,
            skipped=sum(skipped for _, _, skipped in losses),
            step_done=syncs,
        )
        return mean_perturbed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        p = self._nso_pass
        if p is None:  # evaluation, or a call outside training_step
            return out
        loss = out[0] if return_outputs else out
        if not p.clean and not torch.isfinite(loss.detach()).all():  # one host sync per pass
            loss = self._nso_nonfinite(model, loss, p)
        loss = scale_gradient(loss, p.weight)
        return (loss, *out[1:]) if return_outputs else loss

    # ------------------------------------------------------------------ helpers
    def _nso_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The perturbed parameters, selected once per model object."""
        if self._nso_params is None or self._nso_params[0] != id(model):
            selected = select_parameters(
                model.named_parameters(), self.nso_config.perturb_include, self.nso_config.perturb_exclude
            )
            if self.nso_config.noise_scale == "relative" and any(self._nso_sharded(p) for _, p in selected):
                raise ValueError(
                    "NSOConfig.noise_scale='relative' needs whole rows, but the parameters are sharded "
                    "(FSDP/ZeRO-3). Use noise_scale='absolute'."
                )
            self._nso_params = (id(model), selected)
        return self._nso_params[1]

    def _nso_count_once(self, before: dict[str, Any], passes: int) -> None:
        for attr, start in before.items():
            once = start + (getattr(self, attr) - start) // passes
            setattr(self, attr, once)
            metrics = getattr(self, "_metrics", {}).get("train", {})
            if attr == "_total_train_tokens" and "num_tokens" in metrics:  # trl mirrors the counter there
                metrics["num_tokens"] = [once]

    def _nso_sharded(self, param: nn.Parameter) -> bool:
        # FSDP1 (use_orig_params) exposes flat 1-D shard views that carry no mark of their own.
        return getattr(self, "is_fsdp_enabled", False) or is_sharded(param)

    def _nso_seed_table(self, named: list[tuple[str, nn.Parameter]], step: int, micro_step: int) -> list[list[int]]:
        """seeds[draw][tensor]: replicated tensors share the draw across ranks when asked; shards never do."""
        cfg = self.nso_config
        seed = cfg.noise_seed if cfg.noise_seed is not None else self.args.seed
        rank = self.args.process_index
        ranks = [rank if (self._nso_sharded(p) or not cfg.sync_noise_across_ranks) else 0 for _, p in named]
        return [
            [draw_seed(seed, step, micro_step, r, j, t) for t, r in enumerate(ranks)]
            for j in range(cfg.num_perturbations)
        ]

    @contextlib.contextmanager
    def _nso_defer_sync(self, model: nn.Module):
        """No gradient sync and no DeepSpeed boundary for this pass: forward AND backward in `no_sync`.

        Entered only inside a syncing micro-batch (elsewhere Trainer's loop has already deferred).
        """
        state = self.accelerator.gradient_state
        state._set_sync_gradients(False)  # with DeepSpeed, backward steps the engine when this is True
        try:
            with self._nso_no_sync(model):
                yield
        finally:
            state._set_sync_gradients(True)

    def _nso_no_sync(self, model: nn.Module):
        # A model sharded at load time by transformers (FSDP2) is not wrapped by Accelerate, whose
        # `no_sync` would not reach it: Trainer's own loop makes the same distinction.
        if getattr(self, "is_distributed_loading_by_transformers", False):
            from transformers.distributed.fsdp import is_fsdp_managed_module

            if is_fsdp_managed_module(self.model):
                return self._defer_fsdp_gradient_reduction()
        return self.accelerator.no_sync(model)

    def _nso_nonfinite(self, model: nn.Module, loss: torch.Tensor, p: Pass) -> torch.Tensor:
        where = (
            f"NSO step {self.state.global_step}: the loss at W {'+' if p.sign > 0 else '-'} U (draw {p.draw}) is "
            f"{loss.detach().float().item()} with sigma={self.nso_config.sigma}."
        )
        if self.nso_config.nonfinite_loss == "raise":
            raise NonFiniteLossError(
                f"{where} The weights were restored. Lower sigma (or use noise_scale='relative'), or set "
                "nonfinite_loss='skip' to drop such passes."
            )
        logger.warning("%s This pass contributes no gradient (nonfinite_loss='skip').", where)
        self._nso_skipped_now = True
        # A zero loss that reaches every trainable parameter without touching the non-finite
        # activations: its gradient is exactly 0, and DDP still sees every parameter's gradient hook fire.
        return sum((q.sum() * 0.0 for q in model.parameters() if q.requires_grad), loss.new_zeros(()))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log, reached on every process: safe to reduce across ranks
            logs.update(self._nso_log.pop(self.accelerator))
        super().log(logs, *args, **kwargs)


class _NSOLogAccumulator:
    """Sums per-micro-batch NSO losses between two training logs, on the device, without host syncs.

    Normalised like Trainer's `loss`: the sum over micro-batches divided by the optimizer steps taken.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clean_sum: torch.Tensor | None = None
        self.gap_sum: torch.Tensor | None = None
        self.skipped = 0
        self.steps = 0

    def add(self, clean: torch.Tensor | None, perturbed: torch.Tensor | None, skipped: int, step_done: bool) -> None:
        if clean is not None:
            self.clean_sum = clean if self.clean_sum is None else self.clean_sum + clean
            if perturbed is not None:
                gap = perturbed - clean
                self.gap_sum = gap if self.gap_sum is None else self.gap_sum + gap
        self.skipped += skipped
        self.steps += int(step_done)

    def pop(self, accelerator) -> dict[str, float]:
        out: dict[str, float] = {}
        steps = max(self.steps, 1)
        for key, value in (("nso/clean_loss", self.clean_sum), ("nso/sharpness", self.gap_sum)):
            if value is not None:
                out[key] = accelerator.reduce(value.detach() / steps, reduction="mean").item()
        if self.skipped:
            out["nso/skipped_passes"] = self.skipped
        self.reset()
        return out


class NSOTrainer(NSOMixin, Trainer):
    """`transformers.Trainer` with the Noise Stability Optimization step. Swap it for `Trainer`.

    Example:
        >>> trainer = NSOTrainer(model=model, args=args, train_dataset=ds, nso_config=NSOConfig(sigma=0.01))
        >>> trainer.train()
    """
