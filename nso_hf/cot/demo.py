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
from typing import Any, Optional

from nso_hf.config import NSOConfig
from nso_hf.cot.arguments import CoTDataArguments, CoTScriptArguments, LoraArguments

# Sized to finish within 5 minutes on 2 CPU cores, pretraining included (about 1 minute, once).
DEMO_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "script": {"max_new_tokens": 72, "generation_batch_size": 100, "hessian_trace_probes": 20},
        "data": {"synthetic_num_train": 2000, "synthetic_num_eval": 200, "max_length": 192, "template": "plain"},
        "training": {"max_steps": 150, "per_device_train_batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 10},
        "lora": {"lora_r": 8, "lora_alpha": 16},
    },
    # A short run: 8 LoRA steps per method on the real 135M-parameter model, 16 evaluation problems.
    "smollm2": {
        "script": {"preset": "smollm2", "max_new_tokens": 64, "generation_batch_size": 16, "hessian_trace_probes": 0},
        "data": {"synthetic_num_train": 200, "synthetic_num_eval": 16, "max_length": 256, "template": "auto"},
        "training": {"max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 3e-4, "warmup_steps": 0},
        "lora": {"lora_r": 8, "lora_alpha": 16},
    },
}


def demo_arguments(method: str, preset: str, output_dir: str, cache_dir: Optional[str]) -> tuple:
    """The five argument objects of one demo run."""
    from transformers import TrainingArguments

    if preset not in DEMO_PRESETS:
        raise ValueError(f"Unknown demo preset {preset!r}; use one of {sorted(DEMO_PRESETS)}.")
    settings = DEMO_PRESETS[preset]
    script_args = CoTScriptArguments(
        base_model_cache_dir=cache_dir, save_final_model=False, **settings["script"]
    )
    data_args = CoTDataArguments(recipe="synthetic", **settings["data"])
    training_args = TrainingArguments(
        output_dir=os.path.join(output_dir, method),
        lr_scheduler_type="cosine",
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=False,  # Trainer's progress bar, and one with the running accuracy at evaluation
        **settings["training"],
    )
    return script_args, data_args, training_args, NSOConfig(method=method, sigma=0.01), LoraArguments(**settings["lora"])


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
    preset: str = "tiny",
    output_dir: str = "outputs/cot_demo",
    cache_dir: Optional[str] = None,
    methods: tuple[str, ...] = ("none", "nso"),
) -> list[dict[str, Any]]:
    """Run the comparison, print the table and write it to `output_dir/table.md`; returns each run's results."""
    import torch

    from nso_hf.cot.finetune import run_cot_finetune

    # One thread: the tiny model's matrices gain little from a second one, and when the cores are
    # shared with other work, two threads spin-wait: measured on 2 busy cores (load 5), a tiny-model
    # step took 1-4 s with 2 threads and 0.13 s with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if preset == "tiny" else threads)
    try:
        results = [run_cot_finetune(*demo_arguments(m, preset, output_dir, cache_dir)) for m in methods]
    finally:
        torch.set_num_threads(threads)
    table = format_table(results)
    print("\n" + table + "\n", flush=True)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    return results
