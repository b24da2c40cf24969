"""What a trained model keeps when it is deployed: accuracy after a GGUF round trip and under weight noise.

Users merge and quantize a fine-tuned model for deployment; llama.cpp's GGUF block formats are the most
common target. Two measures of the trained weights, each on every evaluation source and each also as the
drop from the run's own clean accuracy:

- **GGUF round trip.** Every Linear weight is quantized and dequantized by the `gguf` package's own
  quantizer (`gguf.quants.quantize` / `dequantize`: Q8_0 and Q4_0, blocks of 32 along the input
  dimension, the layout llama.cpp stores), not by a quantizer of ours. With LoRA the weight quantized is
  the merged one, M = W0 + s BA, as a deployment merges before it converts. A weight whose input size
  the block size does not divide is named and left in full precision (llama.cpp would fall back to
  another type for it), and counted.
- **Weight noise.** Every Linear weight (the merged one with LoRA) gets Gaussian noise whose std is a
  fixed fraction of each output row's RMS. The draws are a function of (seed, draw, tensor index) only,
  so every method trained at a given seed meets the same standard normals.

Both are moves of the weights through `nso_hf.noise.Perturbation`, the same primitive the training step
and the flatness measures use: quantizing is `move_to` along the offsets Q(M) - M, noise is `apply`
(drawn in place, relative to the rows of M). With LoRA the offset is written into the frozen base
weight W0, so the layer computes (W0 + Q(M) - M) + s BA = Q(M) up to one float32 rounding, as
`nso_hf.merged` does for merged-space noise. `restore()` copies W back, so the model leaves every
measure holding the bits it held before (tested).
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nso_hf.merged import _is_lora_layer, merged_row_rms, merged_weight
from nso_hf.noise import Perturbation, clean_parameter_name, draw_seed, row_rms

# The GGUF formats measured, as named in results files (keys) and in gguf's GGMLQuantizationType (values).
QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
# Q8_0 and Q4_0 both quantize blocks of 32 consecutive values along a row (gguf's GGML_QUANT_SIZES).
BLOCK_SIZE = 32


@dataclass
class RobustnessArguments:
    """The deployment measures at the end of training (off by default); shared by both training scripts."""

    robustness: bool = field(
        default=False,
        metadata={
            "help": "After training, score every evaluation source again after a GGUF Q8_0 and Q4_0 round trip of "
            "every Linear weight (merged W0 + s BA with LoRA; needs `pip install gguf`) and under Gaussian weight "
            "noise; reported beside the clean accuracy with the drops (`robustness` in the results file)."
        },
    )
    robustness_noise: float = field(
        default=0.05,
        metadata={"help": "Std of the weight noise of --robustness, as a fraction of each output row's RMS."},
    )
    robustness_noise_draws: int = field(
        default=1, metadata={"help": "Noise draws of --robustness (each scores every evaluation source once)."}
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.robustness_noise) and self.robustness_noise > 0):
            raise ValueError(
                f"--robustness_noise must be a finite fraction > 0 of each row's RMS, got {self.robustness_noise}."
            )
        if self.robustness_noise_draws < 1:
            raise ValueError(f"--robustness_noise_draws must be >= 1, got {self.robustness_noise_draws}.")


def require_gguf() -> None:
    """Fail before training when --robustness cannot run: the round trip needs the `gguf` package.

    Raises:
        ValueError: gguf is not installed.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(
            "--robustness quantizes with the gguf package, which is not installed: pip install 'nso-hf[robustness]' "
            "(gguf), or drop --robustness."
        )


@dataclass(frozen=True)
class DeployedWeight:
    """One weight matrix a deployment stores: a Linear weight, or the merged weight of a LoRA layer.

    Attributes:
        name: the parameter's name (wrapper prefixes removed).
        param: the parameter moved: the Linear weight, or the LoRA layer's frozen base weight W0.
        lora: the peft LoRA layer whose merged weight W0 + s BA is meant (None: the weight itself).
        transposed: stored as (in, out), as GPT-2's Conv1D does; GGUF blocks run along the input dim.
    """

    name: str
    param: nn.Parameter
    lora: nn.Module | None
    transposed: bool

    @property
    def in_features(self) -> int:
        """The length of a GGUF row: the input dimension."""
        shape = self.param.shape
        return shape[0] if self.transposed else shape[-1]

    def merged(self) -> torch.Tensor:
        """The deployed weight in float32, shaped like `param`: W, or W0 + s BA with LoRA (a new tensor)."""
        if self.lora is not None:
            return merged_weight(self.lora)
        return self.param.detach().float().clone()

    def row_scale(self) -> torch.Tensor:
        """Each output row's RMS of the deployed weight, shaped to broadcast against `param`."""
        if self.lora is not None:
            return merged_row_rms(self.lora)
        w = self.param.detach().float()
        return row_rms(w.T).T if self.transposed else row_rms(w)


def deployed_weights(model: nn.Module) -> list[DeployedWeight]:
    """Every Linear weight of `model` as a deployment stores it, in model order, a tied weight once.

    Linear means `nn.Linear` and transformers' `Conv1D` (GPT-2's transposed Linear). A peft LoRA layer
    counts once, as its merged weight; its adapter matrices are part of that weight, not weights of
    their own.

    Args:
        model: any module (peft models and DDP wrappers included).

    Returns:
        The weights; empty when the model has no Linear layer.
    """
    from transformers.pytorch_utils import Conv1D

    lora_parts: set[int] = set()  # modules inside a LoRA layer: its base layer and adapter matrices
    found: list[DeployedWeight] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in lora_parts:
            continue
        if _is_lora_layer(module):
            lora_parts.update(id(m) for m in module.modules() if m is not module)
            base = module.get_base_layer()
            weight = getattr(base, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 2 and id(weight) not in seen:
                seen.add(id(weight))
                transposed = bool(getattr(module, "fan_in_fan_out", False))
                found.append(DeployedWeight(clean_parameter_name(f"{name}.base_layer.weight"), weight, module, transposed))
            continue
        if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found.append(DeployedWeight(clean_parameter_name(f"{name}.weight"), module.weight, None, isinstance(module, Conv1D)))
    return found


def split_by_block_size(weights: Sequence[DeployedWeight], block_size: int = BLOCK_SIZE) -> tuple[list, list]:
    """(weights whose input size `block_size` divides, the others: left in full precision)."""
    kept = [w for w in weights if w.in_features % block_size == 0]
    return kept, [w for w in weights if w.in_features % block_size != 0]


def check_quantizable(model: nn.Module, block_size: int = BLOCK_SIZE) -> list[DeployedWeight]:
    """The weights --robustness will quantize; an error when there are none (called before training).

    Raises:
        ValueError: the model has no Linear weight, or none whose input size `block_size` divides.
    """
    weights = deployed_weights(model)
    kept, skipped = split_by_block_size(weights, block_size)
    if not kept:
        sizes = sorted({w.in_features for w in skipped})
        raise ValueError(
            f"--robustness: none of the model's {len(weights)} Linear weights has an input size divisible by the GGUF "
            f"block size {block_size} (input sizes {sizes}), so a Q8_0/Q4_0 round trip would change nothing. Use a model "
            f"whose hidden sizes are multiples of {block_size}, or drop --robustness."
        )
    return kept


@torch.no_grad()
def gguf_round_trip(matrix: torch.Tensor, kind: str) -> torch.Tensor:
    """A matrix quantized and dequantized by gguf, block by block along its last dimension.

    Q8_0 (per block of 32): d = max|x| / 127, q = round-half-away(x / d) in int8, stored d in float16;
    x' = fp16(d) * q. Q4_0: m = the value of largest magnitude (with its sign), d = m / -8,
    q = clip(trunc(x / d + 8.5), 0, 15), x' = fp16(d) * (q - 8). gguf's numpy code is bit-exact to
    ggml-quants.c for Q8_0.

    Args:
        matrix: (rows, n) with n a multiple of 32, any float dtype and device.
        kind: "q8_0" or "q4_0".

    Returns:
        float32, same shape and device.

    Raises:
        ValueError: an unknown kind, or n not a multiple of the block size.
    """
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    if kind not in QUANT_TYPES:
        raise ValueError(f"Unknown GGUF type {kind!r}; use one of {sorted(QUANT_TYPES)}.")
    if matrix.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"A GGUF row needs a multiple of {BLOCK_SIZE} values, got {matrix.shape[-1]}.")
    qtype = GGMLQuantizationType[QUANT_TYPES[kind]]
    values = np.ascontiguousarray(matrix.detach().float().cpu().numpy())
    back = dequantize(quantize(values, qtype), qtype).reshape(values.shape)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).to(matrix.device)


class _Offsets(Sequence):
    """The direction Q(M_i) - M_i of each weight, computed when `Perturbation.move_to` reads it.

    move_to reads each tensor once, in order, so only one weight-sized temporary exists at a time
    (a list of all offsets would cost a float32 copy of every Linear weight).
    """

    def __init__(self, weights: Sequence[DeployedWeight], kind: str):
        self.weights, self.kind = list(weights), kind

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        w = self.weights[i]
        m = w.merged()  # read at W: move_to starts every weight from its backup, and moves start at W
        gguf_rows = m.T if w.transposed else m
        q = gguf_round_trip(gguf_rows, self.kind)
        return (q.T if w.transposed else q) - m


def quantized_point(weights: Sequence[DeployedWeight], kind: str) -> Perturbation:
    """Move `weights` to their GGUF round trip; `restore()` on the returned object puts W back exactly.

    A float32 weight ends at Q(W): W + (Q(W) - W) is exact whenever the offset is, which Sterbenz's lemma gives
    when Q(W) is 0 or within a factor of two of W, as a round-to-nearest block makes it (the tests compare with
    torch.equal). A lower-precision weight is rounded once into its dtype; a LoRA base weight holds
    W0 + Q(M) - M, so the layer's merged weight is Q(M) up to one float32 rounding.
    """
    perturbation = Perturbation([w.param for w in weights], sigma=0.0, relative=False)
    try:
        perturbation.move_to([1.0], [_Offsets(weights, kind)])
    except BaseException:
        perturbation.restore()
        raise
    return perturbation


def noisy_point(weights: Sequence[DeployedWeight], fraction: float, seed: int, draw: int = 0) -> Perturbation:
    """Add N(0, (fraction * row RMS)^2) noise to every weight (rows of the merged weight with LoRA).

    The standard normals of tensor i come from `draw_seed(seed, 0, 0, 0, draw, i)`: the same for every
    model with the same Linear layers, whatever it was trained with. `restore()` puts W back exactly.
    """
    params = [w.param for w in weights]
    perturbation = Perturbation(params, sigma=fraction, relative=True, scales=[w.row_scale() for w in weights])
    try:
        perturbation.apply(1, [draw_seed(seed, 0, 0, 0, draw, i) for i in range(len(params))])
    except BaseException:
        perturbation.restore()
        raise
    return perturbation


def measure_robustness(
    model: nn.Module,
    evaluate: Callable[[str], dict[str, float]],
    clean: dict[str, float],
    noise: float,
    draws: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Accuracy of `model` on every evaluation source after Q8_0 and Q4_0 round trips and under weight noise.

    Args:
        model: the trained model (left holding the bits it held; tested).
        evaluate: label -> {source: accuracy} of the model as it is now; the label ("q8_0", "q4_0",
            "noise0", ...) names the pass in progress bars.
        clean: {source: accuracy} of the unmoved model (the run's own final evaluation).
        noise: the noise std as a fraction of each row's RMS.
        draws: noise draws; the accuracy under noise is their mean.
        seed: fixes the noise draws.
        log: where the list of weights left in full precision is reported.

    Returns:
        {"block_size", "weights" (Linear weights), "quantized", "full_precision" (names), "num_full_precision",
         "weight_noise": {"relative_std", "draws", "seed"}, "seconds",
         "sources": {source: {"clean", "q8_0", "q4_0", "noise", "noise_draws", "q8_0_drop", "q4_0_drop",
         "noise_drop"}}}; a drop is clean minus the moved accuracy (positive: accuracy lost).
    """
    start = time.perf_counter()
    weights = deployed_weights(model)
    kept, skipped = split_by_block_size(weights)
    if skipped:
        log(f"[robustness] {len(skipped)} Linear weights stay in full precision (input size not a multiple of "
            f"{BLOCK_SIZE}): {[w.name for w in skipped]}")
    moved: dict[str, dict[str, float]] = {}
    for kind in QUANT_TYPES:
        point = quantized_point(kept, kind)
        try:
            moved[kind] = evaluate(kind)
        finally:
            point.restore()
    noisy: list[dict[str, float]] = []
    for draw in range(draws):
        point = noisy_point(weights, noise, seed, draw)
        try:
            noisy.append(evaluate(f"noise{draw}"))
        finally:
            point.restore()
    sources = {}
    for source, accuracy in clean.items():
        row: dict[str, Any] = {"clean": accuracy, **{kind: moved[kind][source] for kind in QUANT_TYPES}}
        row["noise_draws"] = [d[source] for d in noisy]
        row["noise"] = math.fsum(row["noise_draws"]) / draws
        for kind in (*QUANT_TYPES, "noise"):
            row[f"{kind}_drop"] = accuracy - row[kind]
        sources[source] = row
    return {
        "block_size": BLOCK_SIZE,
        "weights": len(weights),
        "quantized": len(kept),
        "full_precision": [w.name for w in skipped],
        "num_full_precision": len(skipped),
        "weight_noise": {"relative_std": noise, "draws": draws, "seed": seed},
        "seconds": time.perf_counter() - start,
        "sources": sources,
    }
