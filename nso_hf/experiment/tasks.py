"""The tasks a comparison can run: each one a training script, run on the options the comparison builds.

- `cot`: `scripts/finetune_cot.py` (chain-of-thought fine-tuning; accuracy = strict exact match of
  the greedy answer).
- `clip`: `scripts/pretrain_clip.py` (contrastive pretraining; accuracy = zero-shot accuracy).

A task says how to parse a run's command line (before any run, so a typo fails at once), how to run it
in this process, where its results land and which numbers are compared. Both scripts take the same
run options (`--method`, `--seed`, `--max_steps`, `--output_dir`, `--eval_sources`, the flatness
options of `nso_hf.flatness.final`), so the plan and the runner are the same for both.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nso_hf.config import MERGED_METHODS


@dataclass(frozen=True)
class Task:
    """One comparable task.

    Attributes:
        name: `--task` value.
        script: the script file under scripts/.
        config: the comparison's default `--run_config` under scripts/configs/.
        results_file: the JSON a finished run leaves in its folder.
        accuracy: what the accuracy columns measure, in words.
        steps: the default optimizer steps at equal steps.
        quick_tokens: the run options of `--quick` (tiny data, tiny model: checks the plumbing only).
        accuracy_key: the key of the accuracy in each evaluation split's metrics (`eval` of the results).
        parse: command-line tokens (and the script path) -> parsed arguments; raises ValueError.
        run: parsed arguments -> the run's results dict.
        train_numbers: results -> (mean train loss, seconds per step, peak CUDA MiB or None).
        compute: results -> (micro-batches trained, forward+backward passes made) by the main process.
        label_noise: results -> what --label_noise changed ({"p", "seed", "rows", "rows_changed", ...}) or None.
        trains_lora: parsed arguments -> whether the runs train LoRA adapters (merged methods need them).
        prepare: parsed arguments -> None; builds, once, what runs started side by side would each build.
        modules: what a run imports (torch and transformers with them): the worker processes start with
            them imported (`runner.worker_context`).
    """

    name: str
    script: str
    config: str
    results_file: str
    accuracy: str
    steps: int
    quick_tokens: tuple[str, ...]
    accuracy_key: str
    parse: Callable[[list[str], str | None], Any]
    run: Callable[[Any], dict[str, Any]]
    train_numbers: Callable[[dict[str, Any]], tuple[float, float, float | None]]
    compute: Callable[[dict[str, Any]], tuple[int, int]]
    label_noise: Callable[[dict[str, Any]], dict[str, Any] | None]
    trains_lora: Callable[[Any], bool]
    prepare: Callable[[Any], None]
    modules: tuple[str, ...] = ()

    def accuracies(self, results: dict[str, Any]) -> dict[str, float]:
        """{evaluation source: accuracy in [0, 1]} of one run's results."""
        return {name: float(e[self.accuracy_key]) for name, e in results["eval"].items()}

    def check(self, tokens: list[str], methods: Sequence[str], script: str | None) -> Any:
        """Parse the shared run options once and refuse what no run could do; returns the parsed arguments.

        Raises:
            ValueError: bad options, or methods perturbing a merged LoRA weight without LoRA runs.
        """
        parsed = self.parse(tokens, script)
        merged = [m for m in methods if m in MERGED_METHODS]
        if merged and not self.trains_lora(parsed):
            raise ValueError(f"{merged} perturb the merged LoRA weight: they need LoRA runs (--full_finetune false, CoT task).")
        return parsed


# --------------------------------------------------------------------------------------------- cot
def _cot_parse(tokens: list[str], script: str | None) -> Any:
    from nso_hf.cli import parse_with_config
    from nso_hf.cot.arguments import make_parser

    return parse_with_config(make_parser(), tokens)[0]


def _cot_run(arguments: Any) -> dict[str, Any]:
    from nso_hf.cot.finetune import run_cot_finetune

    return run_cot_finetune(*arguments)


def _cot_prepare(parsed: Any) -> None:
    """Build (or find) the tiny default base model the runs share; a no-op for any other model."""
    from nso_hf.cot.models import resolve_model_source

    script_args = parsed[0]
    if script_args.model_name_or_path is None and script_args.preset is None:
        resolve_model_source(None, None, None, script_args.base_model_cache_dir, script_args.tiny_pretrain_steps)


def _cot_train_numbers(results: dict[str, Any]) -> tuple[float, float, float | None]:
    train = results["train"]
    return float(train["train_loss"]), float(train["seconds_per_step"]), train.get("peak_cuda_memory_mib")


# -------------------------------------------------------------------------------------------- clip
def _clip_script(script: str | None) -> Any:
    """scripts/pretrain_clip.py as a module: its own parse (with its default YAML) and main."""
    if script is None:
        raise ValueError("The clip task runs scripts/pretrain_clip.py: give its path.")
    spec = importlib.util.spec_from_file_location("pretrain_clip", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clip_parse(tokens: list[str], script: str | None) -> Any:
    parsed, explicit = _clip_script(script).parse(tokens)
    return (*parsed, explicit)


def _clip_run(arguments: Any) -> dict[str, Any]:
    from nso_hf.clip.cli import main

    (results,) = main(*arguments).values()  # a comparison's run names one --method
    return results


def _clip_train_numbers(results: dict[str, Any]) -> tuple[float, float, float | None]:
    return float(results["train_loss"]), float(results["seconds_per_step"]), results.get("peak_cuda_memory_mib")


TASKS = {
    "cot": Task(
        name="cot",
        script="finetune_cot.py",
        config="cot_demo_tiny.yaml",
        results_file="cot_results.json",
        accuracy="strict accuracy",
        steps=200,
        # A barely pretrained base model, a few steps, a few problems.
        quick_tokens=(
            "--tiny_pretrain_steps", "20", "--synthetic_num_train", "64", "--synthetic_num_eval", "8",
            "--max_new_tokens", "8", "--generation_batch_size", "8", "--per_device_train_batch_size", "4",
            "--logging_steps", "1",
        ),
        accuracy_key="exact_match",
        parse=_cot_parse,
        run=_cot_run,
        train_numbers=_cot_train_numbers,
        compute=lambda results: (results["train"]["micro_batches"], results["train"]["forward_backward_passes"]),
        label_noise=lambda results: results["data"].get("label_noise"),
        trains_lora=lambda parsed: not parsed[0].full_finetune,
        prepare=_cot_prepare,
        modules=("nso_hf.cot.finetune", "nso_hf.cot.models", "nso_hf.robustness"),
    ),
    "clip": Task(
        name="clip",
        script="pretrain_clip.py",
        config="clip_compare.yaml",
        results_file="eval_results.json",
        accuracy="zero-shot accuracy",
        steps=300,
        # 64 training images at 16 x 16 pixels, 16 evaluated per split.
        quick_tokens=(
            "--max_train_samples", "64", "--max_eval_samples", "16", "--image_size", "16",
            "--per_device_train_batch_size", "16", "--logging_steps", "1",
        ),
        accuracy_key="zero_shot_accuracy",
        parse=_clip_parse,
        run=_clip_run,
        train_numbers=_clip_train_numbers,
        compute=lambda results: (results["micro_batches"], results["forward_backward_passes"]),
        label_noise=lambda results: results.get("label_noise"),
        trains_lora=lambda parsed: False,  # no LoRA option in pretrain_clip.py
        prepare=lambda parsed: None,  # the digits and the tokenizer are built in each run, in a second
        modules=("nso_hf.clip.cli", "nso_hf.clip.build", "nso_hf.clip.pipeline", "nso_hf.robustness"),
    ),
}
