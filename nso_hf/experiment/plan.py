"""Which runs a comparison makes: a strength grid on the validation split, then every arm at equal
optimizer steps and at equal compute over the seeds.

An arm is a method, optionally on a perturbation schedule: `nso`, `nso@late0.75` (NSOConfig.perturb_start
0.75), `nso@every2` (perturb_every 2), `nso@late0.5@every2`. A scheduled method is an arm of its own
beside the unscheduled one, with its own strength.

Compute is counted in forward+backward passes at the same batch size, as the runs make them: per
micro-batch `none`, `rwp` and `flat_lora` make one, `nso`, `sam`, `asam` and `nso_merged` two on a
perturbed step, and every method one on a plain step of its schedule (`nso_hf.schedule.scheduled_passes`).
At equal compute every arm gets the passes of the costliest arm at `steps` optimizer steps: a one-pass
method trains as many steps as that arm made passes, a scheduled arm the steps whose passes make that
total. The costliest arm's equal-steps run is then also its equal-compute run (one run, reported under
both budgets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from nso_hf.config import METHODS, NSOConfig, config_for_method
from nso_hf.passes import pass_plan
from nso_hf.schedule import schedule_name, scheduled_passes

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
class Arm:
    """A method on a perturbation schedule (perturb_start 0, perturb_every 1: every step)."""

    method: str
    perturb_start: float = 0.0
    perturb_every: int = 1

    @classmethod
    def parse(cls, spec: str) -> Arm:
        """`method`, then optionally `@late<fraction>` and `@every<n>`: "nso", "nso@late0.75", "sam@every2".

        Raises:
            ValueError: an unknown method or part, a schedule on `none`, or a schedule value NSOConfig refuses.
        """
        method, *parts = spec.split("@")
        if method not in METHODS:
            raise ValueError(f"--methods: unknown method {method!r} in {spec!r}; use any of {METHODS}, optionally "
                             "followed by @late<fraction> and/or @every<n> (e.g. nso@late0.75).")
        start, every = 0.0, 1
        for part in parts:
            try:
                if part.startswith("late"):
                    start = float(part[len("late"):])
                elif part.startswith("every"):
                    every = int(part[len("every"):])
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"--methods: {spec!r}: {part!r} is not late<fraction> or every<n> (e.g. nso@late0.75, "
                                 "nso@every2).") from None
        if method == "none" and parts:
            raise ValueError(f"--methods: {spec!r}: plain training has no passes to schedule; use none.")
        NSOConfig(method=method, perturb_start=start, perturb_every=every)  # the schedule's own checks
        return cls(method, start, every)

    @property
    def spec(self) -> str:
        """The canonical spelling, the arm's key in tables and run names."""
        return self.method + (f"@late{self.perturb_start:g}" if self.perturb_start > 0 else "") + (
            f"@every{self.perturb_every}" if self.perturb_every > 1 else "")

    @property
    def label(self) -> str:
        """How reports name it: "nso", "nso late 0.75"."""
        return f"{self.method} {schedule_name(self.perturb_start, self.perturb_every)}".strip()

    @property
    def scheduled(self) -> bool:
        return self.perturb_start > 0 or self.perturb_every > 1

    def passes(self, steps: int) -> int:
        """Forward+backward passes per micro-batch slot over a run of `steps` optimizer steps."""
        return scheduled_passes(steps, self.perturb_start, self.perturb_every, passes_per_micro_batch(self.method))

    def options(self) -> list[str]:
        """The script options that put a run on this schedule."""
        if not self.scheduled:
            return []
        return ["--perturb_start", repr(self.perturb_start), "--perturb_every", str(self.perturb_every)]


def method_of(arm: str) -> str:
    """The method of an arm spec: "nso@late0.75" -> "nso"."""
    return Arm.parse(arm).method


@dataclass(frozen=True)
class Run:
    """One training run. `role`: "validation" (grid point, scored on the validation splits) or "test".

    `method` is the arm spec (`Arm.parse`): a method, optionally with its schedule ("nso@late0.75").
    """

    method: str
    strength: float | None
    seed: int
    steps: int
    role: str
    budgets: tuple[str, ...] = ()  # test runs: "equal_steps" and/or "equal_compute"

    @property
    def arm(self) -> Arm:
        return Arm.parse(self.method)

    @property
    def name(self) -> str:
        strength = "" if self.strength is None else f"_{STRENGTH_NAME[self.arm.method]}{self.strength:g}"
        return f"{self.role}/{self.method.replace('@', '_')}{strength}_steps{self.steps}_seed{self.seed}"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


def equal_compute_steps(method: str, steps: int, methods: Sequence[str]) -> int:
    """Optimizer steps that give arm `method` the passes the costliest of `methods` makes in `steps` steps.

    Raises:
        ValueError: no whole number of steps gives `method` exactly that many passes.
    """
    target = max(Arm.parse(m).passes(steps) for m in methods)
    arm = Arm.parse(method)
    # passes(n) grows with n, by at least 1 per step: the first n reaching the target is the only candidate.
    n = steps
    while arm.passes(n) < target:
        n += 1
    if arm.passes(n) != target:
        raise ValueError(
            f"No whole number of steps gives {arm.label} exactly {target} passes (the costliest arm's at {steps} steps; "
            f"{n} steps make {arm.passes(n)}): choose other --steps, or leave it out of --budgets equal_compute."
        )
    return n


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
