"""Which runs a comparison makes: a strength grid on the validation split, then every method at equal
optimizer steps and at equal compute over the seeds.

Compute is counted in forward+backward passes at the same batch size: per micro-batch `none`, `rwp`
and `flat_lora` make one, `nso`, `sam`, `asam` and `nso_merged` two. At equal compute every method
gets the passes of the costliest method at `steps` optimizer steps, so a one-pass method trains twice
as many steps as a two-pass one; a two-pass method's equal-steps run is then also its equal-compute
run (one run, reported under both budgets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from nso_hf.config import METHODS, NSOConfig, config_for_method
from nso_hf.passes import pass_plan

BUDGETS = ("equal_compute", "equal_steps")
# The strength each method is tuned over: sigma (noise std) or rho (ascent radius).
STRENGTH_NAME = {"nso": "sigma", "rwp": "sigma", "flat_lora": "sigma", "nso_merged": "sigma", "sam": "rho", "asam": "rho"}


def passes_per_micro_batch(method: str) -> int:
    """Forward+backward passes per micro-batch of `method` with one noise draw (`none`: 1)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {METHODS}.")
    config = config_for_method(method, NSOConfig(method=method))
    return 1 if config is None else len(pass_plan(config))


@dataclass(frozen=True)
class Run:
    """One training run. `role`: "validation" (grid point, scored on the validation splits) or "test"."""

    method: str
    strength: float | None
    seed: int
    steps: int
    role: str
    budgets: tuple[str, ...] = ()  # test runs: "equal_steps" and/or "equal_compute"

    @property
    def name(self) -> str:
        strength = "" if self.strength is None else f"_{STRENGTH_NAME[self.method]}{self.strength:g}"
        return f"{self.role}/{self.method}{strength}_steps{self.steps}_seed{self.seed}"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


def equal_compute_steps(method: str, steps: int, methods: Sequence[str]) -> int:
    """Optimizer steps that give `method` the passes the costliest of `methods` makes in `steps` steps."""
    most = max(passes_per_micro_batch(m) for m in methods)
    passes = passes_per_micro_batch(method)
    if (steps * most) % passes:
        raise ValueError(f"{steps} steps x {most} passes is not a whole number of {method!r} steps ({passes} passes).")
    return steps * most // passes


def grid_runs(grids: dict[str, Sequence[float]], seed: int, steps: int) -> list[Run]:
    """One run per grid value of every tuned method, at `steps` steps and one selection seed."""
    return [Run(m, float(v), seed, steps, "validation") for m, values in grids.items() for v in values]


def comparison_runs(
    methods: Sequence[str], strengths: dict[str, float | None], seeds: Sequence[int], steps: int,
    budgets: Sequence[str] = BUDGETS,
) -> list[Run]:
    """Every method over `seeds` at each of `budgets`, one run where equal steps and equal compute coincide."""
    unknown = [b for b in budgets if b not in BUDGETS]
    if unknown or not budgets:
        raise ValueError(f"budgets must be a non-empty subset of {BUDGETS}, got {list(budgets)}.")
    runs = []
    for seed in seeds:
        for method in methods:
            strength = strengths.get(method)
            by_steps: dict[int, list[str]] = {}
            for budget in BUDGETS:
                if budget in budgets:
                    n = steps if budget == "equal_steps" else equal_compute_steps(method, steps, methods)
                    by_steps.setdefault(n, []).append(budget)
            runs += [Run(method, strength, seed, n, "test", tuple(b)) for n, b in by_steps.items()]
    return runs
