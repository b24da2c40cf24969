"""The embedded default of `scripts/finetune_cot.py`: Trainer vs NSOTrainer on a miniature CoT task.

A tiny Llama is pretrained on short synthetic arithmetic problems (1-2 steps; cached), then LoRA
adapters are fine-tuned on 2-3 step problems once with `Trainer` and once with `NSOTrainer`,
everything else identical (data, seed, steps, learning rate). Each run is scored by greedy
generation on held-out 2-3 step problems (in distribution) and 4-5 step problems (out of
distribution); the Hessian trace of the training loss over the adapters and the time per step
complete the table. The "smollm2" preset runs the same comparison, shortened, on the real
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import os
from typing import Any


def demo_arguments(method: str, config: str, output_dir: str, cache_dir: str | None) -> tuple:
    """The five argument objects of one demo run: the preset file, read as a user's `--config`."""
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


def run_cot_demo(
    config: str,
    output_dir: str = "outputs/cot_demo",
    cache_dir: str | None = None,
    methods: tuple[str, ...] = ("none", "nso"),
) -> list[dict[str, Any]]:
    """Run the comparison, print the table and write it to `output_dir/table.md`; returns each run's results.

    Args:
        config: the preset, a YAML file in the format of `--config` (scripts/configs/cot_demo_*.yaml).
        output_dir: one folder per method below it.
        cache_dir: where the tiny base model is cached (default: the script's own default).
        methods: the `--method` values compared.
    """
    import torch

    from nso_hf.cot.finetune import run_cot_finetune

    # One thread: the tiny model's matrices gain little from a second one, and when the cores are
    # shared with other work, two threads spin-wait: measured on 2 busy cores (load 5), a tiny-model
    # step took 1-4 s with 2 threads and 0.13 s with 1.
    runs = [demo_arguments(m, config, output_dir, cache_dir) for m in methods]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if runs[0][0].preset is None else threads)  # the tiny model: one thread
    try:
        results = [run_cot_finetune(*arguments) for arguments in runs]
    finally:
        torch.set_num_threads(threads)
    table = format_table(results)
    print("\n" + table + "\n", flush=True)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    return results
