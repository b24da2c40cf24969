"""One launch of tests/test_engines.py: `torchrun --nproc_per_node 2 tests/engine_worker.py ENGINE OUT`.

ENGINE is zero2, zero3, fsdp1 or fsdp2; CPU processes with gloo, through `Trainer`/`NSOTrainer`
(tests/cpu_engines.py makes accelerate choose the engine on CPU). A launch costs 8-15 s, so one
launch runs every scenario of its engine and writes what it saw to OUT/rank<r>.json; the test
asserts on those records. Each scenario records raw facts (losses, gradient norms, largest weight
differences, counts), never a verdict.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from cpu_engines import patch_accelerate_for_cpu_engines  # noqa: E402

patch_accelerate_for_cpu_engines()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from nso_hf import NSOConfig, NSOTrainer  # noqa: E402
from nso_hf.noise import local_tensor  # noqa: E402
from nso_hf.trainer import NonFiniteLossError  # noqa: E402

from helpers import finish_worker, lm_examples, tiny_llama  # noqa: E402

ENGINE, OUT = sys.argv[1], sys.argv[2]
RANK = int(os.environ["RANK"])
STEPS = 3
DEVICE = os.environ.get("NSO_ENGINE_DEVICE", "cpu")  # scripts/gpu_check.py runs the same scenarios on "cuda"


def engine_args(grad_accum: int) -> dict[str, Any]:
    if ENGINE.startswith("zero"):
        zero: dict[str, Any] = {"stage": int(ENGINE[-1])}
        if ENGINE == "zero3":
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        ds = {
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": zero,
        }
        return {"deepspeed": ds, "use_cpu": False}
    version = int(ENGINE[-1])
    fsdp_config = {
        "version": version,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "use_orig_params": True,
        "sync_module_states": False,  # FSDP1 on CPU: its broadcast path assumes a GPU
        "state_dict_type": "FULL_STATE_DICT",
    }
    cpu = DEVICE == "cpu"
    return {"fsdp": "full_shard", "fsdp_config": fsdp_config, "use_cpu": cpu, "ddp_backend": "gloo" if cpu else "nccl"}


def args(out: str, grad_accum: int = 1, **overrides: Any) -> TrainingArguments:
    # Plain SGD without clipping: AdamW and clipping are nearly scale-invariant and would hide a
    # lost or halved pass. 8 rows per optimizer step on each rank.
    kwargs: dict[str, Any] = dict(
        output_dir=os.path.join(OUT, out),
        per_device_train_batch_size=8 // grad_accum,
        gradient_accumulation_steps=grad_accum,
        max_steps=STEPS,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=11,
        dataloader_num_workers=0,
        **engine_args(grad_accum),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def model(lora: bool) -> torch.nn.Module:
    m = tiny_llama(seed=0, dropout=0.1)
    if lora:
        # B starts random (not zero), so noise on A moves the output from the first step on.
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        m = get_peft_model(m, lora)
    return m


def trainable(trainer: Trainer) -> list[tuple[str, torch.nn.Parameter]]:
    wrapped = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    return [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]


def local_copy(trainer: Trainer) -> dict[str, torch.Tensor]:
    """This rank's storage of every trainable parameter: its shard or partition under FSDP/ZeRO-3."""
    return {n: local_tensor(p).detach().float().cpu().clone() for n, p in trainable(trainer)}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(((a[n] - b[n]).abs().max().item() if a[n].numel() else 0.0) for n in a)


class StepProbe(TrainerCallback):
    """Compares the weights each optimizer step starts from with the weights the step began with.

    Under DeepSpeed the engine steps inside backward, before any Trainer callback, so the probe
    wraps the engine's `step` (NSO's restore-before-step wraps around it). Elsewhere the optimizer
    steps after `on_pre_optimizer_step`.
    """

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.initial: dict[str, torch.Tensor] = {}
        self.begin: dict[str, torch.Tensor] = {}
        self.diffs: list[float] = []

    def moved(self) -> float:
        """Largest change of this rank's trainable weights over the whole run."""
        return max_diff(local_copy(self.trainer), self.initial)

    def _look(self) -> None:
        self.diffs.append(max_diff(local_copy(self.trainer), self.begin))

    def on_train_begin(self, args, state, control, **kwargs):
        self.initial = local_copy(self.trainer)
        wrapper = getattr(self.trainer.accelerator, "deepspeed_engine_wrapped", None)
        if wrapper is not None:
            engine, step = wrapper.engine, wrapper.engine.step

            def looked_step(*a, **k):
                self._look()
                return step(*a, **k)

            engine.step = looked_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin = local_copy(self.trainer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if getattr(self.trainer.accelerator, "deepspeed_engine_wrapped", None) is None:
            self._look()


COLLECTIVES = (
    "all_reduce",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "reduce_scatter",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather",
    "broadcast",
)


class CountCollectives(TrainerCallback):
    """Counts collective calls made between `on_step_begin` and `on_step_end` (logging excluded).

    torch.distributed's functions are wrapped (DDP, FSDP); DeepSpeed calls its own backend object,
    which exists once the engine is built, so the wrapping happens at `on_train_begin`.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.steps: list[dict[str, int]] = []  # the counts of each optimizer step, in order
        self.active = False
        self.originals: list[tuple[Any, str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        owner: Any = torch.distributed
        if ENGINE.startswith("zero"):
            import deepspeed.comm.comm as ds_comm

            owner = ds_comm.cdb
        for name in COLLECTIVES:
            if hasattr(owner, name):
                fn = getattr(owner, name)
                self.originals.append((owner, name, fn))
                setattr(owner, name, self._counting(name, fn))

    def _counting(self, name, fn):
        def counted(*a, **k):
            if self.active:
                self.counts[name] += 1
            return fn(*a, **k)

        return counted

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = True

    def on_step_end(self, args, state, control, **kwargs):
        self.active = False
        self.steps.append(dict(sorted((self.counts - sum(map(Counter, self.steps), Counter())).items())))

    def on_train_end(self, args, state, control, **kwargs):
        for owner, name, fn in self.originals:
            setattr(owner, name, fn)

    def per_step(self, steps: int) -> dict[str, float]:
        return {name: n / steps for name, n in sorted(self.counts.items())}


def train(
    name: str,
    cls: type[Trainer],
    lora: bool = False,
    grad_accum: int = 1,
    cfg: NSOConfig | None = None,
    resume: str | None = None,
    **overrides: Any,
) -> tuple[Trainer, StepProbe, CountCollectives]:
    probe, counter = StepProbe(), CountCollectives()
    kw = {"nso_config": cfg} if cls is NSOTrainer else {}
    trainer = cls(
        model=model(lora), args=args(name, grad_accum, **overrides), train_dataset=lm_examples(64, seed=3),
        callbacks=[probe, counter], **kw,
    )  # fmt: skip
    probe.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer, probe, counter


def history(trainer: Trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def scenario_sigma0(lora: bool, grad_accum: int) -> dict[str, Any]:
    """sigma = 0 against Trainer under the same engine: losses, grad norms, final weights."""
    plain, _, plain_count = train(f"plain_{lora}_{grad_accum}", Trainer, lora, grad_accum)
    nso, probe, nso_count = train(f"nso0_{lora}_{grad_accum}", NSOTrainer, lora, grad_accum, NSOConfig(sigma=0.0))
    return {
        "plain_loss": history(plain, "loss"),
        "nso_loss": history(nso, "loss"),
        "plain_grad_norm": history(plain, "grad_norm"),
        "nso_grad_norm": history(nso, "grad_norm"),
        "weights_max_diff": max_diff(local_copy(plain), local_copy(nso)),
        "step_probe": probe.diffs,
        "plain_collectives": plain_count.per_step(STEPS),
        "nso_collectives": nso_count.per_step(STEPS),
        "moved": probe.moved(),
    }


def scenario_noise(lora: bool, noise_scale: str = "absolute") -> dict[str, Any]:
    """sigma > 0 with a clean pass: the noise reaches the forward (sharpness > 0), W is stepped, updates land."""
    # Large enough that the second-order term (positive on average) outweighs the indefinite curvature
    # of a randomly initialised model along single draws; two draws per micro-batch.
    cfg = NSOConfig(sigma=0.3, num_perturbations=2, unperturbed_weight=0.5, noise_scale=noise_scale)
    nso, probe, _ = train(f"noise_{lora}_{noise_scale}", NSOTrainer, lora, cfg=cfg)
    out: dict[str, Any] = {
        "sharpness": history(nso, "nso/sharpness"),
        "step_probe": probe.diffs,
        "loss": history(nso, "loss"),
        "moved": probe.moved(),
        "finite": all(torch.isfinite(t).all().item() for t in local_copy(nso).values()),
    }
    if ENGINE == "zero3":
        # The gathered copies ZeRO-3 keeps must equal the partitions they come from.
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gaps = []
        for _, p in trainable(nso):
            if p.ds_status == ZeroParamStatus.AVAILABLE:
                parts = [torch.empty_like(p.ds_tensor) for _ in range(torch.distributed.get_world_size())]
                torch.distributed.all_gather(parts, p.ds_tensor.contiguous())
                full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
                gaps.append((full - p.data).abs().max().item())
        out["gathered_vs_partition"] = gaps
    return out


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every trainable parameter whole, on every rank (a collective under FSDP2 and ZeRO-3)."""
    named = trainable(trainer)
    if ENGINE == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    if ENGINE == "fsdp2":
        return {n: p.full_tensor().detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


def scenario_resume(lora: bool) -> dict[str, Any]:
    """Save at step 2 of 4, resume from that checkpoint in a new run: same end; the saved model loads."""
    cfg = NSOConfig(sigma=0.05)
    # AdamW: its state is saved and restored too (and torch's FSDP2 optimizer loading needs some state).
    saving = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", learning_rate=1e-2)
    full, _, _ = train(f"resume_full_{lora}", NSOTrainer, lora, cfg=cfg, **saving)
    checkpoint = os.path.join(OUT, f"resume_full_{lora}", "checkpoint-2")
    resumed, _, _ = train(f"resume_part_{lora}", NSOTrainer, lora, cfg=cfg, resume=checkpoint, **saving)
    out: dict[str, Any] = {
        "steps": [full.state.global_step, resumed.state.global_step],
        "resumed_vs_uninterrupted": max_diff(local_copy(full), local_copy(resumed)),
    }
    saved = os.path.join(OUT, f"resume_final_{lora}")
    resumed.save_model(saved)
    weights = full_weights(resumed)
    torch.distributed.barrier()
    if RANK == 0:
        # Load as a user would, in a fresh process: without the ZeRO-3 config that TrainingArguments
        # registered process-wide (from_pretrained would otherwise partition the model, a collective).
        from transformers.integrations import deepspeed as hf_deepspeed

        registered, hf_deepspeed._hf_deepspeed_config_weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref, None
        base = tiny_llama(seed=0, dropout=0.1)
        if lora:
            from peft import PeftModel

            loaded = PeftModel.from_pretrained(base, saved)
        else:
            from transformers import LlamaForCausalLM

            loaded = LlamaForCausalLM.from_pretrained(saved)
        got = {n: p.detach().float() for n, p in loaded.named_parameters()}
        # Names: peft's adapter parameters lose the adapter name on load; match by suffix.
        found = {}
        for name, value in weights.items():
            bare = name.replace("module.", "").replace("_orig_mod.", "")
            match = [n for n in got if n.replace(".default", "") == bare.replace(".default", "")]
            found[name] = (got[match[0]] - value).abs().max().item() if match else None
        out["saved_vs_trained"] = found
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered
    return out


def scenario_nonfinite() -> dict[str, Any]:
    """A non-finite perturbed loss raises NonFiniteLossError and leaves W exactly as it was."""
    # 1e10 overflows the attention scores (1e30 would not: RMSNorm maps an inf variance to 0).
    cfg = NSOConfig(sigma=1e10)
    probe = StepProbe()
    trainer = NSOTrainer(
        model=model(False), args=args("nonfinite"), train_dataset=lm_examples(64, seed=3), callbacks=[probe], nso_config=cfg
    )
    probe.trainer = trainer
    try:
        trainer.train()
        return {"raised": None}
    except NonFiniteLossError as err:
        if ENGINE == "fsdp2":
            # The error left the root module gathered (FSDP2 reshards it in backward); look at the shards.
            from torch.distributed.fsdp import FSDPModule

            for module in trainer.model_wrapped.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        return {"raised": str(err)[:200], "restored_max_diff": max_diff(local_copy(trainer), probe.initial)}


def scenario_refusals() -> dict[str, str | None]:
    """Options the step cannot honour under this engine fail when the trainer is built."""
    out: dict[str, str | None] = {}
    for key, cfg in (("relative", NSOConfig(noise_scale="relative")), ("skip", NSOConfig(nonfinite_loss="skip"))):
        try:
            NSOTrainer(model=model(False), args=args(f"refuse_{key}"), train_dataset=lm_examples(8), nso_config=cfg)
            out[key] = None
        except ValueError as err:
            out[key] = str(err)
    return out


def scenario_relative_scale() -> dict[str, Any]:
    """FSDP2 shards rows whole: relative noise's scale on each shard equals the full tensor's, sliced."""
    from nso_hf.noise import relative_scale, row_rms

    trainer, _, _ = train("scale", NSOTrainer, cfg=NSOConfig(noise_scale="relative"), max_steps=1)
    gaps = []
    for _, p in trainable(trainer):
        full = p.full_tensor()
        expected = row_rms(full)
        local = relative_scale(p)
        if full.dim() >= 2:
            rows = p.to_local().shape[0]
            start = RANK * ((full.shape[0] + 1) // 2)
            expected = expected[start : start + rows]
        gaps.append((local - expected).abs().max().item() if local.numel() else 0.0)
    return {"max_gap": max(gaps), "tensors": len(gaps)}


def unsharded_gradient_bytes(trainer: Trainer) -> int:
    """Bytes of unsharded gradient this rank holds now (FSDP keeps them under no_sync)."""
    total = 0
    if ENGINE == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        for module in trainer.model_wrapped.modules():
            if isinstance(module, FSDPModule):
                for group in module._get_fsdp_state()._fsdp_param_groups:
                    for fp in group.fsdp_params:
                        unsharded = getattr(fp, "_unsharded_param", None)
                        for g in (fp.unsharded_accumulated_grad, None if unsharded is None else unsharded.grad):
                            total += 0 if g is None else g.numel() * g.element_size()
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        for module in FullyShardedDataParallel.fsdp_modules(trainer.model_wrapped):
            flat = module._handle.flat_param if module._handle is not None else None
            if flat is not None and flat.grad is not None and flat.grad.numel() != flat.numel():
                total += flat.grad.numel() * flat.grad.element_size()
    return total


def scenario_held_gradients() -> dict[str, int]:
    """What deferring the reduce-scatter costs: unsharded gradients held between the passes."""
    seen: list[int] = []
    probe, counter = StepProbe(), CountCollectives()
    trainer = NSOTrainer(
        model=model(False), args=args("held", max_steps=1), train_dataset=lm_examples(64, seed=3),
        callbacks=[probe, counter], nso_config=NSOConfig(sigma=0.01),
    )  # fmt: skip
    probe.trainer = trainer
    calls = []

    def before_forward(module, inputs):
        calls.append(1)
        if len(calls) == 2:  # the second pass starts: the first one's gradient is held unsharded
            seen.append(unsharded_gradient_bytes(trainer))

    trainer.model.register_forward_pre_hook(before_forward)
    trainer.train()
    sharded = sum(local_tensor(p).numel() * local_tensor(p).element_size() for _, p in trainable(trainer))
    full = sum(p.numel() * 4 for p in tiny_llama(seed=0).parameters())
    return {"held_between_passes": seen[0], "sharded_gradient": sharded, "full_model_fp32": full}


SCENARIOS = {
    "sigma0_full_ga1": lambda: scenario_sigma0(lora=False, grad_accum=1),
    "sigma0_full_ga2": lambda: scenario_sigma0(lora=False, grad_accum=2),
    "sigma0_lora_ga1": lambda: scenario_sigma0(lora=True, grad_accum=1),
    "noise_full": lambda: scenario_noise(lora=False),
    "noise_lora": lambda: scenario_noise(lora=True),
}
if ENGINE in ("fsdp2", "zero2", "zero3"):
    SCENARIOS["resume_full"] = lambda: scenario_resume(lora=False)
    SCENARIOS["resume_lora"] = lambda: scenario_resume(lora=True)
if ENGINE in ("fsdp2", "zero2"):  # rows stay whole
    SCENARIOS["noise_lora_relative"] = lambda: scenario_noise(lora=True, noise_scale="relative")
if ENGINE == "fsdp2":
    SCENARIOS["relative_scale"] = scenario_relative_scale
if ENGINE.startswith("fsdp"):
    SCENARIOS["held_gradients"] = scenario_held_gradients
SCENARIOS["refusals"] = scenario_refusals
SCENARIOS["nonfinite"] = scenario_nonfinite  # last: a raising trainer may leave its engine half-used



# ---------------------------------------------------------------- the other methods (docs/methods.md)
def _frozen_copy(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The LoRA layers' base weights, named as on the bare model (before and after wrapping)."""
    return {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if "base_layer" in n}


def scenario_methods_zero2() -> dict[str, Any]:
    """ZeRO-2: Flat-LoRA / merged NSO at sigma = 0 against Trainer; then at a real strength."""
    out: dict[str, Any] = {}
    plain = {lora: train(f"m_plain_{lora}", Trainer, lora)[0] for lora in (True,)}
    zero = {
        "flat_lora": (True, NSOConfig(method="flat_lora", sigma=0.0)),
        "nso_merged": (True, NSOConfig(method="nso_merged", sigma=0.0)),
    }
    for name, (lora, cfg) in zero.items():
        nso, probe, _ = train(f"m0_{name}", NSOTrainer, lora, cfg=cfg)
        out[f"{name}_zero"] = {
            "plain_loss": history(plain[lora], "loss"),
            "loss": history(nso, "loss"),
            "weights_max_diff": max_diff(local_copy(plain[lora]), local_copy(nso)),
            "step_probe": probe.diffs,
            "moved": probe.moved(),
        }
    strong = {
        "flat_lora": (True, NSOConfig(method="flat_lora", sigma=0.2)),
        "nso_merged": (True, NSOConfig(method="nso_merged", sigma=0.2)),
    }
    for name, (lora, cfg) in strong.items():
        probe = StepProbe()
        trainer = NSOTrainer(
            model=model(lora), args=args(f"m_{name}"), train_dataset=lm_examples(64, seed=3), callbacks=[probe],
            nso_config=cfg,
        )  # fmt: skip
        probe.trainer = trainer
        frozen_before = _frozen_copy(trainer)
        trainer.train()
        frozen_after = _frozen_copy(trainer)
        out[name] = {
            "loss": history(trainer, "loss"),
            "sharpness": history(trainer, "nso/sharpness"),
            "step_probe": probe.diffs,
            "moved": probe.moved(),
            "vs_plain": max_diff(local_copy(plain[lora]), local_copy(trainer)),
            "finite": all(torch.isfinite(t).all().item() for t in local_copy(trainer).values()),
            "frozen_max_diff": max_diff(frozen_before, frozen_after) if frozen_before else None,
        }
    return out


def scenario_sam_zero2() -> dict[str, Any]:
    """ZeRO-2: SAM / ASAM at rho = 0 against Trainer (accumulation 1 and 2); then at a real radius."""
    out: dict[str, Any] = {}
    plain_weights = {}
    for grad_accum in (1, 2):
        plain, _, plain_count = train(f"s_plain_{grad_accum}", Trainer, False, grad_accum)
        plain_weights[grad_accum] = local_copy(plain)
        for method in ("sam", "asam"):
            cfg = NSOConfig(method=method, rho=0.0)
            nso, probe, count = train(f"s0_{method}_{grad_accum}", NSOTrainer, False, grad_accum, cfg)
            out[f"{method}_zero_ga{grad_accum}"] = {
                "plain_loss": history(plain, "loss"),
                "loss": history(nso, "loss"),
                "plain_grad_norm": history(plain, "grad_norm"),
                "grad_norm": history(nso, "grad_norm"),
                "weights_max_diff": max_diff(plain_weights[grad_accum], local_copy(nso)),
                "step_probe": probe.diffs,
                "moved": probe.moved(),
                "plain_collectives": plain_count.per_step(STEPS),
                "collectives": count.per_step(STEPS),
            }
    for method, grad_accum in (("sam", 1), ("asam", 1), ("sam", 2)):
        cfg = NSOConfig(method=method, rho=0.5)
        nso, probe, count = train(f"s_{method}_{grad_accum}", NSOTrainer, False, grad_accum, cfg)
        out[f"{method}_ga{grad_accum}"] = {
            "loss": history(nso, "loss"),
            "sharpness": history(nso, "nso/sharpness"),
            "step_probe": probe.diffs,
            "moved": probe.moved(),
            "vs_plain": max_diff(plain_weights[grad_accum], local_copy(nso)),
            "finite": all(torch.isfinite(t).all().item() for t in local_copy(nso).values()),
            "collectives": count.per_step(STEPS),
        }
    return out


def scenario_methods_every_engine() -> dict[str, Any]:
    """method 'none' and RWP at sigma = 0: the same runs as sigma0_full_ga1's plain Trainer, compared there."""
    out: dict[str, Any] = {}
    for method in ("none", "rwp"):
        nso, probe, _ = train(f"m_{method}", NSOTrainer, False, cfg=NSOConfig(method=method, sigma=0.0))
        out[method] = {
            "loss": history(nso, "loss"),
            "grad_norm": history(nso, "grad_norm"),
            "step_probe": probe.diffs,
            "moved": probe.moved(),
        }
    return out


def scenario_method_refusals() -> dict[str, str | None]:
    """The methods this engine cannot run are refused when the trainer is built."""
    out: dict[str, str | None] = {}
    for method in ("sam", "asam", "flat_lora", "nso_merged"):
        try:
            NSOTrainer(
                model=model(True), args=args(f"refuse_{method}"), train_dataset=lm_examples(8),
                nso_config=NSOConfig(method=method),
            )  # fmt: skip
            out[method] = None
        except ValueError as err:
            out[method] = str(err)
    return out


class ForwardsPerStep(TrainerCallback):
    """Forward calls of the model in each optimizer step (a forward hook appends to `calls`)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.per_step: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(len(self.calls) - sum(self.per_step))


def scenario_schedule(method: str) -> dict[str, Any]:
    """perturb_start 0.25, perturb_every 2 over 4 steps with accumulation 2: steps 1 and 3 perturbed, 0 and 2 plain.

    Records, gathered from both ranks, the forward calls per step and the logged perturbed-step counts,
    and per step the collectives of this run and of Trainer's with the same arguments.
    """
    steps, grad_accum = 4, 2
    plain, _, plain_count = train(f"sched_plain_{method}", Trainer, False, grad_accum, max_steps=steps)
    cfg = NSOConfig(method=method, sigma=0.05, rho=0.05, perturb_start=0.25, perturb_every=2)
    probe, counter, forwards = StepProbe(), CountCollectives(), ForwardsPerStep()
    trainer = NSOTrainer(
        model=model(False), args=args(f"sched_{method}", grad_accum, max_steps=steps), train_dataset=lm_examples(64, seed=3),
        callbacks=[probe, counter, forwards], nso_config=cfg,
    )  # fmt: skip
    probe.trainer = trainer
    trainer.model.register_forward_hook(lambda *_: forwards.calls.append(1))
    trainer.train()
    mine = {"forwards": forwards.per_step, "perturbed_steps": history(trainer, "nso/perturbed_steps")}
    ranks: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)
    return {
        "ranks": ranks,
        "plain_collectives": plain_count.steps,
        "collectives": counter.steps,
        "step_probe": probe.diffs,
        "moved": probe.moved(),
        "plain_loss": history(plain, "loss"),
        "loss": history(trainer, "loss"),
        "passes": trainer.nso_passes,
    }


SCENARIOS["schedule_nso"] = lambda: scenario_schedule("nso")
if ENGINE == "zero2":
    SCENARIOS["schedule_sam"] = lambda: scenario_schedule("sam")
    SCENARIOS["methods_zero2"] = scenario_methods_zero2
    SCENARIOS["sam_zero2"] = scenario_sam_zero2
SCENARIOS["methods_every_engine"] = scenario_methods_every_engine
SCENARIOS["method_refusals"] = scenario_method_refusals
SCENARIOS["nonfinite"] = SCENARIOS.pop("nonfinite")  # still last: a raising trainer may leave its engine half-used


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(420, exit=True)  # a hung collective prints where, then ends the run
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SCENARIOS)
    results = {name: SCENARIOS[name]() for name in only}
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(results, f)
    finish_worker()  # results are written: leave without interpreter teardown (see helpers.py)
