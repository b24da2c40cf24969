"""Time and peak memory of one Hutchinson probe against one forward+backward, each in its own process.

A probe is one Hessian-vector product plus a dot product, on a Llama built from a `LlamaConfig`
with random weights (default: a 32k vocabulary, the size that makes the double-backward product
expensive, and a small width so that it runs on a CPU). Operations, one process each:
- `forward_backward`: `torch.autograd.grad` of the loss, the reference;
- `probe_finite_difference`: the default product, two forward+backward passes at W +- eps z, run
  under the model's own attention (SDPA);
- `probe_exact`: the double-backward product with a fresh graph (a forward, a backward that records
  its graph, a backward through it), eager attention;
- `probe_exact_reused`: the same with the gradient graph kept between probes (one batch only).
Each process first runs its operation alone and records its peak memory (CPU: the peak resident set
size, also reported above the process's size once the model and batch are built; CUDA:
`max_memory_allocated`), then times it interleaved with a plain forward+backward in the same state;
the time ratio is the median over repeats of the ratio of the two neighbouring timings, so it
compares two operations of one process under the same machine load. All in eval mode, inside one
`nso_hf.flatness.Measurement`.

`--operation accuracy` measures instead the relative error ||Hv - H_ref v|| / ||H_ref v|| of one
product per probe, H_ref v the exact product on a float64 copy of the same model: the
finite-difference and the exact product with float32 and with bfloat16 weights.

Launch:
    python scripts/benchmark_flatness.py                      # all operations, one process each
    python scripts/benchmark_flatness.py --num_threads 1 --seq_len 128
    python scripts/benchmark_flatness.py --operation probe_finite_difference   # one, in this process
    python scripts/benchmark_flatness.py --operation accuracy --vocab 512 --num_probes 4
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

from nso_hf.flatness import Measurement, hessian_operator

OPERATIONS = ("forward_backward", "probe_finite_difference", "probe_exact", "probe_exact_reused")


@dataclass
class BenchmarkFlatnessArguments:
    """Model size, batch, repeats, and which operation to run."""

    hidden_size: int = field(default=64, metadata={"help": "Width of the Llama."})
    num_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    vocab: int = field(default=32000, metadata={"help": "Vocabulary size (the logits dominate memory and time)."})
    bench_batch_size: int = field(default=8, metadata={"help": "Sequences per batch."})
    seq_len: int = field(default=64, metadata={"help": "Tokens per sequence."})
    repeats: int = field(default=10, metadata={"help": "Timed repeats per operation (the median is reported)."})
    warmup: int = field(default=2, metadata={"help": "Untimed repeats first (they also set the peak memory)."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    bench_seed: int = field(default=0, metadata={"help": "Seed of the model, the batch and the probes."})
    operation: str = field(
        default="all",
        metadata={"help": "all: every operation, each in its own process; or one of them, here.",
                  "choices": ["all", "accuracy", *OPERATIONS]},
    )
    num_probes: int = field(default=3, metadata={"help": "Probes of --operation accuracy."})
    relative_step: float = field(
        default=0.0, metadata={"help": "--operation accuracy: s of the finite-difference step (0: sqrt(machine eps))."}
    )
    json_out: str = field(default="", metadata={"help": "Write this process's result to this JSON file."})


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function in every repeat, the functions timed in turn within a repeat.

    Interleaving makes a change of machine load (other processes on a shared CPU) hit neighbouring
    timings alike: the ratio of the two timings of one repeat is what the report takes the median of.
    """

    def timed(fn: Callable[[], object]) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def current_rss_mb() -> float:
    """This process's resident set size now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss is in kB on Linux), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args: BenchmarkFlatnessArguments, device: str) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    torch.manual_seed(args.bench_seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.seq_len, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, args.vocab, (args.bench_batch_size, args.seq_len), device=device)
    return model, {"input_ids": ids, "labels": ids}


def measure_one(args: BenchmarkFlatnessArguments) -> dict[str, float | str]:
    """Peak memory of `args.operation` alone, then its time interleaved with a forward+backward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, batch = build(args, device)
    hvp = {"probe_finite_difference": "finite_difference"}.get(args.operation, "exact")
    with Measurement(model, [batch]) as m:
        if args.operation != "forward_backward":
            op = hessian_operator(m, hvp, reuse_graph=args.operation == "probe_exact_reused")
            gens: dict = {}
            probe = m.random_vector(gens, args.bench_seed, "rademacher", op.probe_dtype)

        def forward_backward() -> None:
            torch.autograd.grad(model(**batch).loss, m.params)

        def run() -> None:
            if args.operation == "forward_backward":
                forward_backward()
            else:
                m.dot(probe, op.matvec(probe))

        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            base = current_rss_mb()
        for _ in range(args.warmup + 2):
            run()
        peak = (torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else peak_rss_mb()
        times = interleaved_times({"operation": run, "forward_backward": forward_backward}, args.repeats)
        attention = model.config._attn_implementation  # the kernel both timed operations ran with
        if args.operation != "forward_backward":
            op.release()
    return {
        "operation": args.operation, "device": device, "threads": torch.get_num_threads(),
        "parameters": m.num_parameters, "attention": attention,
        "memory": "max_memory_allocated" if device == "cuda" else "peak RSS",
        "base_mb": base, "peak_mb": peak,
        "time_s": statistics.median(times["operation"]),
        "forward_backward_s": statistics.median(times["forward_backward"]),
        # Median over repeats of (operation / forward+backward) within the repeat: robust to load drift.
        "ratio": statistics.median(t / f for t, f in zip(times["operation"], times["forward_backward"])),
    }


def accuracy(args: BenchmarkFlatnessArguments) -> dict[str, list[float]]:
    """Relative error of each product against the exact product of a float64 copy, per probe."""
    import copy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, batch = build(args, device)
    reference = copy.deepcopy(model).double()
    with Measurement(reference, [batch]) as m:
        gens: dict = {}
        probes = [m.random_vector(gens, args.bench_seed, "rademacher", torch.float64) for _ in range(args.num_probes)]
        exact = hessian_operator(m, "exact")
        targets = [exact.matvec(z) for z in probes]
    errors: dict[str, list[float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = copy.deepcopy(model).to(dtype)
        for hvp in ("finite_difference", "exact"):
            with Measurement(weights, [batch]) as m:
                op = hessian_operator(m, hvp, relative_step=args.relative_step or None)
                key = f"{hvp} {str(dtype).removeprefix('torch.')}"
                errors[key] = []
                for z, target in zip(probes, targets):
                    hv = op.matvec([t.to(op.vector_dtype or dtype) for t in z])
                    diff = m.norm([h.double() - t for h, t in zip(hv, target)])
                    errors[key].append(diff / m.norm(target))
    print(
        f"Llama: vocab {args.vocab}, hidden {args.hidden_size}, {args.num_layers} layers, batch "
        f"{args.bench_batch_size} x {args.seq_len}; relative error of Hv per Rademacher probe against the exact "
        f"product in float64 (finite-difference step s = {args.relative_step or 'sqrt(machine eps)'}):"
    )
    for key, values in errors.items():
        print(f"{key:28s} " + "  ".join(f"{v:.1e}" for v in values))
    return errors


def run_all(args: BenchmarkFlatnessArguments) -> list[dict]:
    """Every operation in its own Python process (a peak memory is a process's high-water mark)."""
    results = []
    for operation in OPERATIONS:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            argv = [sys.executable, os.path.abspath(__file__), "--operation", operation, "--json_out", out]
            for f in fields(BenchmarkFlatnessArguments):
                if f.name not in ("operation", "json_out", "num_probes", "relative_step"):
                    argv += [f"--{f.name}", str(getattr(args, f.name))]
            subprocess.run(argv, check=True)
            with open(out) as handle:
                results.append(json.load(handle))
    return results


def report(results: list[dict], args: BenchmarkFlatnessArguments) -> None:
    ref = next(r for r in results if r["operation"] == "forward_backward")
    first = results[0]
    print(
        f"Llama: {first['parameters'] / 1e6:.2f}M parameters, vocab {args.vocab}, hidden {args.hidden_size}, "
        f"{args.num_layers} layers, batch {args.bench_batch_size} x {args.seq_len} tokens, {first['device']}, "
        f"{first['threads']} threads, median of {args.repeats}; one process per operation"
    )
    print(
        f"{'operation':26s} {'attention':9s} {'time':>9s} {'x fwd+bwd':>10s}   "
        f"{first['memory'] + ' MB':>16s} {'x':>6s}   {'above base MB':>13s} {'x':>6s}"
    )
    for r in results:
        above, ref_above = r["peak_mb"] - r["base_mb"], ref["peak_mb"] - ref["base_mb"]
        print(
            f"{r['operation']:26s} {r['attention']:9s} {r['time_s'] * 1e3:7.1f}ms "
            f"{r['ratio']:9.2f}x   "
            f"{r['peak_mb']:16.0f} {r['peak_mb'] / ref['peak_mb']:5.2f}x   {above:13.0f} {above / ref_above:5.2f}x"
        )
    print(
        "time: median; x fwd+bwd: median over repeats of the ratio to a forward+backward timed right after it in the "
        "same process (the forward_backward row compares two of them: the noise level); memory ratios: against the "
        "forward_backward process (peak, and peak above the size once the model and batch are built)."
    )


def main(args: BenchmarkFlatnessArguments) -> list[dict] | dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.operation == "accuracy":
        return accuracy(args)
    if args.operation != "all":
        result = measure_one(args)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f)
        else:
            print(json.dumps(result, indent=2))
        return result
    results = run_all(args)
    report(results, args)
    return results


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(BenchmarkFlatnessArguments).parse_args_into_dataclasses(args=sys.argv[1:])
    main(parsed)
