"""`scripts/compare_methods.py`: methods side by side on one task, over seeds, at equal steps and compute.

The task (`--task`, `nso_hf.experiment.tasks`) is CoT fine-tuning (`finetune_cot.py`, strict accuracy)
or CLIP pretraining (`pretrain_clip.py`, zero-shot accuracy); everything below is the same for both.

1. Strength selection: every tuned method runs once per value of its grid (same steps, one selection
   seed that is not a test seed) and keeps the value with the best accuracy on the selection
   split (`--selection`, a validation split; ties go to the weaker strength). The test splits are
   not looked at. An arm written `<method>@late` (`--start_grid`) is then chosen the same way among
   its perturbation starts, each run at the strength chosen for `<method>`: that arm is tuned in its
   start, as many values as a strength grid, and becomes `<method>@late<start>` for the test runs.
2. Test runs: every method with its chosen strength, for every seed, at equal optimizer steps and at
   equal compute (`nso_hf.experiment.plan`).
3. Report: `results.json` (every number), `results.md` (the tables, the paired differences, the
   pre-registered decision) and `results.png` (accuracy against Hessian trace, a point per seed).

The decision rule is fixed before any run and printed with the results: the primary metric is the
accuracy on `--primary` at equal compute; NSO "wins" only if its seed-paired 95% interval
against every other method lies above 0; an interval containing 0 is a tie. Everything else is secondary.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from data_recipes.label_noise import check_label_noise
from nso_hf.config import METHODS
from nso_hf.experiment import report
from nso_hf.experiment.plan import (
    BUDGETS,
    STRENGTH_NAME,
    Arm,
    Run,
    comparison_runs,
    equal_compute_steps,
    grid_runs,
    method_of,
)
from nso_hf.experiment.runner import run_all, run_tokens
from nso_hf.experiment.statistics import t_quantile
from nso_hf.experiment.tasks import TASKS

# Flat-LoRA perturbs the merged LoRA weight, so it runs only on LoRA runs (make experiment-lora adds it).
DEFAULT_METHODS = ("none", "nso", "rwp", "sam")
# A small grid per method, the same size for each: three values around the usual setting
# (NSO/RWP: sigma on the trained weights, absolute; SAM: rho; ASAM: rho, larger as in its paper;
# Flat-LoRA and merged NSO: sigma relative to the merged weight's rows).
DEFAULT_GRIDS = {
    "nso": (0.003, 0.01, 0.03),
    "rwp": (0.003, 0.01, 0.03),
    "sam": (0.01, 0.05, 0.2),
    "asam": (0.1, 0.5, 2.0),
    "flat_lora": (0.02, 0.05, 0.1),
    "nso_merged": (0.02, 0.05, 0.1),
}


@dataclass
class ExperimentArguments:
    """What is compared, over which seeds, and how (the other options go to the task's script unchanged)."""

    task: str = field(
        default="cot",
        metadata={"help": "cot: scripts/finetune_cot.py runs (strict accuracy); clip: scripts/pretrain_clip.py runs "
                  "(zero-shot accuracy).", "choices": list(TASKS)},
    )
    output_dir: str = field(default="outputs/experiment", metadata={"help": "Run folders and the results go here."})
    report_name: str = field(
        default="results",
        metadata={"help": "The report's file names: <name>.json, .md, .png. Two comparisons with other arms or budgets "
                  "can share one --output_dir (and every run they have in common) under two names."},
    )
    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={"help": f"Arms compared; must include none (the reference) and the --focus arm. Each is one of {METHODS}, "
                  "optionally on a perturbation schedule: nso@late0.75 (perturb_start 0.75), nso@every2 (perturb_every 2), "
                  "nso@late0.5@every2. A scheduled method is an arm of its own, with its own strength."},
    )
    focus: str = field(
        default="nso",
        metadata={"help": "The arm the pre-registered decision is about (compared with every other arm), e.g. nso@late0.75."},
    )
    seeds: list[int] = field(default_factory=lambda: list(range(10)), metadata={"help": "Test seeds (at least 2; 3 or more for an interval worth reading)."})
    budgets: list[str] = field(
        default_factory=lambda: list(BUDGETS),
        metadata={"help": "equal_compute (the primary budget) and/or equal_steps.", "choices": list(BUDGETS)},
    )
    steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps at equal steps (one-pass methods get 2x at equal compute); default: cot 200, clip 300."},
    )
    grid: list[str] = field(
        default_factory=list,
        metadata={"help": "Strength grids replacing the defaults, e.g. nso=0.003,0.01,0.03 sam=0.02,0.05."},
    )
    strengths: list[str] = field(
        default_factory=list, metadata={"help": "Fixed strengths, no selection run, e.g. nso=0.01 sam=0.05."}
    )
    start_grid: list[float] = field(
        default_factory=list,
        metadata={"help": "perturb_start values of the arm --methods writes as <method>@late (no fraction), e.g. "
                  "--methods none nso nso@late --start_grid 0.25 0.5 0.75: each runs once on the selection seed at the "
                  "strength chosen for <method>, and the start with the best --selection accuracy is the arm's (ties go "
                  "to the later start, the cheaper run)."},
    )
    selection_seed: int = field(default=1000, metadata={"help": "Seed of the selection runs (keep it out of --seeds)."})
    validation_sources: list[str] = field(
        default_factory=lambda: ["validation", "ood_validation"], metadata={"help": "Evaluation sources of the selection runs."}
    )
    test_sources: list[str] = field(default_factory=lambda: ["test", "ood"], metadata={"help": "Evaluation sources of the test runs."})
    selection: str = field(default="validation", metadata={"help": "The validation source whose accuracy picks each strength."})
    primary: str = field(default="test", metadata={"help": "The test source whose accuracy at equal compute is the primary metric."})
    run_config: str | None = field(
        default=None,
        metadata={"help": "The script's --config every run starts from (default: scripts/configs/cot_demo_tiny.yaml, "
                  "clip_compare.yaml with --task clip)."},
    )
    hessian_trace_probes: int = field(default=20, metadata={"help": "Hutchinson probes per test run."})
    top_eigenvalue_iterations: int = field(default=20, metadata={"help": "Power iterations per test run."})
    noise_stability_draws: int = field(default=10, metadata={"help": "Noise draws per test run (antithetic)."})
    noise_stability_sigma: float = field(default=0.01, metadata={"help": "Noise std of the noise-stability measure (absolute, on the trained weights)."})
    flatness_batches: int = field(default=2, metadata={"help": "Training batches the flatness measures use."})
    workers: int = field(default=2, metadata={"help": "Runs in parallel, one process (one thread) each; 0: all in this process."})
    launcher: str | None = field(
        default=None,
        metadata={"help": "Run each run as '<launcher> <the task's script> ...', one after another, e.g. "
                  "'accelerate launch --num_processes 8' on a GPU machine (--workers is then ignored)."},
    )
    quick: bool = field(default=False, metadata={"help": "A tiny end-to-end run in under a minute: checks the pipeline, proves nothing."})
    best_checkpoint: bool = field(
        default=False,
        metadata={"help": "Every test run scores --selection during training, --evaluations times, and ends on the "
                  "checkpoint with the best task accuracy there (the script's --load_best_model_at_end; checkpoints are "
                  "saved in the run's folder when the score improves, weights only, and deleted once its results are "
                  "written). The step the final weights came from and the evaluation seconds are reported per method."},
    )
    evaluations: int = field(
        default=10,
        metadata={"help": "Evaluations per test run with --best_checkpoint, every steps // N of the run's own steps: "
                  "at equal compute a longer run is evaluated as often, so every method chooses among as many checkpoints."},
    )
    validation_samples: int | None = field(
        default=None,
        metadata={"help": "Validation rows scored per evaluation of --best_checkpoint (the first N of --selection; "
                  "default all). Each evaluation generates an answer per row: this sets its cost."},
    )
    label_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction of training rows every run (selection and test) gets with a wrong label (the script's "
                  "--label_noise, seeded apart from the run seed: every run shares the rows)."},
    )
    robustness: bool = field(
        default=False,
        metadata={"help": "Every test run also scores its test sources after GGUF Q8_0 / Q4_0 round trips and under "
                  "weight noise (the script's --robustness); accuracies and drops are reported per method."},
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {list(TASKS)}, got {self.task!r}.")
        if self.steps is None:
            self.steps = TASKS[self.task].steps
        if self.quick:  # the whole pipeline in well under a minute (Task.quick_tokens): its numbers mean nothing
            self.steps, self.seeds = min(self.steps, 2), self.seeds[:2]
            self.hessian_trace_probes = min(self.hessian_trace_probes, 2)
            self.top_eigenvalue_iterations = min(self.top_eigenvalue_iterations, 2)
            self.noise_stability_draws = min(self.noise_stability_draws, 2)
            self.flatness_batches = 1
        late = [m for m in self.methods if m.endswith("@late") and m.count("@") == 1]
        if len(late) > 1 or bool(late) != bool(self.start_grid):
            raise ValueError(f"--start_grid goes with exactly one arm written <method>@late in --methods (its start is chosen "
                             f"on validation), got --methods {self.methods} and --start_grid {self.start_grid}.")
        self.late_arm = late[0] if late else None
        # one spelling per arm: "nso@late0.750" is nso@late0.75
        self.methods = [m if m == self.late_arm else Arm.parse(m).spec for m in self.methods]
        self.focus = self.focus if self.focus == self.late_arm else Arm.parse(self.focus).spec
        if self.late_arm:
            self._check_start_grid()
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods names an arm twice: {self.methods}.")
        if "none" not in self.methods or self.focus not in self.methods:
            raise ValueError(f"--methods must include none (the reference of the paired differences) and the --focus "
                             f"arm {self.focus}; got {self.methods}.")
        if self.focus == "none":
            raise ValueError("--focus must be an arm other than none (the reference).")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds needs at least 2 distinct seeds (a paired interval needs 2), got {self.seeds}.")
        if not self.report_name or os.sep in self.report_name or self.report_name.startswith("."):
            raise ValueError(f"--report_name must be a plain file name, got {self.report_name!r}.")
        if self.selection_seed in self.seeds:
            raise ValueError(f"--selection_seed {self.selection_seed} is also a test seed: keep selection and test runs apart.")
        if self.steps < 1 or self.workers < 0:
            raise ValueError(f"--steps must be >= 1 and --workers >= 0, got {self.steps} and {self.workers}.")
        if self.primary not in self.test_sources:
            raise ValueError(f"--primary {self.primary!r} is not one of --test_sources {self.test_sources}.")
        if self.selection not in self.validation_sources:
            raise ValueError(f"--selection {self.selection!r} is not one of --validation_sources {self.validation_sources}.")
        if set(self.test_sources) & set(self.validation_sources):
            raise ValueError("--test_sources and --validation_sources overlap: strengths would be chosen on test data.")
        if self.evaluations < 1:
            raise ValueError(f"--evaluations must be >= 1 (evaluations per test run with --best_checkpoint), got {self.evaluations}.")
        if self.validation_samples is not None and self.validation_samples < 1:
            raise ValueError(f"--validation_samples must be >= 1, got {self.validation_samples}: leave it unset to score every row.")
        check_label_noise(self.label_noise)  # the scripts' own check, before any run

    def _check_start_grid(self) -> None:
        """The late arm's method is compared and tuned, and every start is valid with a whole equal-compute step count."""
        method = self.late_method
        if method not in self.methods:
            raise ValueError(f"{self.late_arm} runs at the strength chosen for {method}: add {method} to --methods.")
        if len(set(self.start_grid)) != len(self.start_grid):
            raise ValueError(f"--start_grid names a start twice: {self.start_grid}.")
        arms = self.start_arms()  # NSOConfig's checks of each fraction
        if "equal_compute" in self.budgets:
            for arm in arms:
                equal_compute_steps(arm, self.steps, [arm if m == self.late_arm else m for m in self.methods])

    @property
    def late_method(self) -> str | None:
        """The method of the late arm ("nso" of nso@late), None without one."""
        return self.late_arm.partition("@")[0] if self.late_arm else None

    def start_arms(self) -> list[str]:
        """The late arm's spec at each start of --start_grid, in order (Arm.parse applies NSOConfig's checks)."""
        return [Arm.parse(f"{self.late_arm}{start!r}").spec for start in self.start_grid]

    def arm_methods(self) -> list[str]:
        """The method of every arm (the late arm's too, before its start is chosen)."""
        return [self.late_method if m == self.late_arm else method_of(m) for m in self.methods]


def parse_assignments(items: list[str], option: str) -> dict[str, list[float]]:
    """"method=v1,v2" items as {method: [v1, v2]}.

    Raises:
        ValueError: a malformed item, an unknown or untuned method, or a value that is not a finite number >= 0.
    """
    out: dict[str, list[float]] = {}
    for item in items:
        method, sep, values = item.partition("=")
        try:
            method = Arm.parse(method).spec
        except ValueError:
            method = ""
        if not sep or method_of(method or "none") not in STRENGTH_NAME:
            raise ValueError(f"{option}: {item!r} is not arm=value[,value...] with an arm of a method in {sorted(STRENGTH_NAME)}.")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{option}: {item!r} has a value that is not a number.") from None
        if not numbers or any(not (0 <= v < float("inf")) for v in numbers):
            raise ValueError(f"{option}: {item!r} needs finite values >= 0.")
        out[method] = numbers
    return out


def machine() -> str:
    """One line naming the machine the numbers come from."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only, {os.cpu_count()} cores"
    return f"{platform.platform()}; {device}; Python {platform.python_version()}, torch {torch.__version__}"


def select_strengths(
    validation: dict[str, dict], runs: list[Run], selection: str, task_name: str = "cot"
) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """Each method's strength with the best accuracy on `selection`; ties go to the weaker strength."""
    chosen: dict[str, float] = {}
    table: dict[str, list[dict]] = {}
    for run in runs:
        accuracies = TASKS[task_name].accuracies(validation[run.name])
        table.setdefault(run.method, []).append({"strength": run.strength, **accuracies})
    for method, rows in table.items():
        best = max(rows, key=lambda r: (r[selection], -r["strength"]))
        chosen[method] = best["strength"]
    return chosen, table


def select_start(
    validation: dict[str, dict], runs: list[Run], selection: str, task_name: str = "cot"
) -> tuple[str, list[dict]]:
    """The late arm (`runs`: one per start, same strength) with the best accuracy on `selection`; ties go to the
    later start (fewer perturbed steps, the cheaper run). Returns its spec and the table of starts."""
    table = [{"perturb_start": run.arm.perturb_start, "arm": run.method, **TASKS[task_name].accuracies(validation[run.name])}
             for run in runs]
    best = max(table, key=lambda r: (r[selection], r["perturb_start"]))
    return best["arm"], table


def strength_plan(args: ExperimentArguments) -> tuple[dict[str, list[float]], dict[str, float]]:
    """({method: grid} of the methods to tune, {method: strength} of those fixed by --strengths).

    Raises:
        ValueError: a malformed --grid / --strengths, a method not in --methods, or two fixed values.
    """
    fixed = parse_assignments(args.strengths, "--strengths")
    grids = parse_assignments(args.grid, "--grid")
    for option, given in (("--strengths", fixed), ("--grid", grids)):
        stray = [m for m in given if m not in args.methods]
        if stray:
            raise ValueError(f"{option} names {stray}, which --methods does not compare.")
    for method, values in fixed.items():
        if len(values) != 1:
            raise ValueError(f"--strengths: give one value for {method}, got {values}.")
    tuned = {
        m: grids.get(m, list(DEFAULT_GRIDS[method_of(m)]))
        for m in args.methods if m != args.late_arm and method_of(m) in STRENGTH_NAME and m not in fixed
    }
    if args.quick:  # one value per method: the selection step runs, with nothing to choose between
        tuned = {m: [v[len(v) // 2]] for m, v in tuned.items()}
    return tuned, {m: v[0] for m, v in fixed.items()}


def test_run_tokens(args: ExperimentArguments, task: Any, run: Run) -> list[str]:
    """A test run's options for --best_checkpoint and --robustness (the runner adds the checkpoint saves).

    With --best_checkpoint the run is evaluated every `run.steps // args.evaluations` steps (at least 1), on the
    first --validation_samples rows of --selection, by the task's accuracy.
    """
    tokens = []
    if args.best_checkpoint:
        every = max(1, run.steps // args.evaluations)
        tokens += ["--eval_strategy", "steps", "--eval_steps", str(every), "--load_best_model_at_end", "true",
                   "--metric_for_best_model", task.accuracy_key, "--validation_source", args.selection]
        if args.validation_samples is not None:
            tokens += ["--validation_samples", str(args.validation_samples)]
    if args.robustness:
        tokens += ["--robustness", "true"]
    return tokens


def compare_methods(args: ExperimentArguments, passthrough: list[str], command: str, script: str | None = None) -> dict[str, Any]:
    """Run the comparison and write `results.json`, `results.md` and `results.png` into `args.output_dir`.

    Args:
        args: what is compared and how.
        passthrough: the script's options shared by every run.
        command: the command line, for the report.
        script: the task's script path (needed with `args.launcher`, and by the clip task).
    """
    task = TASKS[args.task]
    base = (["--config", args.run_config] if args.run_config else []) + (list(task.quick_tokens) if args.quick else []) + passthrough
    if args.label_noise:  # the task itself: selection and test runs alike
        base += ["--label_noise", repr(args.label_noise)]
    # Parsed once, before any run, so a typo fails in a second, not an hour in.
    parsed = task.check([*base, "--output_dir", os.devnull], args.arm_methods(), script)
    flatness = [
        "--hessian_trace_probes", str(args.hessian_trace_probes), "--hessian_trace_batches", str(args.flatness_batches),
        "--top_eigenvalue_iterations", str(args.top_eigenvalue_iterations),
        "--noise_stability_draws", str(args.noise_stability_draws), "--noise_stability_sigma", repr(args.noise_stability_sigma),
    ]
    probe = Run("none", None, args.seeds[0], args.steps, "test")
    if test_run_tokens(args, task, probe):  # the test runs' own options must parse too (the runner adds the saves)
        tokens = run_tokens(probe, base, os.devnull, args.test_sources, flatness + test_run_tokens(args, task, probe))
        task.check(tokens, args.arm_methods(), script)
    tuned, fixed = strength_plan(args)
    workers = 0 if args.quick else args.workers  # tiny runs: starting a process would cost more than the run
    os.makedirs(args.output_dir, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)

    if workers or args.launcher:  # runs started side by side would each build what they share (the tiny base model)
        task.prepare(parsed)
    selection_runs = grid_runs(tuned, args.selection_seed, args.steps)
    validation = run_all(
        [(r, run_tokens(r, base, args.output_dir, args.validation_sources, [])) for r in selection_runs],
        args.output_dir, workers, args.launcher, script, task,
    )
    chosen, selection_table = select_strengths(validation, selection_runs, args.selection, task.name)
    # The arms of the test runs: --methods, with the late arm's start once chosen (args itself stays as given).
    methods, focus = list(args.methods), args.focus
    strengths: dict[str, float | None] = {m: None for m in methods}
    strengths.update(fixed)
    strengths.update(chosen)
    start_selection = None
    if args.late_arm:  # its starts, at the strength just chosen for its method
        sigma = strengths[args.late_method]
        start_runs = [Run(arm, sigma, args.selection_seed, args.steps, "validation") for arm in args.start_arms()]
        validation = run_all(
            [(r, run_tokens(r, base, args.output_dir, args.validation_sources, [])) for r in start_runs],
            args.output_dir, workers, args.launcher, script, task,
        )
        arm, rows = select_start(validation, start_runs, args.selection, task.name)
        start_selection = {"arm": args.late_arm, "strength": sigma, "starts": rows, "chosen": arm}

        def chosen_arm(m: str) -> str:
            return arm if m == args.late_arm else m

        methods, focus = [chosen_arm(m) for m in methods], chosen_arm(focus)
        strengths = {chosen_arm(m): v for m, v in strengths.items()} | {arm: sigma}
    print(f"[compare] strengths: {strengths}", flush=True)

    runs = comparison_runs(methods, strengths, args.seeds, args.steps, args.budgets)
    results = run_all(
        [(r, run_tokens(r, base, args.output_dir, args.test_sources, flatness + test_run_tokens(args, task, r))) for r in runs],
        args.output_dir, workers,
        args.launcher, script, task,
    )
    check_compute(runs, results, task)
    primary = f"accuracy_{args.primary}"
    tables, comparisons, sections = {}, {}, []
    budgets = [b for b in BUDGETS if b in args.budgets]
    for budget in budgets:
        tables[budget] = report.per_seed(runs, results, budget, methods, args.seeds, task)
        comparisons[budget] = report.comparisons(tables[budget], primary, focus=focus)
        steps = {m: args.steps if budget == "equal_steps" else equal_compute_steps(m, args.steps, methods) for m in methods}
        sections.append((budget, report.markdown(comparisons[budget], args.test_sources, strengths, steps, args.seeds, primary)))
    decisive = budgets[0]  # equal compute when it was run
    verdict = report.decision(comparisons[decisive]["focus_versus"], focus)
    out = {
        "command": command,
        "machine": machine(),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arguments": asdict(args),
        "passthrough": passthrough,
        "primary_metric": f"{task.accuracy} on {args.primary!r} at {decisive.replace('_', ' ')}",
        "decision_rule": DECISION_RULE,
        "decision": verdict,
        "focus": focus,
        "strengths": strengths,
        "selection": selection_table,
        "start_selection": start_selection,
        "per_seed": tables,
        "comparisons": comparisons,
        "runs": [r.to_dict() for r in runs],
    }
    with open(os.path.join(args.output_dir, f"{args.report_name}.json"), "w", encoding="utf-8") as handle:
        json.dump(out, handle, indent=1)
    text = render(out, sections, args)
    with open(os.path.join(args.output_dir, f"{args.report_name}.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    report.plot(tables, primary, os.path.join(args.output_dir, f"{args.report_name}.png"), task.accuracy)
    print("\n" + text, flush=True)
    return out


DECISION_RULE = (
    "The focus arm (NSO unless --focus names another) wins only if, at equal compute (at equal steps when only those were run), its seed-paired 95% "
    "t-interval of primary-accuracy difference against every other arm lies above 0; against an arm whose interval contains 0 it ties; below 0 it loses. "
    "Every other number is secondary."
)


def check_compute(runs: list[Run], results: dict[str, dict], task: Any) -> None:
    """Every test run made exactly the forward+backward passes its arm's schedule plans (compute is counted in them).

    Raises:
        RuntimeError: a run's recorded passes differ from the plan (its schedule did not apply as planned).
    """
    for run in runs:
        try:
            micro_batches, passes = task.compute(results[run.name])
        except KeyError:
            raise RuntimeError(f"{run.name}: its results record no forward+backward passes (an older version made the run): "
                               "delete its folder to run it again.") from None
        # passes per micro-batch slot x micro-batches per optimizer step
        planned = run.arm.passes(run.steps) * micro_batches
        if passes * run.steps != planned:
            raise RuntimeError(
                f"{run.name}: {passes} forward+backward passes recorded over {micro_batches} micro-batches, but "
                f"{run.arm.label} plans {run.arm.passes(run.steps)} per micro-batch slot over {run.steps} steps."
            )


def render(out: dict[str, Any], sections: list[tuple[str, str]], args: ExperimentArguments) -> str:
    """results.md: the rule first, then what was chosen, then the tables."""
    decisive = next(iter(out["comparisons"]))
    versus = out["comparisons"][decisive]["focus_versus"]
    late = out.get("start_selection")
    lines = [
        "# Method comparison", "",
        f"- Command: `{out['command']}`",
        f"- Machine: {out['machine']}",
        f"- Started {out['started']}, finished {out['finished']} (UTC)",
        f"- Seeds: {args.seeds} (n = {len(args.seeds)}: a 95% interval spans about ±{t_quantile(0.95, len(args.seeds) - 1):.1f} "
        "standard errors, so only large, consistent differences exclude 0)",
        f"- Primary metric (fixed before the runs): {out['primary_metric']}. {DECISION_RULE}",
        f"- **Decision: {out['decision']}**", "",
        f"{Arm.parse(out['focus']).label} minus each arm, primary metric at {decisive.replace('_', ' ')} (points, 95% t-interval):", "",
    ]
    lines += [f"- vs {Arm.parse(m).label}: {report.interval_text(d, 100.0)}" for m, d in versus.items()]
    derived = [late["chosen"]] if late else []  # the late arm runs at its method's chosen strength
    fixed = {m: v for m, v in out["strengths"].items() if v is not None and m not in out["selection"] and m not in derived}
    if fixed:
        lines += ["", "Strengths given, not selected: " + ", ".join(
            f"{Arm.parse(m).label} {STRENGTH_NAME[method_of(m)]} {v:g}" for m, v in fixed.items())]
    if out["selection"] or late:
        lines += ["", f"Strengths chosen on `{args.selection}` (seed {args.selection_seed}, {args.steps} steps each; "
                  f"{TASKS[args.task].accuracy}):", ""]
    for method, rows in out["selection"].items():
        values = ", ".join(f"{STRENGTH_NAME[method_of(method)]} {r['strength']:g}: {100 * r[args.selection]:.1f}%" for r in rows)
        lines.append(f"- {Arm.parse(method).label}: {values} -> **{out['strengths'][method]:g}**")
    if late:
        method = method_of(late["chosen"])
        values = ", ".join(f"start {r['perturb_start']:g}: {100 * r[args.selection]:.1f}%" for r in late["starts"])
        lines.append(f"- {method} late (its start, at {method}'s {STRENGTH_NAME[method]} {late['strength']:g}): {values} "
                     f"-> **{Arm.parse(late['chosen']).perturb_start:g}**")
    for budget, text in sections:
        lines += ["", f"## {budget.replace('_', ' ').capitalize()}", "", text]
    return "\n".join(lines) + "\n"


def main_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0]) or "compare_methods.py", *argv])
