"""Flatness of one or more causal-LM checkpoints: every measure in a JSON, loss landscapes in a PNG.

Each checkpoint is a full model folder (`save_pretrained`) or a peft adapter folder
(`adapter_config.json`; its base model is `--base_model` or the path the adapter names). For a
full model every parameter is measured; for an adapter, the adapters. All checkpoints are measured
on the same batches of text: `--data_file` (JSONL, or JSON list, of objects with `--text_field`),
or a small embedded default. Writes `<report_dir>/flatness.json` (Hessian trace with its standard
error, top eigenvalues, noise stability, loss, the loss along a random filter-normalised direction,
and with `--reference_checkpoint` the PAC-Bayes quantity sum_l v_l^T H_l v_l, v = W - W_reference)
and `<report_dir>/landscape.png` (the 1-D curves of all checkpoints on one plot; with
`--surface_points N` also a contour of each checkpoint's 2-D surface).

Launch:
    python scripts/measure_flatness.py --checkpoints outputs/trainer outputs/nso --labels Trainer NSO
    python scripts/measure_flatness.py --checkpoints outputs/lora_nso --base_model my_base \
        --reference_checkpoint outputs/lora_init --data_file data.jsonl --surface_points 11
    python scripts/measure_flatness.py --config flatness.yaml        # YAML keys = argument names
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from nso_hf.cli import parse_with_config
from nso_hf.flatness_report import ReportSettings, flatness_report

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
    labels: Optional[list[str]] = field(
        default=None, metadata={"help": "A name per checkpoint for the JSON and the plot (default: folder names)."}
    )
    base_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "Base model folder of adapter checkpoints (default: the adapter's base_model_name_or_path)."
        },
    )
    reference_checkpoint: Optional[str] = field(
        default=None,
        metadata={
            "help": "W_init for the PAC-Bayes quantity: the pretrained model for full checkpoints, or an adapter "
            "folder saved at initialisation for adapters. Without it that entry is null."
        },
    )
    data_file: Optional[str] = field(
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
        for name in ("max_length", "measure_batch_size", "num_batches", "num_probes", "max_iter", "top_n", "num_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.curve_points < 2 or self.surface_points == 1 or self.surface_points < 0:
            raise ValueError("--curve_points must be >= 2 and --surface_points 0 or >= 2.")


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(MeasureFlatnessArguments)


def parse(argv: list[str]) -> MeasureFlatnessArguments:
    """Parse `[--config file.yaml] [--name value ...]`: defaults < YAML < command line."""
    (args,), _ = parse_with_config(make_parser(), argv)
    return args


def read_texts(path: Optional[str], text_field: str) -> list[str]:
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


def load_checkpoint(path: str, base_model: Optional[str], dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) for a full model folder or a peft adapter folder (adapters made trainable)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Eager attention: SDPA and flash attention have no double backward (the library would switch it too).
    load = dict(attn_implementation="eager", dtype=dtype)
    adapter_config = os.path.join(path, "adapter_config.json")
    if not os.path.exists(adapter_config):
        model = AutoModelForCausalLM.from_pretrained(path, **load).to(device)
        return model, AutoTokenizer.from_pretrained(path), "full"
    from peft import PeftModel

    with open(adapter_config) as f:
        base_path = base_model or json.load(f).get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"{path} is an adapter without base_model_name_or_path: pass --base_model.")
    base = AutoModelForCausalLM.from_pretrained(base_path, **load)
    model = PeftModel.from_pretrained(base, path, is_trainable=True).to(device)
    has_tokenizer = any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(path if has_tokenizer else base_path), "adapter"


def plot_landscapes(entries: list[dict], path: str) -> None:
    """1-D curves of every checkpoint on one axis; a contour per checkpoint that has a 2-D surface."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    surfaces = [e for e in entries if e["landscape_2d"] is not None]
    fig, axes = plt.subplots(1, 1 + len(surfaces), figsize=(5.5 * (1 + len(surfaces)), 4.2), squeeze=False)
    ax = axes[0][0]
    for e in entries:
        ax.plot(e["landscape_1d"]["alphas"], e["landscape_1d"]["losses"], marker=".", label=e["label"])
    ax.set_xlabel("step along a random filter-normalised direction")
    ax.set_ylabel("loss")
    ax.set_title("Loss landscape (1-D)")
    ax.legend()
    for ax, e in zip(axes[0][1:], surfaces):
        s = e["landscape_2d"]
        z = torch.tensor(s["losses"]).T.numpy()  # contour wants z[beta index, alpha index]
        contour = ax.contour(s["alphas"], s["betas"], z, levels=15)
        ax.clabel(contour, fontsize=7)
        ax.set_title(f"{e['label']} (2-D)")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: MeasureFlatnessArguments) -> dict:
    dtype = DTYPES[args.measure_dtype]
    settings = ReportSettings(
        num_probes=args.num_probes, max_iter=args.max_iter, top_n=args.top_n, sigma=args.noise_sigma,
        num_draws=args.num_draws, radius=args.landscape_radius, curve_points=args.curve_points,
        surface_points=args.surface_points, seed=args.direction_seed,
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


if __name__ == "__main__":
    main(parse(sys.argv[1:]))
