"""Time of one Hutchinson probe relative to one forward+backward pass, on a tiny Llama-style model.

A probe is one Hessian-vector product plus a dot product. With a fresh graph (several batches, or
`reuse_graph=False`) it is a forward, a backward that records its own graph, and a backward through
that graph; with one batch the library keeps the gradient graph, and later probes cost only the
last backward. Both are reported against a plain forward+backward (`torch.autograd.grad`) on the same
batch, as medians over repeats, all in eval mode with eager attention (the measurement's state).

Launch:
    python scripts/benchmark_flatness.py
    python scripts/benchmark_flatness.py --hidden_size 256 --num_layers 8 --repeats 30 --num_threads 1
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

from nso_hf.hvp import HessianOperator
from nso_hf.measurement import measurement_mode


@dataclass
class BenchmarkFlatnessArguments:
    """Model size, batch and repeats of the benchmark."""

    hidden_size: int = field(default=128, metadata={"help": "Width of the tiny Llama."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    vocab: int = field(default=512, metadata={"help": "Vocabulary size."})
    bench_batch_size: int = field(default=8, metadata={"help": "Sequences per batch."})
    seq_len: int = field(default=64, metadata={"help": "Tokens per sequence."})
    repeats: int = field(default=20, metadata={"help": "Timed repeats per operation (the median is reported)."})
    warmup: int = field(default=3, metadata={"help": "Untimed repeats first."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    bench_seed: int = field(default=0, metadata={"help": "Seed of the model and the batch."})


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn within every repeat.

    Interleaving makes a change of machine load (other processes on a shared CPU) hit every
    operation alike, so the ratios stay meaningful even when the absolute times drift.
    """
    def timed(fn: Callable[[], object]) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main(args: BenchmarkFlatnessArguments) -> dict[str, float]:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.bench_seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.seq_len, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, args.vocab, (args.bench_batch_size, args.seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    probe = [torch.randint(0, 2, p.shape, device=device).to(p.dtype) * 2 - 1 for p in params]

    with measurement_mode(model, params):

        def forward_backward() -> None:
            torch.autograd.grad(model(**batch).loss, params)

        fresh = HessianOperator(model, params, [batch], reuse_graph=False)
        reused = HessianOperator(model, params, [batch], reuse_graph=True)
        reused.matvec(probe)  # builds and keeps the graph

        def dot(hv: list[torch.Tensor]) -> float:
            return float(sum((h * z).sum() for h, z in zip(hv, probe)))

        medians = interleaved_medians(
            {
                "forward_backward": forward_backward,
                "probe_fresh": lambda: dot(fresh.matvec(probe)),
                "probe_reused": lambda: dot(reused.matvec(probe)),
            },
            args.repeats,
            args.warmup,
        )
        reused.release()
    t_fb, t_fresh, t_reused = medians["forward_backward"], medians["probe_fresh"], medians["probe_reused"]

    n = sum(p.numel() for p in params)
    print(
        f"tiny Llama: {n / 1e6:.2f}M parameters, hidden {args.hidden_size}, {args.num_layers} layers, "
        f"batch {args.bench_batch_size} x {args.seq_len} tokens, {device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"forward+backward:                         {t_fb * 1e3:8.1f} ms  (1.00x)")
    print(f"Hutchinson probe, fresh graph:            {t_fresh * 1e3:8.1f} ms  ({t_fresh / t_fb:.2f}x)")
    print(f"Hutchinson probe, reused graph (1 batch): {t_reused * 1e3:8.1f} ms  ({t_reused / t_fb:.2f}x)")
    return {"forward_backward_s": t_fb, "probe_fresh_s": t_fresh, "probe_reused_s": t_reused}


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(BenchmarkFlatnessArguments).parse_args_into_dataclasses(args=sys.argv[1:])
    main(parsed)
