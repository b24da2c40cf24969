"""Per-step time and peak memory of every method of NSOTrainer against plain Trainer, in one run.

    python scripts/benchmark_step.py                 # what `make bench` runs
    python scripts/benchmark_step.py --steps 40 --hidden_size 512
    python scripts/benchmark_step.py --methods sam flat_lora --modes lora

Trainer and each method (NSOConfig(method=..., k=1, lam=0); docs/methods.md) run in this process on
the same tiny Llama-style model and data, for LoRA and full fine-tuning (flat_lora and nso_merged:
LoRA only); the step time is the median over `--steps` optimizer steps after `--warmup` steps (timed
from on_step_begin to on_step_end, so it includes the optimizer), the runs alternating in `--rounds`.
Peak memory: on CUDA, `max_memory_allocated` in this process; on CPU, the peak resident set size of
a fresh child process per run (Linux VmHWM), reported both in total and as growth over the RSS before
training. Printed as method/Trainer ratios. Two passes per step are the floor for nso, sam and asam,
one for rwp and flat_lora. The perturbation schedules (`--schedules`: a late phase, every n-th step)
of `--schedule_method` are timed the same way: the median of their plain steps and the median of their
perturbed steps, weighted by their shares, against the ratio they should cost, 1 + (passes - 1) x the
perturbed share of the timed steps, and their plain steps against Trainer's.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from transformers import (
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from nso_hf import NSOConfig, NSOTrainer
from nso_hf.config import MERGED_METHODS, METHODS
from nso_hf.experiment.plan import Arm
from nso_hf.schedule import is_perturbed_step
from nso_hf.timing import StepTimer


@dataclass
class BenchArguments:
    hidden_size: int = field(default=256, metadata={"help": "Width of the Llama-style model."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per example."})
    batch_size: int = field(default=16, metadata={"help": "Examples per step."})
    steps: int = field(default=20, metadata={"help": "Timed optimizer steps (the median is reported)."})
    warmup: int = field(default=3, metadata={"help": "Untimed steps first (allocator and caches warm up)."})
    rounds: int = field(
        default=2,
        metadata={"help": "Trainer and NSOTrainer alternate this many times; the medians pool all rounds (drift cancels)."},
    )
    modes: list[str] = field(default_factory=lambda: ["lora", "full"], metadata={"help": "lora and/or full."})
    methods: list[str] = field(
        default_factory=lambda: [m for m in METHODS if m != "none"],
        metadata={"help": f"Methods to compare with Trainer; any of {[m for m in METHODS if m != 'none']}."},
    )
    schedules: list[str] = field(
        default_factory=lambda: ["start=0.5", "start=0.75", "every=2", "every=4"],
        metadata={"help": "Perturbation schedules of --schedule_method to time as well: start=F (NSOConfig.perturb_start), "
                  "every=N (perturb_every), or both joined by a comma; none to skip."},
    )
    schedule_method: str = field(default="nso", metadata={"help": "The method the --schedules rows run."})
    sigma: float = field(default=0.01, metadata={"help": "Noise std (flat_lora, nso_merged: a fraction of the row RMS)."})
    rho: float = field(default=0.05, metadata={"help": "SAM / ASAM radius."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here."})
    child: str | None = field(
        default=None, metadata={"help": "Internal: run one 'method:mode:start:every' and print its memory."}
    )


def parse_schedule(method: str, text: str) -> Arm:
    """'start=0.75', 'every=2' or 'start=0.5,every=2' as an Arm of `method` (checked by NSOConfig)."""
    fields = {"start": 0.0, "every": 1}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--schedules: {text!r} is not start=F, every=N or both joined by a comma.")
        fields[key] = float(value) if key == "start" else int(value)
    NSOConfig(method=method, perturb_start=fields["start"], perturb_every=fields["every"])  # refuses bad values
    return Arm(method, fields["start"], fields["every"])


def build_model(bench: BenchArguments, lora: bool):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=bench.vocab_size,
        hidden_size=bench.hidden_size,
        intermediate_size=4 * bench.hidden_size,
        num_hidden_layers=bench.num_layers,
        num_attention_heads=max(bench.hidden_size // 64, 1),
        max_position_embeddings=bench.seq_len,
    )
    model = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def dataset(bench: BenchArguments) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    n = bench.batch_size * (bench.warmup + bench.steps)
    ids = torch.randint(0, bench.vocab_size, (n, bench.seq_len), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def run(bench: BenchArguments, row: Arm, mode: str) -> Trainer:
    """Train warmup + steps optimizer steps; the trainer carries the timed steps in `step_times`."""
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="nso-bench-"),
        per_device_train_batch_size=bench.batch_size,
        max_steps=bench.warmup + bench.steps,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    timer = StepTimer()
    kwargs = dict(model=build_model(bench, mode == "lora"), args=args, train_dataset=dataset(bench), callbacks=[timer])
    if row.method == "trainer":
        trainer = Trainer(**kwargs)
    else:
        config = NSOConfig(
            method=row.method, sigma=bench.sigma, rho=bench.rho, perturb_start=row.perturb_start, perturb_every=row.perturb_every
        )
        trainer = NSOTrainer(**kwargs, nso_config=config)
    trainer.remove_callback(PrinterCallback)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    trainer.step_times = timer.seconds[bench.warmup :]
    return trainer


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child_memory(bench: BenchArguments) -> None:
    """In a fresh process: peak RSS of one run, and its growth over the RSS before training."""
    method, mode, start, every = bench.child.split(":")
    before = _rss_mb("VmRSS")
    run(bench, Arm(method, float(start), int(every)), mode)
    print(json.dumps({"peak_mb": _rss_mb("VmHWM"), "before_mb": before}))


def cpu_memory(bench: BenchArguments, row: Arm, mode: str) -> dict[str, float]:
    small = [f"--{k}={v}" for k, v in (("hidden_size", bench.hidden_size), ("num_layers", bench.num_layers),
             ("vocab_size", bench.vocab_size), ("seq_len", bench.seq_len), ("batch_size", bench.batch_size),
             ("steps", 3), ("warmup", 1), ("sigma", bench.sigma), ("rho", bench.rho))]  # fmt: skip
    out = subprocess.run(
        [sys.executable, __file__, *small, "--child", f"{row.method}:{mode}:{row.perturb_start}:{row.perturb_every}"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_time_ratio(bench: BenchArguments, row: Arm) -> float:
    """1 + (passes - 1) x the perturbed share of the timed steps: the ratio if a pass cost what Trainer's pass costs."""
    config = NSOConfig(method=row.method, perturb_start=row.perturb_start, perturb_every=row.perturb_every)
    total = bench.warmup + bench.steps
    timed = range(bench.warmup, total)
    share = sum(is_perturbed_step(t, total, row.perturb_start, row.perturb_every) for t in timed) / len(timed)
    return 1 + (config.passes_per_micro_batch - 1) * share


def step_statistics(times: list[float], bench: BenchArguments, row: Arm) -> dict[str, float | None]:
    """The step time of a row: the median step; for a schedule, the medians of its plain and of its perturbed
    steps, weighted by their shares of the timed steps.

    A mean over two kinds of steps is pulled by every stall of a shared machine, and a median of a mixture
    is the median of whichever kind is more common; the median of each kind is neither.

    Args:
        times: the timed steps of every round, round after round (`--steps` per round).
        bench: the benchmark settings (warm-up steps, timed steps, rounds).
        row: the row timed (its schedule says which steps were perturbed).

    Returns:
        s_per_step (the step time compared with Trainer's), mean_s_per_step, and for a schedule
        plain_s_per_step and perturbed_s_per_step (None when the timed steps have none of that kind).
    """
    stats: dict[str, float | None] = {"s_per_step": statistics.median(times), "mean_s_per_step": statistics.mean(times)}
    if not row.scheduled:
        return stats
    total = bench.warmup + bench.steps
    perturbed = [is_perturbed_step(t, total, row.perturb_start, row.perturb_every) for t in range(bench.warmup, total)] * bench.rounds
    kinds = {
        "plain_s_per_step": [s for s, p in zip(times, perturbed, strict=True) if not p],
        "perturbed_s_per_step": [s for s, p in zip(times, perturbed, strict=True) if p],
    }
    stats.update({key: statistics.median(v) if v else None for key, v in kinds.items()})
    stats["s_per_step"] = sum(statistics.median(v) * len(v) for v in kinds.values() if v) / len(times)
    return stats


def main(bench: BenchArguments) -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    results = {"device": device, "settings": {k: v for k, v in asdict(bench).items() if k not in ("child", "output_json")}}
    bad = [m for m in (*bench.methods, bench.schedule_method) if m not in METHODS or m == "none"]
    if bad:
        raise ValueError(f"--methods and --schedule_method take {[m for m in METHODS if m != 'none']}, got {bad}.")
    schedules = [parse_schedule(bench.schedule_method, s) for s in bench.schedules if s != "none"]
    print(
        f"# NSOTrainer methods (k=1, lam=0, sigma={bench.sigma}, rho={bench.rho}) vs Trainer on {device}; "
        f"{bench.rounds} x {bench.steps} steps (each run after {bench.warmup} warm-up steps, the runs alternating). "
        "Time ratios of the median step; a schedule's step is the median of its plain steps and the median of its "
        "perturbed steps, weighted by their shares ('plain': its plain steps' median over Trainer's median). "
        "'expected': 1 + (passes - 1) x the perturbed share of the timed steps."
    )
    print(
        f"{'mode':<6}{'method':<22}{'s/step':>10}{'time ratio':>12}{'expected':>10}{'plain':>8}"
        f"{'peak-mem ratio':>16}{'growth ratio':>14}"
    )
    for mode in bench.modes:
        if mode not in ("lora", "full"):
            raise ValueError(f"--modes takes 'lora' and/or 'full', got {mode!r}")
        rows = [Arm("trainer")] + [Arm(m) for m in bench.methods if mode == "lora" or m not in MERGED_METHODS]
        rows += [r for r in schedules if mode == "lora" or r.method not in MERGED_METHODS]
        out: dict = {}
        times: dict[Arm, list[float]] = {r: [] for r in rows}
        for _ in range(bench.rounds):
            for row in times:
                trainer = run(bench, row, mode)
                times[row] += trainer.step_times
                del trainer
        for row in times:
            out[row] = step_statistics(times[row], bench, row)
            if torch.cuda.is_available():
                trainer = run(dataclasses.replace(bench, steps=2, warmup=1), row, mode)
                out[row]["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                out[row]["growth_mb"] = out[row]["peak_mb"]
                del trainer
            else:
                mem = cpu_memory(bench, row, mode)
                out[row]["peak_mb"] = mem["peak_mb"]
                out[row]["growth_mb"] = mem["peak_mb"] - mem["before_mb"]
        t = out[Arm("trainer")]
        for row in rows:
            n = out[row]
            n["time_ratio"] = n["s_per_step"] / t["s_per_step"]
            plain = n.get("plain_s_per_step")
            n["plain_step_ratio"] = None if plain is None else plain / t["s_per_step"]
            n["expected_time_ratio"] = None if row.method == "trainer" else expected_time_ratio(bench, row)
            n["peak_memory_ratio"] = n["peak_mb"] / t["peak_mb"]
            n["memory_growth_ratio"] = n["growth_mb"] / t["growth_mb"]
            expected = "" if n["expected_time_ratio"] is None else f"{n['expected_time_ratio']:.2f}"
            plain = "" if n["plain_step_ratio"] is None else f"{n['plain_step_ratio']:.2f}"
            print(
                f"{mode:<6}{row.label:<22}{n['s_per_step']:>10.4f}{n['time_ratio']:>12.3f}{expected:>10}{plain:>8}"
                f"{n['peak_memory_ratio']:>16.3f}{n['memory_growth_ratio']:>14.3f}"
            )
        results[mode] = {row.label: value for row, value in out.items()}
    if bench.output_json:
        with open(bench.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    (bench,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    child_memory(bench) if bench.child else main(bench)
