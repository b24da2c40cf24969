"""Which engine a Trainer runs under, and the engine options the NSO step cannot honour.

Checked once, when the trainer is built, so a run that cannot be right stops before its first step
with an error naming the engine and the fix, never silently degraded. docs/distributed.md has the
table of what runs where and what it costs.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from nso_hf.config import ASCENT_METHODS, MERGED_METHODS, NOISE_METHODS, NSOConfig

SHARDED = ("FSDP1", "FSDP2", "DeepSpeed ZeRO-3")


def engine_name(trainer: Any) -> str:
    """The engine of a built `transformers.Trainer`: "DeepSpeed ZeRO-<stage>", "FSDP1", "FSDP2" or "DDP/single"."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return f"DeepSpeed ZeRO-{_zero_stage(trainer)}"
    if getattr(trainer, "is_distributed_loading_by_transformers", False):
        return "FSDP2"
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP2" if getattr(trainer.accelerator, "is_fsdp2", False) else "FSDP1"
    return "DDP/single"


def _zero_stage(trainer: Any) -> int:
    plugin = trainer.accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage or 0)


def _ds_config(trainer: Any) -> dict:
    return trainer.accelerator.state.deepspeed_plugin.deepspeed_config


def _deepspeed_fp16(trainer: Any) -> bool:
    enabled = _ds_config(trainer).get("fp16", {}).get("enabled", False)
    return trainer.args.fp16 if enabled == "auto" else enabled is True


def check_engine(trainer: Any, config: NSOConfig) -> None:
    """Raise `ValueError` for an engine option the step cannot honour.

    Args:
        trainer: the built trainer (its Accelerator knows the engine).
        config: the NSO settings.

    Raises:
        ValueError: naming the engine, the option and the fix.
    """
    engine = engine_name(trainer)
    if config.method in ASCENT_METHODS and engine in SHARDED:
        # The ascent gradient is taken with torch.autograd.grad with respect to the parameters, but here the
        # forward runs on gathered copies, not the tensors the trainer holds, and e would have to be split
        # into shards. (ZeRO-2 keeps whole parameters: the ascent pass runs beside the engine, compat.py.)
        raise ValueError(
            f"NSOConfig.method={config.method!r} is not supported under {engine}: its ascent gradient is taken with "
            f"torch.autograd.grad on the parameters, but {engine} shards them and runs the forward on gathered "
            "copies. Use DDP or DeepSpeed ZeRO-2, or method='nso' / 'rwp' (docs/methods.md)."
        )
    if config.method in ASCENT_METHODS and engine.startswith("DeepSpeed"):
        ds = _ds_config(trainer)
        # The ascent pass calls the module the engine wraps, not the engine (compat.py, without_engine), so
        # the casts the engine's forward adds would be missing from that pass alone.
        cast = [
            name
            for name, on in (
                ("torch_autocast", ds.get("torch_autocast", {}).get("enabled", False)),
                ("fp16.auto_cast", ds.get("fp16", {}).get("auto_cast", False)),
            )
            if on is True
        ]
        if cast:
            raise ValueError(
                f"NSOConfig.method={config.method!r} under {engine} cannot use DeepSpeed's {cast[0]}: SAM's ascent pass "
                "runs the wrapped module without the engine's forward, which is where that cast happens. Turn "
                f"{cast[0]} off (DeepSpeed's bf16 / fp16 sections cast the weights instead), or use DDP."
            )
    if config.method in MERGED_METHODS and engine in SHARDED:
        raise ValueError(
            f"NSOConfig.method={config.method!r} writes noise into the frozen base weights of the LoRA layers and scales "
            f"it by the rows of W0 + s BA, which {engine} shards. Use DDP or DeepSpeed ZeRO-2, or method='nso' / 'rwp' "
            "(noise on the adapters, docs/methods.md)."
        )
    if config.nonfinite_loss == "skip":
        if engine.startswith("DeepSpeed") and not _deepspeed_fp16(trainer):
            raise ValueError(
                f"NSOConfig.nonfinite_loss='skip' cannot skip an update under {engine}: the engine steps inside "
                "backward, before the gradient norm reaches the trainer. Use fp16 (DeepSpeed's loss scaler skips "
                "steps whose gradients overflow) or nonfinite_loss='raise'."
            )
        if not hasattr(Trainer, "_get_grad_norm"):
            raise ValueError(
                "NSOConfig.nonfinite_loss='skip' needs transformers >= 5.0 (Trainer._get_grad_norm, where the step "
                "is skipped). Upgrade transformers or use nonfinite_loss='raise'."
            )
    if config.method in NOISE_METHODS and config.relative_noise and engine in ("FSDP1", "DeepSpeed ZeRO-3"):
        shards = "flat 1-D pieces" if engine == "FSDP1" else "flat partitions"
        raise ValueError(
            f"NSOConfig.noise_scale='relative' needs whole rows, but {engine} shards parameters into {shards}. "
            "Use FSDP2 or ZeRO-2 (rows stay whole), or noise_scale='absolute'."
        )
    if engine == "DeepSpeed ZeRO-3":
        zero = _ds_config(trainer).get("zero_optimization", {})
        if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
            raise ValueError(
                "DeepSpeed ZeRO-3 with zero_hpz_partition_size > 1 (ZeRO++ hpZ) keeps a secondary copy of each "
                "partition that the backward reads; the NSO noise is written into the primary partition only. "
                "Set zero_hpz_partition_size to 1."
            )
        offload = zero.get("offload_param") or {}
        if str(offload.get("device", "none")).lower() == "nvme":
            raise ValueError(
                "DeepSpeed ZeRO-3 with offload_param.device='nvme' swaps parameter partitions out to disk, where "
                "the NSO step cannot write or restore the noise. Use offload_param.device 'cpu' or 'none'."
            )
