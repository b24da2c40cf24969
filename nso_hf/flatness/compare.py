"""Compare checkpoints' flatness: the arguments and the run of `scripts/measure_flatness.py`.

Each checkpoint is a full model folder (`save_pretrained`) or a peft adapter folder
(`adapter_config.json`; its base model is `--base_model` or the path the adapter names). For a
full model every parameter is measured; for an adapter, the adapters. All checkpoints are measured
on the same batches of text: `--data_file` (JSONL, or JSON list, of objects with `--text_field`),
or a small embedded default. `compare_checkpoints` writes `<report_dir>/flatness.json`
(`flatness_report` of each checkpoint) and `<report_dir>/landscape.png` (`plot_landscapes`).
"""


from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import HfArgumentParser

from nso_hf.cli import parse_with_config
from nso_hf.flatness.checkpoints import load_checkpoint
from nso_hf.flatness.hvp import HVP_METHODS
from nso_hf.flatness.plot import plot_landscapes
from nso_hf.flatness.report import ReportSettings, flatness_report

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

# Used when no --data_file is given: a few plain sentences, enough for two small batches.
DEFAULT_TEXTS = [
    "The cat sat on the warm mat and watched the rain.",
    "A train left the station at nine and arrived at noon.",
    "She added three apples to the five already in the basket.",
    "Water boils at one hundred degrees at sea level.",
    "The library opens early on weekdays and late on weekends.",
    "He walked twelve miles before the sun went down.",
    "Bright stars filled the sky above the quiet village.",
    "The recipe asks for two cups of flour and one egg.",
    "Every morning the baker lights the oven before dawn.",
    "Rivers carry sand from the mountains to the sea.",
    "The old clock in the hall strikes every hour.",
    "Four friends shared a pizza cut into eight slices.",
    "Snow covered the road, so the bus came late.",
    "The garden grows tomatoes, beans and sweet peppers.",
    "A small boat crossed the lake in twenty minutes.",
    "The teacher wrote the answer on the board.",
]


@dataclass
class MeasureFlatnessArguments:
    """What to measure, on which text, and how much work each measure gets."""

    checkpoints: list[str] = field(
        default_factory=list,
        metadata={"help": "Checkpoint folders: full models (save_pretrained) or peft adapter folders. At least one."},
    )
    labels: list[str] | None = field(
        default=None, metadata={"help": "A name per checkpoint for the JSON and the plot (default: folder names)."}
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Base model folder of adapter checkpoints (default: the adapter's base_model_name_or_path)."
        },
    )
    reference_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "W_init for the PAC-Bayes quantity: the pretrained model for full checkpoints, or an adapter "
            "folder saved at initialisation for adapters. Without it that entry is null."
        },
    )
    data_file: str | None = field(
        default=None,
        metadata={"help": "JSONL file, or JSON list, of objects with --text_field. Default: embedded sentences."},
    )
    text_field: str = field(default="text", metadata={"help": "Key of the text in each data object."})
    max_length: int = field(default=64, metadata={"help": "Tokens per text (longer texts are truncated)."})
    measure_batch_size: int = field(default=8, metadata={"help": "Texts per batch."})
    num_batches: int = field(
        default=2, metadata={"help": "Batches the loss is averaged over (each measure's cost grows linearly with it)."}
    )
    num_probes: int = field(default=50, metadata={"help": "Hutchinson probes for the Hessian trace."})
    max_iter: int = field(default=50, metadata={"help": "Most power iterations per eigenvalue."})
    top_n: int = field(default=1, metadata={"help": "Number of top eigenvalues (deflation)."})
    noise_sigma: float = field(default=0.01, metadata={"help": "Standard deviation of the noise for noise stability."})
    num_draws: int = field(default=20, metadata={"help": "Noise draws for noise stability (2 forward passes each)."})
    landscape_radius: float = field(
        default=1.0,
        metadata={"help": "Landscape range [-r, r]; 1 moves every filter by its own norm (Li et al. 2018)."},
    )
    curve_points: int = field(default=21, metadata={"help": "Points of the 1-D curve."})
    surface_points: int = field(default=0, metadata={"help": "Points per axis of a 2-D surface (0: none)."})
    direction_seed: int = field(default=0, metadata={"help": "Seed of probes, noise and landscape directions."})
    hvp: str = field(
        default="auto",
        metadata={
            "help": "Hessian-vector product: finite_difference (2 forward+backward passes, any attention kernel), "
            "exact (double backward, eager attention), auto (finite differences unless the weights are 16-bit).",
            "choices": list(HVP_METHODS),
        },
    )
    measure_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the checkpoints are loaded in for the measurement.", "choices": list(DTYPES)},
    )
    report_dir: str = field(default="outputs/flatness", metadata={"help": "Folder of flatness.json and landscape.png."})

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("--checkpoints: give at least one checkpoint folder.")
        if self.labels is not None and len(self.labels) != len(self.checkpoints):
            raise ValueError(f"--labels: {len(self.labels)} labels for {len(self.checkpoints)} checkpoints.")
        if self.measure_dtype not in DTYPES:
            raise ValueError(f"--measure_dtype {self.measure_dtype!r} is not one of {list(DTYPES)}.")
        if self.hvp not in HVP_METHODS:
            raise ValueError(f"--hvp {self.hvp!r} is not one of {list(HVP_METHODS)}.")
        for name in ("max_length", "measure_batch_size", "num_batches", "num_probes", "max_iter", "top_n", "num_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.curve_points < 2 or self.surface_points == 1 or self.surface_points < 0:
            raise ValueError("--curve_points must be >= 2 and --surface_points 0 or >= 2.")


def make_parser() -> HfArgumentParser:
    """The parser of `scripts/measure_flatness.py`."""
    return HfArgumentParser(MeasureFlatnessArguments)


def parse(argv: list[str]) -> MeasureFlatnessArguments:
    """Parse `[--config file.yaml] [--name value ...]`: defaults < YAML < command line."""
    (args,), _ = parse_with_config(make_parser(), argv)
    return args


def read_texts(path: str | None, text_field: str) -> list[str]:
    """Texts of a JSONL file or JSON list (objects with `text_field`, or plain strings); default sentences."""
    if path is None:
        return list(DEFAULT_TEXTS)
    with open(path) as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = json.load(f)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list of objects (JSON) or one object per line (JSONL).")
    texts = [r if isinstance(r, str) else r.get(text_field) for r in rows]
    if any(not isinstance(t, str) for t in texts):
        raise ValueError(f"{path}: every row needs a string under {text_field!r} (see --text_field).")
    return texts


def text_batches(tokenizer: Any, texts: list[str], batch_size: int, num_batches: int, max_length: int) -> list[dict]:
    """Padded causal-LM batches; padding is masked out of the labels (-100)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(num_batches):
        chunk = texts[i * batch_size : (i + 1) * batch_size]
        if not chunk:
            break
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def compare_checkpoints(args: MeasureFlatnessArguments) -> dict:
    """Measure every checkpoint on the same batches; write flatness.json and landscape.png.

    Args:
        args: the parsed arguments.

    Returns:
        {"settings", "checkpoints": [entry, ...], "plot"}, as written to `<report_dir>/flatness.json`.
    """
    dtype = DTYPES[args.measure_dtype]
    settings = ReportSettings(
        num_probes=args.num_probes, max_iter=args.max_iter, top_n=args.top_n, sigma=args.noise_sigma,
        num_draws=args.num_draws, radius=args.landscape_radius, curve_points=args.curve_points,
        surface_points=args.surface_points, seed=args.direction_seed, hvp=args.hvp,
    )
    texts = read_texts(args.data_file, args.text_field)
    init = None
    if args.reference_checkpoint is not None:
        reference, _, _ = load_checkpoint(args.reference_checkpoint, args.base_model, dtype)
        init = {n: p.detach().cpu() for n, p in reference.named_parameters()}
        del reference
    labels = args.labels or [os.path.basename(os.path.normpath(c)) for c in args.checkpoints]
    entries = []
    for path, label in zip(args.checkpoints, labels):
        model, tokenizer, kind = load_checkpoint(path, args.base_model, dtype)
        batches = text_batches(tokenizer, texts, args.measure_batch_size, args.num_batches, args.max_length)
        report = flatness_report(model, batches, settings, init=init)
        entries.append({"label": label, "checkpoint": path, "kind": kind, "num_batches": len(batches), **report})
        print(
            f"{label}: loss {report['loss']:.4f}  trace {report['hessian_trace']['value']:.4g} "
            f"+- {report['hessian_trace']['stderr']:.2g}  top eigenvalue {report['top_eigenvalues']['values'][0]:.4g}  "
            f"noise stability {report['noise_stability']['value']:.4g}"
        )
        del model
    os.makedirs(args.report_dir, exist_ok=True)
    plot_path = os.path.join(args.report_dir, "landscape.png")
    plot_landscapes(entries, plot_path)
    result = {"settings": asdict(args), "checkpoints": entries, "plot": plot_path}
    with open(os.path.join(args.report_dir, "flatness.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.join(args.report_dir, 'flatness.json')} and {plot_path}")
    return result

