"""Hessian-vector products of a model's loss on a fixed set of batches.

H is the Hessian of L(W) = mean over the batches of the batch loss, with respect to the measured
parameters W (a list of tensors). A product H v is two reverse passes through the same graph:
g = dL/dW with `create_graph=True`, then d(g . v)/dW. Everything goes through
`torch.autograd.grad`, which returns gradients instead of accumulating them: the `.grad` of every
parameter (a Trainer's accumulated gradients, say) is never read or written.

Cost of one product: one forward, one backward that records its own graph, and one backward through
that graph, per batch (about 2-3 backward passes; see `docs/flatness.md` for the measured figure).
With a single batch the first two are done once and the graph is kept (`reuse_graph`), so later
products cost the last backward only, for the memory of one retained double-backward graph.

Under torch.distributed (more than one process) each process uses its own batches and the product
is averaged across processes with one all-reduce of a parameter-sized buffer: the estimate is that
of the Hessian of the loss over all processes' batches (equal weight per process). Parameters must
be whole on every process (DDP); sharded parameters (FSDP, ZeRO-3) are not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nso_hf.noise import filter_parameters

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


def prepare_measurement(
    model: nn.Module,
    batches: Iterable[Any],
    parameters: str,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
) -> tuple[nn.Module, list[tuple[str, nn.Parameter]], list[Any]]:
    """The model to measure (a DDP wrapper removed), its measured parameters, and the batches on its device.

    Raises:
        ValueError: as `select_measured_parameters`, or no batch.
    """
    # A DDP wrapper's forward would register gradient-reduction hooks; measure the module inside
    # (the products are averaged across processes explicitly).
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    named = select_measured_parameters(model, parameters, include, exclude)
    device = input_device(model)
    batch_list = [move_to_device(b, device) for b in batches]
    if not batch_list:
        raise ValueError("batches is empty: the loss needs at least one batch.")
    return model, named, batch_list


class HessianOperator:
    """v -> H v, with H the Hessian of the mean batch loss with respect to `params`.

    The model must already be in the state to measure (see `nso_hf.measurement.measurement_mode`):
    eval mode, an attention kernel with double backward, `params` requiring grad.

    Args:
        model: the model; the loss is `batch_loss(model, batch, loss_fn)`.
        params: the measured parameters.
        batches: a fixed, re-iterable set of batches (already on the input device).
        loss_fn: optional `loss_fn(model, batch) -> scalar`.
        reuse_graph: keep the gradient graph between products (default: True with one batch).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        batches: Sequence[Any],
        loss_fn: LossFn | None = None,
        reuse_graph: bool | None = None,
    ) -> None:
        if len(batches) == 0:
            raise ValueError("batches is empty: the loss needs at least one batch.")
        self.model, self.params, self.batches, self.loss_fn = model, list(params), list(batches), loss_fn
        self.reuse_graph = len(self.batches) == 1 if reuse_graph is None else reuse_graph
        self._cached: list[list[torch.Tensor]] | None = None
        self.num_products = 0

    def _gradients(self, batch: Any) -> list[torch.Tensor]:
        loss = batch_loss(self.model, batch, self.loss_fn) / len(self.batches)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # A parameter the loss does not reach has a zero gradient and a zero Hessian row.
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]

    def _graphs(self) -> Iterable[list[torch.Tensor]]:
        if self.reuse_graph:
            if self._cached is None:
                self._cached = [self._gradients(b) for b in self.batches]
            yield from self._cached
        else:
            for b in self.batches:
                yield self._gradients(b)

    def _grad_of(
        self, grads: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        pairs = [(g, v) for g, v in zip(grads, vectors) if g.requires_grad]
        if not pairs:  # the loss is linear in every measured parameter: H = 0
            return [torch.zeros_like(p) for p in wrt]
        out = torch.autograd.grad(
            [g for g, _ in pairs], list(wrt), grad_outputs=[v for _, v in pairs],
            retain_graph=self.reuse_graph, allow_unused=True,
        )
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(out, wrt)]

    def matvec(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v for v given as one tensor per parameter; averaged across processes when distributed."""
        result = [torch.zeros_like(p) for p in self.params]
        for grads in self._graphs():
            for acc, h in zip(result, self._grad_of(grads, vectors, self.params)):
                acc.add_(h)
        all_reduce_mean(result)
        self.num_products += 1
        return result

    def block_quadratic_forms(self, vectors: Sequence[torch.Tensor]) -> list[float]:
        """v_l^T H_ll v_l for each parameter l, H_ll the diagonal block of H for that parameter.

        One gradient graph per batch serves every block: each block then costs one backward of
        d(g_l . v_l)/dW_l. Cross-parameter terms v_l^T H_lm v_m (l != m) are not included.
        """
        totals = torch.zeros(len(self.params), dtype=torch.float64, device=self.params[0].device)
        for grads in self._graphs():
            for i, (g, v, p) in enumerate(zip(grads, vectors, self.params)):
                if not g.requires_grad:
                    continue
                (h,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True, allow_unused=True)
                if h is not None:
                    totals[i] += (h.double() * v.double()).sum().to(totals.device)
        all_reduce_mean([totals])
        return totals.tolist()

    def release(self) -> None:
        """Free the retained graph (it holds activations of every batch)."""
        self._cached = None


def mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None = None) -> float:
    """L(W): the mean batch loss, without gradients, averaged across processes."""
    with torch.no_grad():
        losses = [batch_loss(model, b, loss_fn).detach().double() for b in batches]
    # Kept on the loss's device: an NCCL all-reduce needs a CUDA tensor.
    total = (torch.stack([x.to(losses[0].device) for x in losses]).sum() / len(batches)).reshape(1)
    all_reduce_mean([total])
    return float(total)
