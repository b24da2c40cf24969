"""`NSOConfig`: the settings of the noise-stability step.

A plain dataclass, so `HfArgumentParser((TrainingArguments, NSOConfig))` parses it beside
`TrainingArguments` from the command line or a YAML/JSON file. No field shares a name with a
`TrainingArguments` field (hence `noise_seed`, not `seed`): argparse would reject the clash.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Optional

NOISE_SCALES = ("absolute", "relative")
NONFINITE_POLICIES = ("raise", "skip")
# What the scripts' --method means: NSO (two-point), RWP (one-point), or plain Trainer.
METHODS = ("nso", "rwp", "none")


@dataclass
class NSOConfig:
    """Noise Stability Optimization (Zhang, Li, Ju; arXiv 2306.08553).

    Per micro-batch the step accumulates
    `lam * g(W) + (1 - lam) / (2k) * sum_j [g(W + U_j) + g(W - U_j)]`, with U_j ~ N(0, sigma^2 I)
    on the perturbed parameters, and restores W exactly before the optimizer steps.
    """

    sigma: float = field(
        default=0.01,
        metadata={
            "help": "Noise scale. With noise_scale='absolute' the standard deviation of U; the paper uses "
            "0.008-0.014 for fine-tuning. 0 turns the step into plain training (at the cost of the extra passes)."
        },
    )
    num_perturbations: int = field(
        default=1,
        metadata={"help": "k: noise draws per micro-batch. Each costs 2 forward+backward passes (1 if two_point=False)."},
    )
    two_point: bool = field(
        default=True,
        metadata={
            "help": "Evaluate at W+U and W-U (NSO). False: at W+U only, i.e. random weight perturbation (RWP), "
            "the paper's baseline, whose gradient carries the first-order noise term H U."
        },
    )
    unperturbed_weight: float = field(
        default=0.0,
        metadata={
            "help": "lam in [0, 1]: weight of the clean gradient g(W). At 0 (the paper's setting) the clean pass is "
            "not run at all; above 0 it costs one more pass and logs nso/clean_loss and nso/sharpness."
        },
    )
    noise_scale: Literal["absolute", "relative"] = field(
        default="absolute",
        metadata={
            "help": "'absolute': U ~ N(0, sigma^2), the same for every tensor (the paper). 'relative': each output row "
            "(dim 0) gets sigma times that row's RMS magnitude (as RWP / Flat-LoRA do); a 1-D tensor uses its own RMS. "
            "A zero-initialised LoRA B therefore gets no noise until it has moved away from zero.",
            "choices": list(NOISE_SCALES),
        },
    )
    perturb_include: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Regular expressions (re.search on the parameter name); when set, only trainable parameters "
            "matching one of them are perturbed. Default: every parameter with requires_grad (with peft: the adapters)."
        },
    )
    perturb_exclude: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Regular expressions of parameter names never perturbed, e.g. 'norm' 'bias'."},
    )
    noise_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "Seed of the noise generator (default: TrainingArguments.seed). The noise of each draw is a pure "
            "function of (noise_seed, global step, micro-step, rank, draw), so a resumed run repeats it exactly."
        },
    )
    sync_noise_across_ranks: bool = field(
        default=False,
        metadata={
            "help": "False: each data-parallel rank draws its own noise, so one step averages world_size x k draws at "
            "no extra cost. True: the same draw on every rank, as in the paper. Sharded parameters (FSDP, ZeRO-3) "
            "always draw per shard, which is one shared draw of the full tensor."
        },
    )
    nonfinite_loss: Literal["raise", "skip"] = field(
        default="raise",
        metadata={
            "help": "What a non-finite perturbed loss does (the weights are restored first either way). 'raise': stop "
            "with an error naming the step and sigma. 'skip': that pass contributes no gradient, a warning is "
            "logged and counted in nso/skipped_passes; and an optimizer step whose gradient norm is not finite "
            "is skipped (no update, weight decay or moment change; counted in nso/skipped_steps; the LR "
            "scheduler still advances).",
            "choices": list(NONFINITE_POLICIES),
        },
    )

    def __post_init__(self) -> None:
        sigma = self.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(
                f"NSOConfig.sigma must be a finite float >= 0, got {sigma!r}. "
                "Use a small positive value such as 0.01 (or 0 for no noise)."
            )
        if isinstance(self.num_perturbations, bool) or not isinstance(self.num_perturbations, int) or self.num_perturbations < 1:
            raise ValueError(
                f"NSOConfig.num_perturbations must be an int >= 1, got {self.num_perturbations!r}. "
                "Use 1 (the paper's setting) or more draws per micro-batch."
            )
        if not isinstance(self.two_point, bool):
            raise ValueError(f"NSOConfig.two_point must be True or False, got {self.two_point!r}.")
        lam = self.unperturbed_weight
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(
                f"NSOConfig.unperturbed_weight must be a float in [0, 1], got {lam!r}. "
                "Use 0 to skip the clean pass (the paper's setting)."
            )
        if self.noise_scale not in NOISE_SCALES:
            raise ValueError(
                f"NSOConfig.noise_scale must be one of {NOISE_SCALES}, got {self.noise_scale!r}. "
                "Use 'absolute' for the paper's isotropic noise."
            )
        if self.nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(
                f"NSOConfig.nonfinite_loss must be one of {NONFINITE_POLICIES}, got {self.nonfinite_loss!r}."
            )
        for name in ("perturb_include", "perturb_exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                # A lone string would be iterated character by character: accept it as one pattern.
                value = [value]
                setattr(self, name, value)
            if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"NSOConfig.{name} must be a list of regular expressions, got {value!r}.")
        if self.noise_seed is not None and (isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int)):
            raise ValueError(f"NSOConfig.noise_seed must be an int or None, got {self.noise_seed!r}.")

    @property
    def passes_per_micro_batch(self) -> int:
        """Forward+backward passes per micro-batch: 2k (k one-point), plus 1 when lam > 0."""
        per_draw = 2 if self.two_point else 1
        return per_draw * self.num_perturbations + (1 if self.unperturbed_weight > 0 else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def config_for_method(method: str, config: NSOConfig) -> NSOConfig | None:
    """The step a script's `--method` runs.

    Args:
        method: "nso" (two-point), "rwp" (one-point) or "none" (plain `Trainer`).
        config: the user's NSO settings; `two_point` is set by the method.

    Returns:
        A copy of `config` with `two_point` set, or None for "none".

    Raises:
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if method == "none":
        return None
    return replace(config, two_point=(method == "nso"))
