"""The embedded default of `scripts/finetune_cot.py` (`make demo`): Trainer vs NSOTrainer over 3 seeds.

A tiny Llama is pretrained on short synthetic arithmetic problems (1-2 steps; cached), then
fine-tuned (every weight) on 2-3 step problems with `Trainer` and with `NSOTrainer`, everything else
identical, for seeds 0, 1 and 2: a short run of `scripts/compare_methods.py` (none vs nso, equal
steps, NSO's sigma the one `make experiment` chose on the validation split). Each run is scored by
greedy generation on 1,000 held-out 2-3 step problems (in distribution) and 1,000 4-5 step problems
(out of distribution); the Hessian trace and the time per step complete the table. The summary
states the seed count and spread, and calls a difference whose interval contains 0 a tie.

The "smollm2" preset (`make demo-smollm2`) runs one seed of the same pair, shortened, on the real
SmolLM2-135M-Instruct (`run_methods_once`).
"""

from __future__ import annotations

import os
from typing import Any

# NSO's sigma in the demo: the value the validation sweep of `make experiment` selected (docs/results.md).
DEMO_SIGMA = 0.01
DEMO_SEEDS = (0, 1, 2)


def run_cot_demo(
    config: str,
    output_dir: str = "outputs/cot_demo",
    cache_dir: str | None = None,
    seeds: tuple[int, ...] = DEMO_SEEDS,
    sigma: float = DEMO_SIGMA,
    workers: int = 2,
) -> dict[str, Any]:
    """Compare none and nso over `seeds`, print the tables and a plain summary; returns the comparison.

    Args:
        config: the preset, a YAML file in the format of `--config` (scripts/configs/cot_demo_tiny.yaml).
        output_dir: the comparison's folder (results.md, results.json, results.png, one folder per run).
        cache_dir: where the tiny base model is cached (default ~/.cache/nso_hf).
        seeds: at least 2 (3 by default).
        sigma: NSO's sigma.
        workers: runs at a time, one process and one thread each.
    """
    from nso_hf.experiment.compare import ExperimentArguments, compare_methods

    args = ExperimentArguments(
        output_dir=output_dir, methods=["none", "nso"], seeds=list(seeds), strengths=[f"nso={sigma!r}"],
        budgets=["equal_steps"], run_config=config, top_eigenvalue_iterations=0, noise_stability_draws=0,
        workers=workers,
    )
    passthrough = [] if cache_dir is None else ["--base_model_cache_dir", cache_dir]
    print(f"[demo] Trainer vs NSOTrainer (sigma {sigma:g}) over seeds {list(seeds)}: {2 * len(seeds)} runs, "
          f"{workers or 1} at a time; each run's log is in {output_dir}/test/<run>/log.txt", flush=True)
    out = compare_methods(args, passthrough, "make demo")
    print(summary(out), flush=True)
    return out


def summary(out: dict[str, Any]) -> str:
    """Plain words for the primary comparison: seed count, spread, difference, interval, verdict."""
    primary = "accuracy_" + out["arguments"]["primary"]
    budget = next(iter(out["comparisons"]))
    comparison = out["comparisons"][budget]
    d = comparison["versus_reference"]["nso"][primary]
    spread = {m: comparison["summary"][m][primary]["std"] for m in ("none", "nso")}
    n = d["n"]
    verdict = {
        "higher": "NSO is ahead: the interval lies above 0",
        "lower": "NSO is behind: the interval lies below 0",
        "tie": "a tie: the interval contains 0, so this difference is within the seed-to-seed noise",
    }[d["verdict"]]
    return (
        f"\n[demo] {n} seeds. Seed-to-seed spread (std) of {out['arguments']['primary']} accuracy: "
        f"Trainer {100 * spread['none']:.1f} points, NSO {100 * spread['nso']:.1f} points.\n"
        f"[demo] NSO minus Trainer: {100 * d['mean']:+.1f} points, 95% t-interval [{100 * d['low']:+.1f}, "
        f"{100 * d['high']:+.1f}] (n = {n}): {verdict}.\n"
        "[demo] The full comparison, with RWP and SAM and strengths chosen on a validation split: make experiment; "
        "with LoRA and Flat-LoRA: make experiment-lora (docs/results.md)."
    )


def demo_arguments(method: str, config: str, output_dir: str, cache_dir: str | None) -> tuple:
    """The five argument objects of one run of `run_methods_once`: the preset file, read as a user's `--config`."""
    from nso_hf.cli import parse_with_config
    from nso_hf.cot.arguments import make_parser

    argv = ["--config", config, "--method", method, "--output_dir", os.path.join(output_dir, method)]
    if cache_dir is not None:
        argv += ["--base_model_cache_dir", cache_dir]
    arguments, _ = parse_with_config(make_parser(), argv)
    return arguments


def format_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table per method: strict accuracy per evaluation (the headline: a final-answer marker
    is required), the flexible one beside it, Hessian trace, seconds per step, mean training loss."""
    names = list(results[0]["eval"])
    header = (
        ["method"] + [f"accuracy {n}" for n in names] + [f"flexible {n}" for n in names]
        + ["Hessian trace (adapters)", "s/step", "mean train loss"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        trace = r["hessian_trace"]
        trace_text = "n/a" if trace is None else f"{trace['value']:.3g} ± {trace['stderr']:.2g}"
        evals = [r["eval"][n] for n in names]
        cells = (
            [r["method"]]
            + [f"{e['exact_match']:.3f} ({e['num_correct']}/{e['num_examples']})" for e in evals]
            + [f"{e['exact_match_flexible']:.3f}" for e in evals]
            + [trace_text, f"{r['train']['seconds_per_step']:.3f}", f"{r['train']['train_loss']:.4f}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_methods_once(
    config: str,
    output_dir: str = "outputs/cot_demo",
    cache_dir: str | None = None,
    methods: tuple[str, ...] = ("none", "nso"),
) -> list[dict[str, Any]]:
    """One run per method, one seed, in this process; prints the table and writes `output_dir/table.md`.

    One seed shows what a run produces, not whether the methods differ: the table says so.
    """
    import torch

    from nso_hf.cot.finetune import run_cot_finetune

    # One thread for the tiny model (measured on 2 busy cores: 0.13 s/step with 1 thread, 1-4 s with 2).
    runs = [demo_arguments(m, config, output_dir, cache_dir) for m in methods]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if runs[0][0].preset is None else threads)
    try:
        results = [run_cot_finetune(*arguments) for arguments in runs]
    finally:
        torch.set_num_threads(threads)
    table = format_table(results) + "\n\nOne seed: a difference between these rows may be seed-to-seed noise."
    print("\n" + table + "\n", flush=True)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    return results
