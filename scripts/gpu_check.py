"""What only a GPU can check, in one run on one GPU (goal: under 8 minutes on an H100).

    python scripts/gpu_check.py --output_dir gpu_check          # writes gpu_check.md and gpu_check.json

1. precision: bf16 and fp16 (autocast; fp16 with Trainer's GradScaler): sigma = 0 equals Trainer,
   a step at sigma > 0 restores W bit for bit, and a forced fp16 overflow skips the same steps with
   the same scales as Trainer (the passes share one scale and the gradient is unscaled once).
2. engines: FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on one GPU, through `tests/engine_worker.py` (the
   scenarios of the CPU suite: sigma = 0 equals Trainer, steps at W, noise reaches the forward,
   resume). DeepSpeed must be importable (a wheel built with DS_BUILD_OPS=0 travels well).
3. speed: time per optimizer step and peak `torch.cuda.max_memory_allocated` of every method
   against plain Trainer, same process, on a randomly initialised model of SmolLM2-135M's shape
   (LoRA and full fine-tuning, bf16).

`--device cpu --tiny` runs sections 1 and 3 on a tiny model on CPU (bf16 only): a smoke test of the
script itself, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from nso_hf import NSOConfig, NSOTrainer
from nso_hf.config import METHODS, config_for_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SmolLM2-135M's shape (its config.json): 30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49152.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="gpu_check", help="Where gpu_check.md and gpu_check.json go.")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test only.")
    parser.add_argument("--tiny", action="store_true", help="A tiny model instead of SmolLM2-135M's shape.")
    parser.add_argument("--sections", default="precision,engines,speed", help="Comma-separated subset.")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps per method (after 3 warm-up).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    return parser


def model(shape: dict[str, Any], seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(attention_dropout=dropout, pad_token_id=0, **shape))


def examples(vocab: int, n: int, seq: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in ids]


def training_args(out: str, device: str, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3, report_to=[],
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=5, use_cpu=device == "cpu")  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in m.named_parameters()}


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


class Scales(TrainerCallback):
    """Records the GradScaler's scale after every step; optionally starts it absurdly high (overflow)."""

    def __init__(self, trainer_ref: list, start: float | None):
        self.ref, self.start, self.seen = trainer_ref, start, []

    def on_train_begin(self, args, state, control, **kwargs):
        scaler = self.ref[0].accelerator.scaler
        if scaler is not None and self.start is not None:
            scaler.update(new_scale=self.start)

    def on_step_end(self, args, state, control, **kwargs):
        scaler = self.ref[0].accelerator.scaler
        self.seen.append(None if scaler is None else float(scaler.get_scale()))


def check_precision(shape: dict[str, Any], device: str, out: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    dtypes = ["bf16", "fp16"] if device == "cuda" else ["bf16"]
    data = examples(shape["vocab_size"], 32, 32)
    for precision in dtypes:
        row: dict[str, Any] = {}
        runs = {}
        for name, cls, kw in (("trainer", Trainer, {}), ("nso", NSOTrainer, {"nso_config": NSOConfig(sigma=0.0)})):
            ref: list = []
            scales = Scales(ref, start=2.0**40 if precision == "fp16" else None)  # first steps overflow
            m = model(shape, dropout=0.1)
            args = training_args(os.path.join(out, f"{precision}_{name}"), device, **{precision: True})
            trainer = cls(model=m, args=args, train_dataset=data, callbacks=[scales], **kw)
            ref.append(trainer)
            trainer.train()
            runs[name] = (weights(m), [h["loss"] for h in trainer.state.log_history if "loss" in h], scales.seen)
        row["sigma0_weights_max_gap"] = max_gap(runs["trainer"][0], runs["nso"][0])
        row["sigma0_losses_equal"] = runs["trainer"][1] == runs["nso"][1]
        row["scales_trainer"], row["scales_nso"] = runs["trainer"][2], runs["nso"][2]
        # One step at sigma > 0: W comes back bit for bit (weights kept in fp32, passes under autocast).
        m = model(shape, dropout=0.1)
        args = training_args(os.path.join(out, f"{precision}_restore"), device, **{precision: True})
        trainer = NSOTrainer(model=m, args=args, train_dataset=data, nso_config=NSOConfig(sigma=0.05, num_perturbations=2))
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        m.to(args.device).train()
        before = weights(m)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.current_gradient_accumulation_steps = 1
        with trainer.accelerator.autocast():
            trainer.training_step(m, batch)
        row["restore_max_gap"] = max_gap(before, weights(m))
        results[precision] = row
    return results


def check_engines(out: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    scenarios = "sigma0_full_ga1,sigma0_lora_ga1,noise_full,noise_lora,resume_lora"
    for engine in ("fsdp2", "zero2", "zero3"):
        folder = os.path.join(out, engine)
        os.makedirs(folder, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": REPO, "NSO_ENGINE_DEVICE": "cuda"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.join(REPO, "tests", "engine_worker.py"), engine, folder, scenarios]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        if done.returncode != 0:
            results[engine] = {"error": done.stderr[-2000:]}
            continue
        r = json.load(open(os.path.join(folder, "rank0.json")))
        results[engine] = {
            "sigma0_equal": all(
                r[s]["nso_loss"] == r[s]["plain_loss"] and r[s]["weights_max_diff"] == 0.0
                for s in ("sigma0_full_ga1", "sigma0_lora_ga1")
            ),
            "steps_at_w": all(d == 0.0 for s in ("noise_full", "noise_lora") for d in r[s]["step_probe"]),
            "sharpness_full": r["noise_full"]["sharpness"],
            "sharpness_lora": r["noise_lora"]["sharpness"],
            "resume_gap": r["resume_lora"]["resumed_vs_uninterrupted"],
        }
    return results


class StepClock(TrainerCallback):
    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda, self.times, self.t0 = warmup, cuda, [], 0.0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)


def check_speed(shape: dict[str, Any], device: str, out: str, steps: int, batch: int, seq: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    cuda = device == "cuda"
    data = examples(shape["vocab_size"], batch * (steps + 3), seq)
    results: dict[str, Any] = {}
    for mode in ("lora", "full"):
        for method in METHODS:
            m = model(shape)  # fp32 weights; on GPU the passes run under bf16 autocast (bf16=True)
            if mode == "lora":
                m = get_peft_model(m, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            cfg = config_for_method(method, NSOConfig(sigma=0.01))
            cls, kw = (Trainer, {}) if cfg is None else (NSOTrainer, {"nso_config": cfg})
            clock = StepClock(warmup=3, cuda=cuda)
            args = training_args(os.path.join(out, f"speed_{mode}_{method}"), device, per_device_train_batch_size=batch,
                                 max_steps=steps + 3, bf16=cuda, logging_steps=1000)  # fmt: skip
            try:
                trainer = cls(model=m, args=args, train_dataset=data, callbacks=[clock], **kw)
            except ValueError as err:  # a method this mode cannot run (e.g. merged-space noise without LoRA)
                results[f"{mode}/{method}"] = {"refused": str(err)}
                continue
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            peak = torch.cuda.max_memory_allocated() if cuda else None
            results[f"{mode}/{method}"] = {"s_per_step": sum(clock.times) / len(clock.times), "peak_bytes": peak}
            del trainer, m
    for key, row in results.items():
        base = results.get(key.split("/")[0] + "/none", {})
        if "s_per_step" in row and "s_per_step" in base:
            row["time_ratio"] = row["s_per_step"] / base["s_per_step"]
            if row["peak_bytes"] and base.get("peak_bytes"):
                row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
    return results


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['device']}, {report['date']}", ""]
    for precision, row in report.get("precision", {}).items():
        lines.append(f"- {precision}: sigma=0 weight gap {row['sigma0_weights_max_gap']:.3g}, losses equal "
                     f"{row['sigma0_losses_equal']}, restore gap {row['restore_max_gap']:.3g}, scales Trainer "
                     f"{row['scales_trainer']} / NSO {row['scales_nso']}")  # fmt: skip
    for engine, row in report.get("engines", {}).items():
        lines.append(f"- {engine}: {row}")
    speed = report.get("speed", {})
    if speed:
        lines += ["", "| mode/method | s/step | time ratio | peak GiB | memory ratio |", "|---|---|---|---|---|"]
        for key, row in speed.items():
            if "refused" in row:
                lines.append(f"| {key} | refused | | | |")
                continue
            peak = row["peak_bytes"] / 2**30 if row["peak_bytes"] else float("nan")
            lines.append(f"| {key} | {row['s_per_step']:.3f} | {row.get('time_ratio', float('nan')):.2f} | "
                         f"{peak:.2f} | {row.get('memory_ratio', float('nan')):.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = make_parser().parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on a GPU machine, or use --device cpu --tiny for a smoke test.")
    shape = TINY if opts.tiny else SMOLLM2_135M
    sections = set(opts.sections.split(","))
    os.makedirs(opts.output_dir, exist_ok=True)
    device_name = torch.cuda.get_device_name() if opts.device == "cuda" else "CPU"
    report: dict[str, Any] = {"device": device_name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as scratch:
        if "precision" in sections:
            report["precision"] = check_precision(TINY if opts.tiny else dict(SMOLLM2_135M, num_hidden_layers=2), opts.device, scratch)
        if "engines" in sections and opts.device == "cuda":
            report["engines"] = check_engines(scratch)
        if "speed" in sections:
            report["speed"] = check_speed(shape, opts.device, scratch, opts.steps, opts.batch_size, opts.seq_len)
    with open(os.path.join(opts.output_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(opts.output_dir, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
