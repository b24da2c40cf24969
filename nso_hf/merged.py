"""Merged-space noise for LoRA (Flat-LoRA's idea): noise on W0 + s BA, written into the frozen W0.

A LoRA layer computes x (W0 + s B A)^T, so adding U to its frozen base weight W0 perturbs the merged
weight M = W0 + s B A by exactly U: the noise lives in the full weight space while only A and B train
(they get their gradients at the perturbed point). Relative noise scales each output row of U by that
row's RMS in M (Flat-LoRA: std rho * ||M_row|| / sqrt(n), i.e. rho times the row RMS), not in W0.

The base weights have requires_grad False, so they are not among the trainer's perturbed parameters:
`lora_targets` finds them. The noise is applied and removed by `Perturbation` (restore by copy, exact
in every dtype), at the cost of one copy of the adapted layers' base weights (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nso_hf.noise import clean_parameter_name, filter_parameters, row_rms


@dataclass(frozen=True)
class MergedTarget:
    """One LoRA-adapted layer: its frozen base weight W0 (what the noise is written into) and the layer."""

    name: str
    weight: nn.Parameter
    layer: nn.Module


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_delta_weight") and hasattr(module, "get_base_layer")


def lora_targets(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None, method: str = "flat_lora"
) -> list[MergedTarget]:
    """The base weights of the model's LoRA layers (peft), filtered by name.

    Args:
        model: a peft model (possibly wrapped by DDP).
        include: regexes on the base weight's name (re.search); if given, one must match.
        exclude: regexes; a matching base weight is left out.
        method: the method asking, for the error message.

    Returns:
        One `MergedTarget` per adapted layer with active, unmerged adapters, in model order.

    Raises:
        ValueError: no LoRA layer is left, or a layer is already merged or uses DoRA (whose magnitude
            vector rescales the merged weight, so noise on W0 is not noise on the merged weight).
    """
    targets: list[MergedTarget] = []
    for module_name, module in model.named_modules():
        if not _is_lora_layer(module) or not getattr(module, "active_adapters", None):
            continue
        if getattr(module, "merged", False):
            raise ValueError(
                f"NSOConfig.method={method!r}: the LoRA layer {clean_parameter_name(module_name)!r} has its adapters merged "
                "into the base weight. Unmerge them (model.unmerge_adapter()) before training."
            )
        if any(getattr(module, "use_dora", {}).get(a, False) for a in module.active_adapters):
            raise ValueError(
                f"NSOConfig.method={method!r} does not support DoRA (layer {clean_parameter_name(module_name)!r}): its "
                "magnitude vector rescales the merged weight. Use plain LoRA or method='nso'."
            )
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.is_floating_point():
            targets.append(MergedTarget(f"{module_name}.base_layer.weight", weight, module))
    kept = filter_parameters(
        [(t.name, t.weight) for t in targets], include, exclude, trainable_only=False,
        label="NSOConfig.perturb_include/perturb_exclude",
    )  # fmt: skip
    by_id = {id(t.weight): t for t in targets}
    out = [MergedTarget(name, w, by_id[id(w)].layer) for name, w in kept]
    if not out:
        raise ValueError(
            f"NSOConfig.method={method!r} perturbs the merged weight W0 + s BA of LoRA layers, but found none "
            f"({len(targets)} LoRA layers before include={list(include or [])}, exclude={list(exclude or [])}). "
            "Wrap the model with peft (get_peft_model with a LoraConfig), or use method='rwp' / 'nso'."
        )
    return out


@torch.no_grad()
def merged_weight(layer: nn.Module) -> torch.Tensor:
    """M = W0 + sum over the active adapters of s B A, in float32, shaped like the base weight.

    Args:
        layer: a peft LoRA layer.

    Returns:
        A new float32 tensor (one weight-sized temporary).
    """
    m = layer.get_base_layer().weight.detach().float().clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            m.add_(layer.get_delta_weight(adapter).float())  # s B A, transposed for fan_in_fan_out layers
    return m


@torch.no_grad()
def merged_row_rms(layer: nn.Module) -> torch.Tensor:
    """The RMS of each output row of M = W0 + s B A, shaped to broadcast against the base weight.

    Args:
        layer: a peft LoRA layer.

    Returns:
        float32; rows are along dim 0 of the base weight, or dim 1 for a `fan_in_fan_out` layer
        (GPT-2's Conv1D stores the weight transposed).
    """
    m = merged_weight(layer)
    if getattr(layer, "fan_in_fan_out", False) and m.dim() == 2:
        return row_rms(m.T).T
    return row_rms(m)
