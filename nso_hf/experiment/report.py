"""From run results to the comparison: per-seed metrics, mean ± std, paired differences, table and plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from nso_hf.experiment.plan import STRENGTH_NAME, Arm, Run
from nso_hf.experiment.statistics import paired_difference, summarize
from nso_hf.experiment.tasks import TASKS, Task

# (key, label, format) of the non-accuracy metrics, in table order.
OTHER_METRICS = (
    ("hessian_trace", "Hessian trace", "{:.3g}"),
    ("top_eigenvalue", "top eigenvalue", "{:.3g}"),
    ("noise_stability", "noise stability", "{:.3g}"),
    ("noise_stability_relative", "noise stab. / loss", "{:.3g}"),
    ("final_loss", "final train loss", "{:.4f}"),
    ("train_loss", "mean train loss", "{:.4f}"),
    ("seconds_per_step", "s/step", "{:.3f}"),
    ("forward_backward_passes", "passes", "{:.0f}"),
    ("peak_memory_mib", "peak MiB", "{:.0f}"),
)


def _value(entry: dict | None, key: str = "value") -> float:
    return float("nan") if entry is None else float(entry[key])


def run_metrics(results: dict[str, Any], task: Task = TASKS["cot"]) -> dict[str, float]:
    """The numbers one run is compared on: the task's accuracy per evaluation source, flatness, cost."""
    flat = results.get("flatness") or {}
    memory = results.get("peak_memory_mib")
    train_loss, seconds_per_step, _ = task.train_numbers(results)
    _, passes = task.compute(results)
    metrics = {f"accuracy_{name}": value for name, value in task.accuracies(results).items()}
    metrics.update(
        hessian_trace=_value(flat.get("hessian_trace")),
        top_eigenvalue=_value(flat.get("top_eigenvalue")),
        noise_stability=_value(flat.get("noise_stability")),
        noise_stability_relative=_value(flat.get("noise_stability"), "relative"),
        final_loss=float(flat.get("loss", float("nan"))),
        train_loss=train_loss,
        seconds_per_step=seconds_per_step,
        forward_backward_passes=float(passes),
        peak_memory_mib=float("nan") if memory is None else float(memory),
    )
    metrics.update(deployment_metrics(results, task))
    return metrics


# (key prefix, label) of the measures of a run made with --robustness, one column per evaluation source.
ROBUSTNESS_METRICS = (
    ("q8_0", "Q8_0 acc."), ("q4_0", "Q4_0 acc."), ("noise", "noise acc."),
    ("q8_0_drop", "Q8_0 drop"), ("q4_0_drop", "Q4_0 drop"), ("noise_drop", "noise drop"),
)
# (key, label, format) of how the final weights were chosen, what label noise changed, and what evaluating cost
# (apart from the training seconds of `seconds_per_step`).
SELECTION_METRICS = (
    ("best_step", "best step", "{:.0f}"),
    ("best_fraction", "best step / steps", "{:.2f}"),
    ("rows_relabelled", "rows relabelled", "{:.0f}"),
    ("eval_seconds", "validation eval s", "{:.1f}"),
    ("robustness_seconds", "robustness s", "{:.1f}"),
)


def deployment_metrics(results: dict[str, Any], task: Task = TASKS["cot"]) -> dict[str, float]:
    """The measures of the options a run was made with, only those it measured.

    - --robustness: `<measure>_<source>` (accuracy after the GGUF round trips and under weight noise, each drop
      from the run's clean accuracy) and `robustness_seconds`.
    - Evaluation during training: `best_step` (the step the final weights came from), `best_fraction` (that
      step over the run's steps) and `eval_seconds` (the validation scoring during training).
    - --label_noise p > 0: `rows_relabelled`.
    """
    metrics: dict[str, float] = {}
    robustness = results.get("robustness")
    if robustness:
        for source, row in robustness["sources"].items():
            metrics.update({f"{key}_{source}": float(row[key]) for key, _ in ROBUSTNESS_METRICS})
        metrics["robustness_seconds"] = float(robustness["seconds"])
    selection = results.get("selection")
    if selection:
        metrics["best_step"] = float(selection["final_weights_step"])
        metrics["best_fraction"] = float(selection["final_weights_step"]) / selection["last_step"]
        metrics["eval_seconds"] = float(selection["eval_seconds"])
    noise = task.label_noise(results)
    if noise and noise["p"] > 0:
        metrics["rows_relabelled"] = float(noise["rows_changed"])
    return metrics


def per_seed(
    runs: Sequence[Run], results: dict[str, dict], budget: str, methods: Sequence[str], seeds: Sequence[int], task: Task = TASKS["cot"]
) -> dict[str, dict[str, list[float]]]:
    """{method: {metric: [value per seed, in `seeds` order]}} of the test runs of `budget`."""
    table: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        rows = []
        for seed in seeds:
            (run,) = [r for r in runs if r.method == method and r.seed == seed and budget in r.budgets]
            rows.append(run_metrics(results[run.name], task))
        table[method] = {key: [row[key] for row in rows] for key in rows[0]}
    return table


def comparisons(table: dict[str, dict[str, list[float]]], primary: str, reference: str = "none", focus: str = "nso") -> dict[str, Any]:
    """Summaries per method and metric, each method's paired difference to `reference` on every metric,
    and `focus`'s paired difference to every other method on the primary metric."""
    summaries = {m: {k: summarize(v).to_dict() for k, v in metrics.items()} for m, metrics in table.items()}
    versus_reference = {
        m: {k: _paired(table[m][k], table[reference][k]) for k in table[m]}
        for m in table if m != reference and reference in table
    }
    versus_focus = {
        m: _paired(table[focus][primary], table[m][primary]) for m in table if m != focus and focus in table
    }
    return {"summary": summaries, "versus_reference": versus_reference, "focus_versus": versus_focus}


def _paired(a: list[float], b: list[float]) -> dict[str, Any] | None:
    if any(math.isnan(x) for x in (*a, *b)):
        return None
    return paired_difference(a, b).to_dict()


def decision(focus_versus: dict[str, dict], focus: str = "nso") -> str:
    """The pre-registered rule: arm `focus` wins only if its interval against every other arm lies above 0."""
    verdicts = {Arm.parse(m).label: d["verdict"] for m, d in focus_versus.items()}
    focus = Arm.parse(focus).label
    if verdicts and all(v == "higher" for v in verdicts.values()):
        return f"{focus} wins: its paired interval excludes 0 (above) against every other method."
    parts = [f"{'wins over' if v == 'higher' else 'loses to' if v == 'lower' else 'ties with'} {m}" for m, v in verdicts.items()]
    return f"{focus} does not win: it " + ", ".join(parts) + "."


def _cell(summary: dict, fmt: str, scale: float = 1.0) -> str:
    if math.isnan(summary["mean"]):
        return "n/a"
    std = "" if math.isnan(summary["std"]) else " ± " + fmt.format(summary["std"] * scale)
    return fmt.format(summary["mean"] * scale) + std


def interval_text(d: dict | None, scale: float = 1.0, fmt: str = "{:+.1f}") -> str:
    if d is None:
        return "n/a"
    if math.isnan(d["low"]):
        return fmt.format(d["mean"] * scale) + " (one seed: no interval)"
    return f"{fmt.format(d['mean'] * scale)} [{fmt.format(d['low'] * scale)}, {fmt.format(d['high'] * scale)}] {d['verdict']}"


def markdown(comparison: dict[str, Any], accuracy_names: Sequence[str], strengths: dict[str, float | None], steps: dict[str, dict[str, int]], seeds: Sequence[int], primary: str, reference: str = "none") -> str:
    """The tables of one budget: mean ± std over seeds, then paired differences to `reference`."""
    summary = comparison["summary"]
    n = len(seeds)
    accuracy = [(f"accuracy_{name}", f"acc. {name} (%)", "{:.1f}", 100.0) for name in accuracy_names]
    columns = accuracy + [(k, label, fmt, 1.0) for k, label, fmt in OTHER_METRICS]
    header = ["method", "strength", "steps"] + [c[1] for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, metrics in summary.items():
        strength = strengths.get(method)
        strength_text = "-" if strength is None else f"{STRENGTH_NAME[Arm.parse(method).method]} {strength:g}"
        cells = [Arm.parse(method).label, strength_text, str(steps[method])] + [_cell(metrics[k], f, s) for k, _, f, s in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Paired difference to `{reference}` (method minus {reference}, mean over {n} seeds, 95% t-interval, "
              f"t with {n - 1} degrees of freedom; accuracy in points):", ""]
    keys = [c for c in columns if c[0] in (primary, *(a[0] for a in accuracy), "hessian_trace", "top_eigenvalue",
                                           "noise_stability_relative", "final_loss")]
    header = ["method"] + [c[1] for c in keys]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, diffs in comparison["versus_reference"].items():
        cells = [Arm.parse(method).label] + [interval_text(diffs[k], s, "{:+.1f}" if s == 100.0 else "{:+.3g}") for k, _, _, s in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + deployment_markdown(comparison, accuracy_names, reference))


def deployment_markdown(comparison: dict[str, Any], accuracy_names: Sequence[str], reference: str = "none") -> list[str]:
    """The tables of the deployed-model measures and of checkpoint selection, label noise and evaluation cost,
    each as mean ± std over seeds and as paired differences to `reference`; none for measures not taken."""
    first = next(iter(comparison["summary"].values()))
    robustness = [(f"{key}_{name}", f"{label} {name}", "{:.1f}", 100.0) for name in accuracy_names
                  for key, label in ROBUSTNESS_METRICS if f"{key}_{name}" in first]
    selection = [(key, label, fmt, 1.0) for key, label, fmt in SELECTION_METRICS if key in first]
    lines: list[str] = []
    if robustness:
        lines += ["", "Deployed model: accuracy (%) after a GGUF round trip of every Linear weight (Q8_0, Q4_0) and under "
                  "Gaussian weight noise relative to each row's RMS, and the drop in points from the run's own clean "
                  "accuracy (positive: accuracy lost):", ""]
        lines += _tables(comparison, robustness, reference)
    if selection:
        lines += ["", "Checkpoint selection, label noise and evaluation cost: the step the final weights came from "
                  "(alone and over the run's steps), the training rows given a wrong label, and the seconds spent "
                  "scoring the validation rows during training and measuring robustness (neither is in s/step):", ""]
        lines += _tables(comparison, selection, reference)
    return lines


def _tables(comparison: dict[str, Any], columns: list[tuple[str, str, str, float]], reference: str) -> list[str]:
    """Mean ± std of `columns` (key, label, format, scale) per arm, then each arm's paired difference to `reference`."""
    header = ["method"] + [label for _, label, _, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, metrics in comparison["summary"].items():
        cells = [_cell(metrics[k], fmt, scale) for k, _, fmt, scale in columns]
        lines.append("| " + " | ".join([Arm.parse(method).label, *cells]) + " |")
    lines += ["", f"Paired difference to `{reference}` (method minus {reference}, 95% t-interval):", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, diffs in comparison["versus_reference"].items():
        cells = [interval_text(diffs[k], scale, fmt.replace("{:", "{:+")) for k, _, fmt, scale in columns]
        lines.append("| " + " | ".join([Arm.parse(method).label, *cells]) + " |")
    return lines


def plot(tables: dict[str, dict[str, dict[str, list[float]]]], primary: str, path: str, accuracy: str = "strict accuracy") -> None:
    """Primary accuracy against Hessian trace: one point per seed, one colour per method, a panel per budget.

    `accuracy` names what the task's accuracy measures (the y-axis label).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (budget, table) in zip(axes[0], tables.items()):
        for i, (method, metrics) in enumerate(table.items()):
            ax.scatter(metrics["hessian_trace"], [100 * a for a in metrics[primary]], label=Arm.parse(method).label,
                       color=colours[i % len(colours)], s=36, alpha=0.85)
        ax.set_xlabel("Hessian trace of the training loss (trained weights)")
        ax.set_ylabel(f"{primary.replace('accuracy_', accuracy + ', ')} (%)")
        ax.set_title(budget.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
