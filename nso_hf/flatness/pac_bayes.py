"""The PAC-Bayes quantity of the NSO paper: sum over layers of v_l^T H_ll v_l, v = W - W_init."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nso_hf.flatness.context import LossFn, Measurement, select_measured_parameters
from nso_hf.flatness.hvp import hessian_operator
from nso_hf.noise import clean_parameter_name, local_tensor


@dataclass(frozen=True)
class PacBayesCurvature:
    """v^T H v terms for v = W - W_init.

    per_layer: v_l^T H_ll v_l for each parameter tensor l (H_ll: H's diagonal block for l);
    total: their sum (the paper's quantity); full: v^T H v over all parameters, cross-layer
    terms included; displacement_norm: ||v||.
    """

    total: float
    per_layer: dict[str, float]
    full: float
    displacement_norm: float
    num_parameters: int


def snapshot_parameters(
    model: nn.Module,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the measured parameters, by name: W_init for `pac_bayes_curvature`.

    Take it before training (e.g. right after `get_peft_model`, for the adapters at init).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    named = select_measured_parameters(model, parameters, include, exclude)
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def estimate_pac_bayes_curvature(
    m: Measurement,
    init: Mapping[str, torch.Tensor] | nn.Module,
    *,
    hvp: str = "exact",
    reuse_graph: bool | None = None,
    relative_step: float | None = None,
) -> PacBayesCurvature:
    """sum_l v_l^T H_ll v_l with v = W - W_init, per layer and in total, and the full v^T H v.

    No sampling. Exact product (the default): one product for the full form and one backward per
    parameter tensor per batch for the layer terms, sharing one gradient graph per batch. Finite
    differences: 2 forward+backward passes for the full form and 2 per parameter tensor.

    Args:
        m: the measurement.
        init: W_init, a name -> tensor mapping (`snapshot_parameters`) or a module with the same
            parameter names (e.g. the pretrained model before fine-tuning).
        hvp, reuse_graph, relative_step: as in `nso_hf.flatness.trace.estimate_trace`.

    Returns:
        A `PacBayesCurvature`.

    Raises:
        ValueError: a measured parameter is missing from `init` or has another shape.
    """
    if isinstance(init, nn.Module):
        init = {clean_parameter_name(n): p for n, p in init.named_parameters(remove_duplicate=False)}
    missing = [n for n, p in m.named if n not in init or tuple(init[n].shape) != tuple(p.shape)]
    if missing:
        raise ValueError(
            f"init has no tensor of the right shape for {len(missing)} measured parameter(s), e.g. {missing[:3]}. "
            "Pass the initial model, or snapshot_parameters(model) taken before training with the same selection."
        )
    op = hessian_operator(m, hvp, reuse_graph=reuse_graph, relative_step=relative_step)
    with torch.no_grad():
        v = []
        for n, p in m.named:
            w = local_tensor(p)
            start = m.shard(p, init[n].detach().to(device=w.device, dtype=w.dtype))
            v.append((w - start).to(op.vector_dtype or w.dtype))
    try:
        blocks = op.block_quadratic_forms(v)
        full = m.dot(v, op.matvec(v))
    finally:
        op.release()
    per_layer = {n: b for (n, _), b in zip(m.named, blocks)}
    return PacBayesCurvature(
        total=math.fsum(blocks), per_layer=per_layer, full=full, displacement_norm=m.norm(v),
        num_parameters=m.num_parameters,
    )


def pac_bayes_curvature(
    model: nn.Module,
    batches: Iterable[Any],
    init: Mapping[str, torch.Tensor] | nn.Module,
    *,
    loss_fn: LossFn | None = None,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    reuse_graph: bool | None = None,
    hvp: str = "exact",
    relative_step: float | None = None,
) -> PacBayesCurvature:
    """sum_l v_l^T H_ll v_l with v = W - W_init, per layer and in total, and the full v^T H v.

    Args:
        model, batches, loss_fn, parameters, include, exclude, reuse_graph, relative_step: as in
            `nso_hf.flatness.hessian_trace`.
        init: W_init, a name -> tensor mapping (`snapshot_parameters`) or a module with the same names.
        hvp: "exact" (default: one backward per layer) or "finite_difference" (2 passes per layer).

    Returns:
        A `PacBayesCurvature` (see `estimate_pac_bayes_curvature`); the model is left as found.
    """
    with Measurement(model, batches, loss_fn=loss_fn, parameters=parameters, include=include, exclude=exclude) as m:
        return estimate_pac_bayes_curvature(m, init, hvp=hvp, reuse_graph=reuse_graph, relative_step=relative_step)
