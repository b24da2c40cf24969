"""Where the NSO step leans on library internals: each function names the version it was written for.

The algorithm (`trainer.py`, `passes.py`, `noise.py`) calls these and nothing private. When a
library changes one of the internals below, this is the file to update; the tests that pin each
behaviour are named beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn


# accelerate 1.x (checked 1.15): `GradientState._set_sync_gradients` is private. With DeepSpeed,
# `accelerator.backward` steps the engine whenever `sync_gradients` is True, so the earlier passes
# of a syncing micro-batch must run with it False. Pinned by tests/test_ddp.py (all-reduce count)
# and tests/test_engines.py (ZeRO boundary).
@contextlib.contextmanager
def defer_gradient_sync(trainer: Any, model: nn.Module) -> Iterator[None]:
    """No gradient sync and no DeepSpeed boundary for one pass: forward AND backward inside."""
    state = trainer.accelerator.gradient_state
    state._set_sync_gradients(False)
    try:
        with _no_sync(trainer, model):
            yield
    finally:
        state._set_sync_gradients(True)


def _no_sync(trainer: Any, model: nn.Module):
    # transformers 5.x: a model sharded at load time (`DistributedConfig(fsdp_size=...)`, FSDP2) is
    # not wrapped by accelerate, whose `no_sync` would not reach it; Trainer's own loop makes the
    # same distinction with its private `_defer_fsdp_gradient_reduction`.
    if getattr(trainer, "is_distributed_loading_by_transformers", False):
        from transformers.distributed.fsdp import is_fsdp_managed_module

        if is_fsdp_managed_module(trainer.model):
            return trainer._defer_fsdp_gradient_reduction()
    return trainer.accelerator.no_sync(model)


# accelerate 1.x (checked 1.15): `DeepSpeedEngineWrapper.backward` calls `engine.step()` right
# after the boundary backward, inside `accelerator.backward`, i.e. inside the last pass and before
# `training_step` regains control. The engine steps its own master partition (which never held
# the noise) and then writes the update into the model's weights; restoring W after that would
# copy the pre-step weights over the update (the bug that made ZeRO train nothing). So W is put
# back first, inside the engine's step. Pinned by tests/test_engines.py.
@contextlib.contextmanager
def restore_before_engine_step(trainer: Any, restore: Callable[[], None]) -> Iterator[None]:
    """While inside, a DeepSpeed engine's `step()` first calls `restore()`. Elsewhere a no-op."""
    wrapper = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    if wrapper is None:
        yield
        return
    engine = wrapper.engine
    had_own = "step" in vars(engine)  # someone (a test, a profiler) may have wrapped it already
    step = engine.step

    def step_at_w(*args: Any, **kwargs: Any) -> Any:
        restore()
        return step(*args, **kwargs)

    engine.step = step_at_w
    try:
        yield
    finally:
        if had_own:
            engine.step = step
        else:
            del engine.step


# DeepSpeed 0.1x (checked 0.19.8), ZeRO-2, for SAM's ascent pass (whose gradient must reach neither
# `.grad` nor the engine). `DeepSpeedEngine.forward` hooks its outputs: the first backward through them
# runs the engine's backward prologue and queues its epilogue, which reduces the gradient buckets that
# the parameters' post-accumulate-grad hooks fill. `torch.autograd.grad` runs no AccumulateGrad node, so
# those hooks never fire and the epilogue reduced buckets that were never filled (IndexError in
# `reduce_ipg_grads`); `engine.backward` on the pass's graphless loss runs the same epilogue. So the
# ascent pass calls the module the engine wraps (same parameters, same computation, no output hooks)
# and skips the engine's backward: DeepSpeed never sees the pass, so it costs no collective and leaves
# the engine's gradient state alone. What the engine's forward would add and the bare module lacks
# (DeepSpeed's `torch_autocast`, fp16 `auto_cast` of the inputs) is refused in engines.py.
# Pinned by tests/test_engines.py (ZeRO-2: SAM at rho = 0 equals Trainer, collectives equal Trainer's).
def without_engine(trainer: Any, model: nn.Module) -> nn.Module:
    """The module a DeepSpeed engine wraps when `model` is that engine; `model` otherwise."""
    wrapper = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    return wrapper.engine.module if wrapper is not None and model is wrapper.engine else model


@contextlib.contextmanager
def skip_engine_backward(trainer: Any) -> Iterator[None]:
    """While inside, `accelerator.backward` does nothing under DeepSpeed. Elsewhere a no-op.

    transformers (checked 5.24): `Trainer.training_step` calls `accelerator.backward` once.
    """
    accelerator = trainer.accelerator
    if getattr(accelerator, "deepspeed_engine_wrapped", None) is None:
        yield
        return
    own = vars(accelerator).get("backward")  # someone (a test, a profiler) may have wrapped it already
    accelerator.backward = lambda loss, **kwargs: None
    try:
        yield
    finally:
        if own is not None:
            accelerator.backward = own
        else:
            del accelerator.backward


# DeepSpeed 0.1x (checked 0.19.8), ZeRO-3: the noise goes into each rank's partition `ds_tensor`,
# which a forward all-gathers into `param.data`. But ZeRO-3 keeps some parameters gathered between
# forwards: "persistent" ones (at most `stage3_param_persistence_threshold` elements: norms, biases,
# typical LoRA matrices), once its module trace is complete, and their forward reads that gathered
# copy, never the partition. Whether a parameter is gathered changes during the first steps, so after
# every move of the partitions each gathered copy is dropped and gathered again from them: the
# forward sees the noise and, after restore, the gathered copy equals the partitions. Costs one
# all-gather of the gathered parameters (small by construction) per move.
# Pinned by tests/test_engines.py (sharpness > 0 with LoRA under ZeRO-3; copies agree after training).
def refresh_zero3_gathered(params: list[nn.Parameter]) -> None:
    """Re-gather, from their partitions, the ZeRO-3 parameters among `params` that are gathered now.

    A collective: every rank holds the same parameters gathered (ZeRO-3 traces the same modules on
    every rank) and selects them in the same order.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in params if hasattr(p, "ds_tensor") and p.ds_status == ZeroParamStatus.AVAILABLE]
    if gathered:
        for p in gathered:
            p.partition()  # drops the gathered copy; the partition is the truth (nothing written back)
        gathered[0].all_gather(param_list=gathered)


def zero3_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The ZeRO-3 parameters among `params` (empty on every other engine)."""
    return [p for p in params if hasattr(p, "ds_tensor")]


# torch 2.x (checked 2.13): BatchNorm's and InstanceNorm's running statistics are written in place by the
# native kernel without bumping the tensors' version counters (measured on CPU), so nso_hf/buffers.py copies
# them in every micro-batch instead of learning them. `_NormBase` is the private base of every such layer
# (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones, InstanceNorm with track_running_stats).
# Pinned by tests/test_replay.py (test_batchnorm_running_stats_do_not_bump_version_counters).
def natively_updated_buffers(module: nn.Module) -> tuple[str, ...]:
    """Names of `module`'s own buffers that a training forward updates inside a native kernel."""
    from torch.nn.modules.batchnorm import _NormBase

    if isinstance(module, _NormBase) and module.track_running_stats:
        return tuple(n for n in ("running_mean", "running_var", "num_batches_tracked") if module._buffers.get(n) is not None)
    return ()


# torch 2.x (checked 2.13) DDP with `broadcast_buffers` (Trainer's default): a DDP forward first copies rank 0's
# buffers into every rank, but only when the forward before it synced gradients (`require_forward_param_sync`,
# via the private `_check_sync_bufs_pre_fwd`), and it keeps the buffers' version counters. The passes of a
# micro-batch after the first run under no_sync, so only the first pass would start from rank 0's buffers, and
# the others, restored to the buffers as they were before the micro-batch, from this rank's own. So the broadcast
# the first forward would make is made before the micro-batch's buffers are captured (`_sync_buffers`, the
# function DDP's forward calls), and the forward is told it has been made: the same collective, once, earlier.
# Pinned by tests/test_ddp.py (BatchNorm under DDP: sigma = 0 equals Trainer on every rank, bit for bit).
def broadcast_buffers_now(model: nn.Module) -> None:
    """Make now the buffer broadcast that a DDP module's next forward would make. Elsewhere a no-op."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and model._check_sync_bufs_pre_fwd():
        model._sync_buffers()
        model.require_forward_param_sync = False  # the forward's own broadcast is done


# trl >= 1.0 (checked 1.16): `SFTTrainer`, `DPOTrainer` and `RewardTrainer` advance `_total_train_tokens` in
# `compute_loss` and mirror it in `_metrics["train"]["num_tokens"]`; the step calls `compute_loss` once per pass.
# Their other per-call metrics are appended to the lists of `_metrics["train"]` (older trl: `_stored_metrics`,
# through `store_metrics`) once per call and averaged by `log`. Pinned by tests/test_trl.py.
COUNTED_PER_MICRO_BATCH: tuple[str, ...] = ("_total_train_tokens",)
_METRIC_STORES: tuple[str, ...] = ("_metrics", "_stored_metrics")


def _train_metrics(trainer: Any) -> list[dict[str, list]]:
    stores = [getattr(trainer, a, None) for a in _METRIC_STORES]
    return [s["train"] for s in stores if isinstance(s, dict) and isinstance(s.get("train"), dict)]


def snapshot_counters(trainer: Any) -> dict[str, Any]:
    """The counters of `COUNTED_PER_MICRO_BATCH` and the lengths of trl's per-call metric lists, before a micro-batch."""
    counters = {a: getattr(trainer, a) for a in COUNTED_PER_MICRO_BATCH if hasattr(trainer, a)}
    lengths = [{k: len(v) for k, v in m.items() if isinstance(v, list)} for m in _train_metrics(trainer)]
    return {"counters": counters, "lengths": lengths}


def count_once(trainer: Any, before: dict[str, Any], kept: list[bool]) -> None:
    """Put the counters back to one count per micro-batch, and trl's per-call metrics to one entry per call.

    Args:
        trainer: the trainer whose `compute_loss` ran once per pass.
        before: `snapshot_counters(trainer)` taken before the micro-batch.
        kept: per pass, whether its metrics describe the micro-batch (the passes the logged loss averages).
            Each metric's entries of the micro-batch become their mean over those passes (the value
            itself when they agree, so at zero strength it is the parent trainer's bit for bit); a list
            whose new entries are not a whole number per pass becomes the mean of all of them.
    """
    passes = len(kept)
    for attr, start in before["counters"].items():
        once = start + (getattr(trainer, attr) - start) // passes
        setattr(trainer, attr, once)
        metrics = getattr(trainer, "_metrics", {}).get("train", {})
        if attr == "_total_train_tokens" and "num_tokens" in metrics:
            metrics["num_tokens"] = [once]
    for metrics, lengths in zip(_train_metrics(trainer), before["lengths"]):
        for key, values in metrics.items():
            if isinstance(values, list) and len(values) > lengths.get(key, 0):
                start = lengths.get(key, 0)
                values[start:] = per_micro_batch(values[start:], kept)


def per_micro_batch(entries: list, kept: list[bool]) -> list:
    """One micro-batch's entries of a per-call metric, one per call of a single pass: the mean over the kept passes.

    Args:
        entries: the values appended during the micro-batch, pass after pass (m per pass).
        kept: per pass, whether it counts (at least one should; if none does, every pass counts).

    Returns:
        m values, the i-th the mean of the i-th entry of each kept pass (that entry itself when they are
        all equal); one value, the mean of all entries, when `entries` is not m per pass.
    """

    def mean(values: list) -> Any:
        return values[0] if all(v == values[0] for v in values) else sum(values) / len(values)

    passes = len(kept)
    if len(entries) % passes:
        return [mean(entries)]
    m = len(entries) // passes
    chosen = [i for i in range(passes) if kept[i]] or list(range(passes))
    return [mean([entries[i * m + r] for i in chosen]) for r in range(m)]


# trl (checked 1.16): trainers that produce their training batches during training. GRPO, RLOO and their
# relatives generate completions in `_prepare_inputs` and buffer them across calls (one generation serves
# several steps); OnlineDPO, GKD and the async trainers generate inside `training_step`. The step calls the
# parent's `training_step` once per pass, so every pass would generate (or consume) its own batch: the passes
# of a micro-batch would not see the same data. Detected by the class hierarchy (names and modules), so trl
# is never imported here.
ONLINE_TRAINERS: tuple[str, ...] = (
    "GRPOTrainer", "RLOOTrainer", "OnlineDPOTrainer", "XPOTrainer", "NashMDTrainer", "PPOTrainer", "GKDTrainer",
    "AsyncGRPOTrainer", "AsyncDistillationTrainer", "DistillationTrainer",
)  # fmt: skip


def refuse_stateful_inputs(cls: type) -> None:
    """Raise if `cls` derives from a trl trainer whose input preparation is stateful.

    Raises:
        ValueError: a class of `cls`'s hierarchy is one of `ONLINE_TRAINERS`, or is trl's and defines
            `_prepare_inputs` (trl's online trainers generate there).
    """
    for klass in cls.__mro__:
        if not (klass.__module__ or "").split(".")[0] == "trl":
            continue
        if klass.__name__ in ONLINE_TRAINERS or "_prepare_inputs" in vars(klass):
            raise ValueError(
                f"NSOMixin cannot wrap {klass.__name__}: its input preparation is stateful (it generates its training "
                "batches during training and keeps them across calls), but the step runs the parent's training_step "
                "once per pass and every pass must see the same batch. Use NSOMixin with a trainer that reads its "
                "batches from a dataset (SFTTrainer, DPOTrainer, RewardTrainer)."
            )


# trl (checked 1.16): with a peft model and no `ref_model`, DPOTrainer (and KTOTrainer) computes the reference
# log-probabilities with the same module, its adapters disabled, inside every call of `compute_loss`, unless they
# were computed before training (`precompute_ref_log_probs`). The merged-space methods write their noise into the
# base weights, which that reference forward reads. Pinned by tests/test_trl.py.
def refuse_perturbed_reference(trainer: Any, method: str, merged_methods: tuple[str, ...]) -> None:
    """Raise if a merged-space method would perturb the reference model of a trl preference trainer.

    Raises:
        ValueError: `method` writes noise into base weights, `trainer` has `ref_model=None` with a peft
            model, and the reference log-probabilities are not precomputed.
    """
    if method not in merged_methods or not hasattr(trainer, "ref_model") or trainer.ref_model is not None:
        return
    if not hasattr(trainer.model, "peft_config") or getattr(trainer, "precompute_ref_logps", False):
        return
    raise ValueError(
        f"NSOConfig.method={method!r} writes its noise into the base weights, and {type(trainer).__name__} computes "
        "its reference model as this peft model with the adapters disabled, which reads the same base weights: the "
        "reference would be perturbed. Set precompute_ref_log_probs=True (the reference is computed before "
        "training), pass a separate ref_model, or use method='nso' / 'rwp' (noise on the adapters only)."
    )
