"""Hessian-vector products of the measured loss: exact (double backward) or by finite differences.

H is the Hessian of L(W) = mean over the batches of the batch loss, with respect to the measured
parameters W (a list of tensors). Two operators give v -> H v, with the same interface (`matvec`,
`block_quadratic_forms`, `release`, `num_products`), picked by name with `hessian_operator`:

- "finite_difference" (`FiniteDifferenceHessian`, what the trace's and the eigenvalues' default
  "auto" picks for float32 / float64 weights):
  Hv ~ (g(W + eps v) - g(W - eps v)) / (2 eps), g = dL/dW. Two ordinary forward+backward passes
  per product, no double backward: it runs with SDPA / flash attention, on FSDP2-sharded
  parameters, in the model's own precision, and holds no graph between passes. The two points are
  set by the measurement's one `Perturbation` (`move_to`) and W is restored by copy. The step eps
  and the error it leaves are in `finite_difference_step`.
- "exact" (`HessianOperator`): two reverse passes through the same graph, g = dL/dW with
  `create_graph=True`, then d(g . v)/dW. Exact to rounding, but double backward needs eager
  attention (switched for the measurement) and whole parameters (DDP, single process). "auto"
  picks it for 16-bit weights, where finite differences of bf16 gradients are not accurate.

Everything goes through `torch.autograd.grad`, which returns gradients instead of accumulating them:
the `.grad` of every parameter (a Trainer's accumulated gradients) is not changed. (Under FSDP2,
whose gradients reach only `.grad`, the finite-difference product sets `.grad` aside and puts it back.)

Cost of one exact product: one forward, one backward that records its own graph, and one backward
through that graph, per batch (about 3.5 forward+backward passes measured; see `docs/flatness.md`).
With a single batch the first two are done once and the graph is kept (`reuse_graph`), so later
products cost the last backward only, for the memory of one retained double-backward graph.

Under torch.distributed each process uses its own batches and the product is averaged across
processes (one all-reduce of a parameter-sized buffer per gradient or product; FSDP2 reduces its own
gradients): the estimate is that of the Hessian of the loss over all processes' batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from nso_hf.flatness.context import LossFn, Measurement, all_reduce_mean, batch_loss, work_dtype

HVP_METHODS = ("auto", "finite_difference", "exact")


def finite_difference_step(
    weight_norm: float, vector_norm: float, dtype: torch.dtype, relative_step: float | None = None
) -> float:
    """The step eps of the central difference Hv ~ (g(W + eps v) - g(W - eps v)) / (2 eps).

    eps = s * max(||W||, 1) / ||v||: the two points are W +- a displacement of norm s * ||W||
    (of norm s for weights of norm below 1, e.g. LoRA adapters near initialisation), whatever the
    scale of v. s = sqrt(u), u the machine epsilon of the weights' dtype (float32: s = 3.5e-4,
    float64: 1.5e-8), the usual step for a difference of gradients. The central difference's
    textbook optimum u^(1/3) (float32: 4.9e-3) balances the two errors below when the third
    derivative and the gradient have the same scale; near a minimum the gradient is small and the
    truncation error dominates there (tests/test_flatness.py: above 1e-3 on an MLP, where sqrt(u)
    stays below), while far from one (a randomly initialised Llama) rounding dominates and u^(1/3)
    is the more accurate (docs/flatness.md, Benchmark). sqrt(u) kept every measured case below 1e-3.
    Two errors remain, relative to ||Hv||:
    - truncation, (eps ||v||)^2 / 6 times the third derivative of L along v over ||Hv||: of order
      s^2 = u for a loss whose curvature changes on the scale of ||W||;
    - rounding of the two gradients (each computed in the weights' dtype, their difference formed
      in float32), about u |g| / (eps ||Hv||): of order sqrt(u) times |g| ||v|| / (||W|| ||Hv||),
      small near a minimum where g is small.
    Tested in float32 against the exact product (tests/test_flatness.py): a relative error below
    1e-3 per product on an MLP near a minimum and on a tiny Llama (SDPA attention). In bfloat16
    (u = 2^-8) it is not accurate: the gradients themselves carry bf16 rounding, whatever the
    precision of their difference (`scripts/benchmark_flatness.py --operation accuracy` prints the
    errors); `hvp="auto"` therefore takes the exact product for 16-bit weights.

    Args:
        weight_norm: ||W|| over the measured parameters.
        vector_norm: ||v||.
        dtype: the weights' dtype (its machine epsilon sets s).
        relative_step: s, to override sqrt(u).

    Returns:
        eps (0 when v = 0).

    Raises:
        ValueError: a non-positive `relative_step`.
    """
    if relative_step is not None and not relative_step > 0:
        raise ValueError(f"relative_step must be > 0 (or None for sqrt(machine epsilon)), got {relative_step}.")
    if vector_norm == 0:
        return 0.0
    s = relative_step if relative_step is not None else math.sqrt(torch.finfo(dtype).eps)
    return s * max(weight_norm, 1.0) / vector_norm


def resolve_hvp(measurement: Measurement, hvp: str) -> str:
    """The product `hvp` names on this measurement: "auto" is finite differences, except on 16-bit
    weights that are not sharded, where it is the exact product (finite differences of bf16 gradients
    are not accurate; see `finite_difference_step`).

    Raises:
        ValueError: an unknown `hvp`.
    """
    if hvp not in HVP_METHODS:
        raise ValueError(
            f'hvp={hvp!r} is not one of {HVP_METHODS} ("finite_difference" needs no double backward, "exact" needs '
            'eager attention and whole parameters, "auto" picks finite differences unless the weights are 16-bit).'
        )
    if hvp != "auto":
        return hvp
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in measurement.params)
    return "exact" if half and not measurement.sharded else "finite_difference"


class FiniteDifferenceHessian:
    """v -> H v by central differences of two gradients, on a `Measurement`'s parameters.

    Each product: W + eps v (the measurement's `Perturbation.move_to`), one gradient; W - eps v, one
    gradient subtracted into the first (float32); W restored by copy. Memory beyond a forward+backward:
    the backup of W (shared by every estimator of the measurement), one float32 gradient buffer, and
    the caller's v. No autograd graph outlives a pass.

    Args:
        measurement: an entered `Measurement`.
        relative_step: s of `finite_difference_step` (default sqrt(u) of the weights' dtype).
    """

    def __init__(self, measurement: Measurement, relative_step: float | None = None) -> None:
        self.m = measurement
        self.relative_step = relative_step
        # The step is fixed by ||W|| once: a product's error does not drift with v's norm.
        self.weight_norm = measurement.norm(measurement.weights())
        # The least precise dtype among the weights sets the step (mixed precision: the coarsest rounding).
        self.dtype = max((p.dtype for p in measurement.params), key=lambda d: torch.finfo(d).eps)
        self.vector_dtype = work_dtype(self.dtype)
        # Rademacher probes (+-1) are exact in int8: a quarter of a float32 vector's memory, which
        # matters because a probe is held through both passes (move_to widens one tensor at a time).
        self.probe_dtype = torch.int8
        self.num_products = 0

    def step(self, vectors: Sequence[torch.Tensor]) -> float:
        """eps for `vectors` (see `finite_difference_step`)."""
        return finite_difference_step(self.weight_norm, self.m.norm(vectors), self.dtype, self.relative_step)

    def matvec(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v for v given as one tensor per parameter (local shards); averaged across processes."""
        eps = self.step(vectors)
        self.num_products += 1
        if eps == 0.0:
            return [torch.zeros_like(v, dtype=self.vector_dtype) for v in vectors]
        pert = self.m.perturbation
        try:
            pert.move_to([eps], [vectors])
            hv = self.m.gradients()
            pert.move_to([-eps], [vectors])
            self.m.gradients(out=hv, alpha=-1.0)
        finally:
            pert.restore()
        for h in hv:
            h.div_(2 * eps)
        return hv

    def block_quadratic_forms(self, vectors: Sequence[torch.Tensor]) -> list[float]:
        """v_l^T H_ll v_l for each parameter l: one product per parameter (v zero outside l).

        Costs 2 forward+backward passes per parameter tensor (the exact operator: one backward each).
        """
        zeros = [torch.zeros_like(v) for v in vectors]
        totals = []
        for i, v in enumerate(vectors):
            hv = self.matvec([v if j == i else z for j, z in enumerate(zeros)])
            totals.append(self.m.dot([v], [hv[i]]))
        return totals

    def release(self) -> None:
        """Nothing is retained between products."""


def hessian_operator(
    measurement: Measurement, hvp: str = "auto", *, reuse_graph: bool | None = None,
    relative_step: float | None = None,
) -> FiniteDifferenceHessian | HessianOperator:
    """The Hessian-vector product `hvp` names, on an entered `Measurement`.

    Args:
        measurement: the measurement.
        hvp: "auto" (see `resolve_hvp`), "finite_difference", or "exact" (switches attention to eager
            for the rest of the measurement).
        reuse_graph: exact only, see `HessianOperator`.
        relative_step: finite differences only, see `finite_difference_step`.

    Raises:
        ValueError: an unknown `hvp`, or "exact" on sharded parameters.
    """
    if resolve_hvp(measurement, hvp) == "finite_difference":
        return FiniteDifferenceHessian(measurement, relative_step)
    measurement.use_double_backward()
    return HessianOperator(measurement.model, measurement.params, measurement.batches, measurement.loss_fn, reuse_graph)


class HessianOperator:
    """v -> H v, with H the Hessian of the mean batch loss with respect to `params`.

    The model must already be in the state to measure (`Measurement.use_double_backward`, or
    `nso_hf.flatness.mode.measurement_mode`): eval mode, an attention kernel with double backward,
    `params` requiring grad.

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
        self.vector_dtype: torch.dtype | None = None  # vectors in the parameters' dtype (the graph's)
        self.probe_dtype: torch.dtype | None = None

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
