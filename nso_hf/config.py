"""`NSOConfig`: the settings of the step: which method (NSO, RWP, SAM, ASAM, Flat-LoRA, merged NSO) and its strength.

A plain dataclass, so `HfArgumentParser((TrainingArguments, NSOConfig))` parses it beside
`TrainingArguments` from the command line or a YAML/JSON file. No field shares a name with a
`TrainingArguments` field (hence `noise_seed`, not `seed`): argparse would reject the clash.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

NOISE_SCALES = ("absolute", "relative")
NONFINITE_POLICIES = ("raise", "skip")
NOISE_RAMPS = ("none", "cosine")
# The method vocabulary, the same in the library and every script (docs/methods.md):
#   none: plain Trainer's gradient g(W)           nso: two-point noise on the trainable weights
#   rwp: one-point noise (random weight perturbation)   sam / asam: adversarial ascent of radius rho
#   flat_lora: one-point noise on the merged LoRA weight W0 + s BA   nso_merged: the same, two-point
METHODS = ("none", "nso", "rwp", "sam", "asam", "flat_lora", "nso_merged")
NOISE_METHODS = ("nso", "rwp", "flat_lora", "nso_merged")
TWO_POINT_METHODS = ("nso", "nso_merged")
ASCENT_METHODS = ("sam", "asam")
MERGED_METHODS = ("flat_lora", "nso_merged")


@dataclass
class NSOConfig:
    """The step's method and strength; the default is Noise Stability Optimization (Zhang, Li, Ju; arXiv 2306.08553).

    Per micro-batch the NSO step accumulates
    `lam * g(W) + (1 - lam) / (2k) * sum_j [g(W + U_j) + g(W - U_j)]`, with U_j ~ N(0, sigma^2 I)
    on the perturbed parameters, and restores W exactly before the optimizer steps. `method` picks
    another gradient in the same step (docs/methods.md): RWP, SAM, ASAM, Flat-LoRA, merged-space NSO.
    """

    method: Literal["none", "nso", "rwp", "sam", "asam", "flat_lora", "nso_merged"] = field(
        default="nso",
        metadata={
            "help": "none: plain Trainer's gradient. nso: two-point noise W+U, W-U on the trainable weights (the paper). "
            "rwp: one-point noise W+U. sam: gradient at W + rho g/||g||. asam: at W + rho w^2 g/|| |w| g || (adaptive "
            "SAM). flat_lora: one-point noise on the frozen base weight of each LoRA layer, scaled by the rows of the "
            "merged weight W0 + s BA (Flat-LoRA). nso_merged: the same noise, two-point. docs/methods.md.",
            "choices": list(METHODS),
        },
    )
    rho: float = field(
        default=0.05,
        metadata={
            "help": "sam / asam: radius of the ascent step (SAM's default 0.05; ASAM's papers use larger values, "
            "e.g. 0.5-2). 0 gives plain training at the cost of the ascent pass. Ignored by the other methods."
        },
    )
    sigma: float = field(
        default=0.01,
        metadata={
            "help": "Noise standard deviation, in the units of noise_scale: with 'absolute' the std of U (the paper uses "
            "0.008-0.014 for fine-tuning); with 'relative' a fraction of each row's RMS (Flat-LoRA's rho, e.g. 0.05). "
            "0 turns the step into plain training (at the cost of the extra passes). Ignored by sam / asam."
        },
    )
    num_perturbations: int = field(
        default=1,
        metadata={"help": "k: noise draws per micro-batch. Each costs 2 forward+backward passes (1 for rwp and flat_lora)."},
    )
    two_point: bool | None = field(
        default=None,
        metadata={
            "help": "Older spelling of the method: False turns nso into rwp (and nso_merged into flat_lora). "
            "Unset: the method decides (nso, nso_merged: W+U and W-U; rwp, flat_lora: W+U only, whose gradient carries "
            "the first-order noise term H U). Normalised to None once the method is set."
        },
    )
    unperturbed_weight: float = field(
        default=0.0,
        metadata={
            "help": "lam in [0, 1]: weight of the clean gradient g(W). At 0 (the paper's setting) the clean pass is "
            "not run at all; above 0 it costs one more pass and logs nso/clean_loss and nso/sharpness."
        },
    )
    noise_scale: Literal["absolute", "relative"] | None = field(
        default=None,
        metadata={
            "help": "'absolute': U ~ N(0, sigma^2), the same for every tensor (the paper). 'relative': each output row "
            "(dim 0) gets sigma times that row's RMS magnitude (as RWP / Flat-LoRA do); a 1-D tensor uses its own RMS. "
            "A zero-initialised LoRA B therefore gets no noise until it has moved away from zero. For flat_lora and "
            "nso_merged the rows are those of the merged weight W0 + s BA. Unset: 'relative' for flat_lora and "
            "nso_merged, 'absolute' for the others.",
            "choices": list(NOISE_SCALES),
        },
    )
    noise_ramp: Literal["none", "cosine"] = field(
        default="none",
        metadata={
            "help": "Strength of the noise over training. 'cosine': sigma_t = sigma * (1 - cos(pi t / T)) / 2 at "
            "optimizer step t of T (Flat-LoRA's ramp: no noise at the first step, full sigma at the end), t and T "
            "counted over the perturbed phase (perturb_start). 'none': sigma throughout. For the noise methods only.",
            "choices": list(NOISE_RAMPS),
        },
    )
    perturb_start: float = field(
        default=0.0,
        metadata={
            "help": "Fraction in [0, 1) of the run's optimizer steps (TrainerState.max_steps) trained plainly first: one "
            "forward+backward per micro-batch, exactly Trainer's step, before the method's passes begin (0: perturb from "
            "the first step). E.g. 0.75 perturbs the last quarter only, as late-phase SAM does (docs/methods.md)."
        },
    )
    perturb_every: int = field(
        default=1,
        metadata={
            "help": "Inside the perturbed phase, run the method's passes on every n-th optimizer step only, counted from "
            "its first step; the others are plain Trainer steps (1: every step)."
        },
    )
    perturb_include: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions (re.search on the parameter name); when set, only trainable parameters "
            "matching one of them are perturbed. Default: every parameter with requires_grad (with peft: the adapters)."
        },
    )
    perturb_exclude: list[str] | None = field(
        default=None,
        metadata={"help": "Regular expressions of parameter names never perturbed, e.g. 'norm' 'bias'."},
    )
    noise_seed: int | None = field(
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
        if self.method not in METHODS:
            raise ValueError(f"NSOConfig.method must be one of {METHODS}, got {self.method!r}. Use 'nso' for the paper's step.")
        sigma = self.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(
                f"NSOConfig.sigma must be a finite float >= 0, got {sigma!r}. "
                "Use a small positive value such as 0.01 (or 0 for no noise)."
            )
        rho = self.rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho >= 0):
            raise ValueError(
                f"NSOConfig.rho must be a finite float >= 0, got {rho!r}. Use SAM's 0.05 (or 0 for no ascent)."
            )
        self._normalise_two_point()
        if isinstance(self.num_perturbations, bool) or not isinstance(self.num_perturbations, int) or self.num_perturbations < 1:
            raise ValueError(
                f"NSOConfig.num_perturbations must be an int >= 1, got {self.num_perturbations!r}. "
                "Use 1 (the paper's setting) or more draws per micro-batch."
            )
        lam = self.unperturbed_weight
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(
                f"NSOConfig.unperturbed_weight must be a float in [0, 1], got {lam!r}. "
                "Use 0 to skip the clean pass (the paper's setting)."
            )
        start = self.perturb_start
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start < 1.0:
            raise ValueError(
                f"NSOConfig.perturb_start must be a float in [0, 1), got {start!r}. Use 0 to perturb from the first step, "
                "or e.g. 0.75 to perturb the last quarter of the run."
            )
        every = self.perturb_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"NSOConfig.perturb_every must be an int >= 1, got {every!r}. Use 1 to perturb every step of the "
                "perturbed phase, or e.g. 2 for every other step."
            )
        if self.noise_scale is not None and self.noise_scale not in NOISE_SCALES:
            raise ValueError(
                f"NSOConfig.noise_scale must be one of {NOISE_SCALES}, got {self.noise_scale!r}. "
                "Use 'absolute' for the paper's isotropic noise."
            )
        if self.noise_ramp not in NOISE_RAMPS:
            raise ValueError(
                f"NSOConfig.noise_ramp must be one of {NOISE_RAMPS}, got {self.noise_ramp!r}. Use 'cosine' for Flat-LoRA's ramp."
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

    def _normalise_two_point(self) -> None:
        # `two_point` predates `method`: it is folded into the method and reset to None, so that
        # NSOConfig(two_point=False) == NSOConfig(method="rwp") and `replace(cfg, method=...)` is safe.
        tp = self.two_point
        if tp is None:
            return
        if not isinstance(tp, bool):
            raise ValueError(f"NSOConfig.two_point must be True or False, got {tp!r}.")
        one_point = {"nso": "rwp", "nso_merged": "flat_lora"}
        if self.method not in NOISE_METHODS:
            raise ValueError(
                f"NSOConfig.two_point applies to the noise methods {NOISE_METHODS}, not method={self.method!r}. Drop two_point."
            )
        if tp and self.method not in TWO_POINT_METHODS:
            raise ValueError(
                f"NSOConfig.two_point=True contradicts method={self.method!r} (one-point). Use method='nso' or "
                "'nso_merged', or drop two_point."
            )
        if not tp:
            self.method = one_point.get(self.method, self.method)
        self.two_point = None

    @property
    def is_two_point(self) -> bool:
        """True for the methods that evaluate W + U and W - U (nso, nso_merged)."""
        return self.method in TWO_POINT_METHODS

    @property
    def scheduled(self) -> bool:
        """True when some optimizer steps run as plain training (perturb_start > 0 or perturb_every > 1)."""
        return self.perturb_start > 0 or self.perturb_every > 1

    @property
    def relative_noise(self) -> bool:
        """Whether sigma is a fraction of each row's RMS: noise_scale, or the method's default when unset."""
        scale = self.noise_scale or ("relative" if self.method in MERGED_METHODS else "absolute")
        return scale == "relative"

    @property
    def passes_per_micro_batch(self) -> int:
        """Forward+backward passes per micro-batch of a perturbed step: 2k (k one-point), plus 1 when lam > 0; 2 for
        sam/asam; 1 for none. A plain step of the schedule (perturb_start, perturb_every) makes 1."""
        if self.method == "none":
            return 1
        if self.method in ASCENT_METHODS:
            return 2
        per_draw = 2 if self.is_two_point else 1
        return per_draw * self.num_perturbations + (1 if self.unperturbed_weight > 0 else 0)

    def to_dict(self) -> dict:
        """The fields, with the method's defaults written out (two_point, noise_scale), for results files."""
        out = asdict(self)
        out["two_point"] = self.is_two_point if self.method in NOISE_METHODS else None
        out["noise_scale"] = "relative" if self.relative_noise else "absolute"
        return out


def config_for_method(method: str, config: NSOConfig) -> NSOConfig | None:
    """The step a script's `--method` runs: a copy of `config` with `method` set, or None for plain `Trainer`.

    Args:
        method: one of `METHODS`.
        config: the user's settings (their own `method` is replaced).

    Returns:
        A copy of `config` with `method` set, or None for "none" (the scripts then build `transformers.Trainer`).

    Raises:
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"NSOConfig.method must be one of {METHODS}, got {method!r}. Use 'nso' for the paper's step.")
    if method == "none":
        return None
    return replace(config, method=method)
