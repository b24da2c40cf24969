"""`Measurement`: a model made ready to be measured once, and handed to every estimator.

Entering a `Measurement` does, once for all the estimators run inside it:
- select the measured parameters (the trainable ones, or `parameters="all"`, then the
  `include` / `exclude` regexes; a DDP wrapper is removed: products are averaged explicitly);
- move the batches to the model's input device;
- put the model in eval mode (dropout off: the Hessian of a deterministic loss; gradient
  checkpointing in HF models only runs in training mode), make the measured parameters require
  grad, and enable gradients (a caller may be under `torch.no_grad()`).
The attention kernel is switched to eager only if an estimator asks for the exact double-backward
product (`use_double_backward`): the finite-difference product and the forward-only estimators run
the model as it is (SDPA, flash attention). On exit every flag is put back and the weights are
restored by copy (all moves go through one `nso_hf.noise.Perturbation`, whose backup is the only
parameter-sized copy of W the measurement holds).

Sharded parameters (FSDP2 `fully_shard`, DTensors) are measured on each rank's shard: vectors are
held as local shards, dot products are summed across ranks, and gradients come from FSDP's own
reduce-scatter. DDP and single-process parameters are whole on every rank, and gradients and
losses are averaged across ranks with one all-reduce. DeepSpeed ZeRO-3 parameters are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from nso_hf.flatness.mode import eager_attention, measurement_state
from nso_hf.noise import Perturbation, filter_parameters, is_sharded, local_tensor

LossFn = Callable[[nn.Module, Any], torch.Tensor]
PARAMETER_SETS = ("trainable", "all")


def select_measured_parameters(
    model: nn.Module,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """The parameters whose Hessian is measured.

    Args:
        model: the model (a DDP wrapper's prefix `module.` is removed from names).
        parameters: "trainable" (requires_grad; with peft: the adapters) or "all" (frozen ones too;
            they are made to require grad only for the measurement).
        include: regexes (re.search on the name); if given, a name must match one.
        exclude: regexes; a name matching one is left out.

    Returns:
        `(name, parameter)` pairs in model order; a tied parameter appears once.

    Raises:
        ValueError: unknown `parameters`, a bad regex, or nothing selected.
    """
    if parameters not in PARAMETER_SETS:
        raise ValueError(f"parameters={parameters!r} is not one of {PARAMETER_SETS}.")
    selected = filter_parameters(model.named_parameters(), include, exclude, trainable_only=parameters == "trainable")
    if not selected:
        raise ValueError(
            f"No parameter to measure (parameters={parameters!r}, include={list(include or [])}, "
            f"exclude={list(exclude or [])}). Check requires_grad, or pass parameters='all' to measure frozen weights."
        )
    return selected


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a dict batch (or a tensor) moved to `device`; anything else is returned as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: `model.device` for HF/peft models, else the first parameter's device."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The scalar loss of one batch: `loss_fn(model, batch)`, or `model(**batch).loss`.

    Raises:
        ValueError: no loss_fn and the batch is not a dict, or the model returned no loss
            (e.g. no `labels` in the batch).
    """
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"A batch of type {type(batch).__name__} needs a loss_fn(model, batch); without one, batches are "
                "dicts and the loss is model(**batch).loss."
            )
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(
                "model(**batch) returned no loss: put labels in the batch, or pass loss_fn(model, batch)."
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"The loss must be a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}.")
    return loss.reshape(())


def distributed_world_size() -> int:
    """Number of processes to average over (1 when torch.distributed is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average `tensors` in place across processes, with one all-reduce of their flat concatenation."""
    world = distributed_world_size()
    if world == 1 or not tensors:
        return
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    # One buffer on the first tensor's device (a model spread over devices has tensors on several).
    flat = torch.cat([t.reshape(-1).to(device=tensors[0].device, dtype=dtype) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None = None) -> float:
    """L(W): the mean batch loss, without gradients, averaged across processes."""
    with torch.no_grad():
        losses = [batch_loss(model, b, loss_fn).detach().double() for b in batches]
    # Kept on the loss's device: an NCCL all-reduce needs a CUDA tensor.
    total = (torch.stack([x.to(losses[0].device) for x in losses]).sum() / len(batches)).reshape(1)
    all_reduce_mean([total])
    return float(total)


def prepare_measurement(
    model: nn.Module,
    batches: Iterable[Any],
    parameters: str,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
) -> tuple[nn.Module, list[tuple[str, nn.Parameter]], list[Any]]:
    """The model to measure (a DDP wrapper removed), its measured parameters, and the batches on its device.

    Kept for callers of the 0.1 API; `Measurement` does this once for every estimator.

    Raises:
        ValueError: as `select_measured_parameters`, or no batch.
    """
    m = Measurement(model, batches, parameters=parameters, include=include, exclude=exclude)
    return m.model, m.named, m.batches


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision vectors and gradient differences are held in: float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 when it is a 16-bit float (int8 probes and wider floats are kept as they are)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class Measurement:
    """A model, its measured parameters and its batches, ready for every estimator; a context manager.

    Use:
        with Measurement(model, batches) as m:
            trace = estimate_trace(m, num_probes=50)
            eig = estimate_top_eigenvalues(m, max_iter=50)

    Args:
        model: the model to measure (a DDP wrapper is removed).
        batches: the batches L is the mean loss of (iterated once, held, on the input device).
        loss_fn: `loss_fn(model, batch) -> scalar loss`; default `model(**batch).loss`.
        parameters: "trainable" or "all"; then filtered by `include` / `exclude` regexes.

    Raises:
        ValueError: as `select_measured_parameters`, no batch, or DeepSpeed ZeRO-3 parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        loss_fn: LossFn | None = None,
        parameters: str = "trainable",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # Its forward would register gradient-reduction hooks; the products are averaged explicitly.
            model = model.module
        self.model = model
        self.named = select_measured_parameters(model, parameters, include, exclude)
        self.params = [p for _, p in self.named]
        if any(hasattr(p, "ds_tensor") for p in self.params):
            raise ValueError(
                "DeepSpeed ZeRO-3 parameters cannot be measured (their gradients are not handed back per call); "
                "measure a consolidated checkpoint, or an FSDP2 / DDP model."
            )
        # FSDP2 computes its gradients only through backward into `.grad` (the sharded parameters are
        # not in the autograd graph of the gathered ones), and reduces them across ranks itself.
        self.sharded = any(is_sharded(p) for p in self.params)
        device = input_device(model)
        self.batches = [move_to_device(b, device) for b in batches]
        if not self.batches:
            raise ValueError("batches is empty: the loss needs at least one batch.")
        self.loss_fn = loss_fn
        self.num_parameters = sum(p.numel() for p in self.params)  # a DTensor counts its global size
        self._stack: ExitStack | None = None
        self._double_backward = False
        self._perturbation: Perturbation | None = None

    # --- entering and leaving ------------------------------------------------------------------------

    def __enter__(self) -> Measurement:
        if self._stack is not None:
            raise RuntimeError("This Measurement is already entered.")
        stack = ExitStack()
        stack.enter_context(measurement_state(self.model, self.params))
        self._stack = stack
        return self

    def __exit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        try:
            if self._perturbation is not None:
                self._perturbation.restore()  # bit-exact W, also after an estimator raised half-way
        finally:
            self._perturbation = None
            self._double_backward = False
            if stack is not None:
                stack.__exit__(*exc_info)

    def _require_entered(self) -> ExitStack:
        if self._stack is None:
            raise RuntimeError("Use the Measurement inside `with Measurement(...) as m:`.")
        return self._stack

    def use_double_backward(self) -> None:
        """Switch attention to eager for the rest of the measurement (once): the exact product needs it.

        Raises:
            ValueError: the parameters are sharded (double backward through FSDP is not supported), or
                the attention kernel cannot be switched (see `eager_attention`).
        """
        stack = self._require_entered()
        if self.sharded:
            raise ValueError(
                'The exact Hessian-vector product (hvp="exact") needs double backward, which sharded (FSDP) '
                'parameters do not support: use hvp="finite_difference".'
            )
        if not self._double_backward:
            stack.enter_context(eager_attention(self.model))
            self._double_backward = True

    @property
    def perturbation(self) -> Perturbation:
        """The one `Perturbation` of the measured parameters (created on first use: one backup of W)."""
        self._require_entered()
        if self._perturbation is None:
            self._perturbation = Perturbation(self.params, sigma=0.0, relative=False)
        return self._perturbation

    def restore(self) -> None:
        """Put W back (by copy) if an estimator moved it; a no-op otherwise."""
        if self._perturbation is not None:
            self._perturbation.restore()

    # --- evaluations ---------------------------------------------------------------------------------

    def loss(self) -> float:
        """L at the weights the parameters hold now (no gradients), averaged across processes."""
        try:
            return mean_loss(self.model, self.batches, self.loss_fn)
        finally:
            self._reshard()

    def _reshard(self) -> None:
        # FSDP2 keeps the root module's parameters gathered after a forward without backward (it expects
        # the backward to need them); the next forward would then reuse that gathered copy and miss a move
        # of the shards. Resharding drops it, so every forward gathers the weights the shards hold now.
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def gradients(self, out: list[torch.Tensor] | None = None, alpha: float = 1.0) -> list[torch.Tensor]:
        """alpha * dL/dW at the weights held now, added into `out` (or into new tensors), shaped like local shards.

        One ordinary forward+backward per batch; the result is in float32 (float64 for float64
        weights) whatever the parameters' dtype, so that a difference of two gradients is not rounded
        again to bf16. `.grad` is left as found: `torch.autograd.grad` returns the gradients without
        accumulating them; for sharded (FSDP2) parameters, whose gradients only reach `.grad`, every
        parameter's `.grad` is set aside before the backward and put back after it.

        Args:
            out: tensors to add into (e.g. the gradient at another point, with `alpha=-1`).
            alpha: the factor of the gradient.

        Returns:
            `out`, or new tensors; averaged across processes (FSDP reduces its own).
        """
        self._require_entered()
        scale = 1.0 / len(self.batches)
        if self.sharded:
            if out is None:
                out = [torch.zeros_like(local_tensor(p), dtype=work_dtype(p.dtype)) for p in self.params]
            self._sharded_gradients(out, alpha * scale)
            return out
        total: list[torch.Tensor] | None = None
        for batch in self.batches:
            loss = batch_loss(self.model, batch, self.loss_fn) * scale
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            if total is None:
                # The first batch's gradients are the accumulator (no copy in float32): the memory of a
                # forward+backward, no more. A parameter the loss does not reach has a zero gradient.
                total = [
                    torch.zeros_like(p, dtype=work_dtype(p.dtype)) if g is None else g.detach().to(work_dtype(p.dtype))
                    for g, p in zip(grads, self.params)
                ]
                continue
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g.detach())
        all_reduce_mean(total)
        if out is None:
            if alpha != 1.0:
                for t in total:
                    t.mul_(alpha)
            return total
        for acc, t in zip(out, total):
            acc.add_(t, alpha=alpha)
        return out

    def _sharded_gradients(self, out: list[torch.Tensor], alpha: float) -> None:
        every = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in every]
        try:
            for p in every:
                p.grad = None
            for batch in self.batches:
                (batch_loss(self.model, batch, self.loss_fn) * alpha).backward()
            for acc, p in zip(out, self.params):
                if p.grad is not None:
                    acc.add_(local_tensor(p.grad))
        finally:
            for p, g in zip(every, saved):
                p.grad = g
            self._reshard()

    # --- vectors over the measured parameters --------------------------------------------------------

    def dot(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
        """a . b in float64 (a sum over millions of terms loses digits in float32), summed over shards."""
        local = torch.zeros((), dtype=torch.float64, device=a[0].device if a else None)
        for x, y in zip(a, b):
            # Products in float32 or wider (one temporary the size of one tensor), summed in float64.
            local += torch.sum(_at_least_float32(x) * _at_least_float32(y), dtype=torch.float64).to(local.device)
        if self.sharded and distributed_world_size() > 1:
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.SUM)
        return float(local)

    def norm(self, a: Sequence[torch.Tensor]) -> float:
        """||a|| over all parameters (all shards)."""
        return math.sqrt(max(self.dot(a, a), 0.0))

    def weights(self) -> list[torch.Tensor]:
        """The measured weights as this rank holds them (local shards when sharded), without a copy."""
        return [local_tensor(p) for p in self.params]

    def shard(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `full`, a tensor of `param`'s global shape: `full` itself unless sharded.

        Every rank draws the same full tensor from the same seed, so a vector is the same whether the
        model is sharded or not (a sharded trace uses the probes of the single-process one); the full
        tensor is a temporary the size of one parameter.
        """
        placements = getattr(param, "placements", None)
        if placements is None:
            return full
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, param.device_mesh, placements, src_data_rank=None).to_local()

    def full(self, param: torch.Tensor) -> torch.Tensor:
        """`param` as a whole tensor (gathered across ranks when sharded)."""
        data = param.detach()
        return data.full_tensor() if hasattr(data, "full_tensor") else data

    def random_vector(
        self, generators: dict[torch.device, torch.Generator], seed: int, kind: str, dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """A random vector over the measured parameters, one tensor per parameter (local shards).

        Args:
            generators: one generator per device, seeded with `seed` on first use and advanced by
                every draw: the vectors do not depend on the global RNG and are the same on every process.
            seed: the seed of a new generator.
            kind: "rademacher" (+-1) or "normal" (N(0, 1)).
            dtype: the vectors' dtype (default: each parameter's own).

        Raises:
            ValueError: an unknown `kind`.
        """
        if kind not in ("rademacher", "normal"):
            raise ValueError(f"kind={kind!r} is not one of ('rademacher', 'normal').")
        out = []
        for p in self.params:
            device = local_tensor(p).device
            gen = generators.get(device)
            if gen is None:
                gen = generators[device] = torch.Generator(device=device).manual_seed(seed)
            t = torch.empty(p.shape, dtype=dtype or p.dtype, device=device)
            if kind == "rademacher":
                t.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
            else:
                t.normal_(generator=gen)
            out.append(self.shard(p, t))
        return out
