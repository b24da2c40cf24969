"""The sharded engines through Trainer/NSOTrainer: FSDP1, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Two CPU processes with gloo (`torchrun`), one launch per engine; tests/engine_worker.py runs the
scenarios and records what it saw, these tests hold it to the math:
- sigma = 0 equals Trainer under the same engine, with plain SGD and no clipping (AdamW and clipping
  are nearly scale-invariant and would hide a lost or halved pass): losses, grad_norm, weights;
- the weights every optimizer step starts from are the weights the step began with (under ZeRO the
  engine steps inside backward: the worker wraps the engine's step to look);
- sigma > 0 with a clean pass logs nso/sharpness > 0 (the noise reaches the forward), and the
  update survives (the weights move);
- save at step 2, resume in a new run: the end is the uninterrupted run's; the saved model loads;
- a non-finite perturbed loss raises and leaves W exactly as it was; options the engine cannot
  honour are refused when the trainer is built;
- collectives per optimizer step, as docs/distributed.md states them;
- SAM / ASAM under ZeRO-2 (rho = 0 equals Trainer; at rho > 0 the engine steps at W, no extra
  collective), and their refusal under the sharding engines;
- the perturbation schedule: every rank perturbs the same steps, a plain step makes Trainer's
  collectives, and every step starts from W.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from conftest import launch

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ENGINES = ("fsdp1", "fsdp2", "zero2", "zero3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """engine -> rank 0's records (one launch per engine, run once for the whole module)."""
    if any(e.startswith("zero") for e in ENGINES):
        pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `make test` (make deepspeed)")
    out: dict[str, dict] = {}
    for engine in ENGINES:
        folder = tmp_path_factory.mktemp(engine)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(HERE, "engine_worker.py"), engine, str(folder)]  # fmt: skip
        done = launch(cmd, env, timeout=600)
        assert done.returncode == 0, f"{engine}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        out[engine] = json.loads((folder / "rank0.json").read_text())
    return out


def close(a: list[float], b: list[float], rel: float = 1e-6) -> bool:
    return len(a) == len(b) > 0 and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-9) for x, y in zip(a, b))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("scenario", ["sigma0_full_ga1", "sigma0_full_ga2", "sigma0_lora_ga1"])
def test_sigma_zero_equals_trainer(runs, engine, scenario):
    r = runs[engine][scenario]
    assert close(r["nso_loss"], r["plain_loss"]), (r["nso_loss"], r["plain_loss"])
    assert close(r["nso_grad_norm"], r["plain_grad_norm"]), (r["nso_grad_norm"], r["plain_grad_norm"])
    # Per-rank shards (FSDP1's full-state-dict gather crashes under the CPU patch): bit for bit without
    # gradient accumulation, within float rounding with it (the passes' sums associate differently).
    assert r["weights_max_diff"] <= (0.0 if scenario.endswith("ga1") else 1e-6), r["weights_max_diff"]
    assert r["moved"] > 1e-3  # the update survived the step (ZeRO used to train nothing)
    assert r["step_probe"] == [0.0] * 3  # the optimizer stepped at W


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("scenario", ["noise_full", "noise_lora"])
def test_noise_reaches_the_forward_and_steps_happen_at_w(runs, engine, scenario):
    r = runs[engine][scenario]
    # The noise reached the forward: ZeRO-3 used to drop it for the parameters it keeps gathered
    # (LoRA's included) and logged exactly 0.0. For full weights the two-point gap is the curvature
    # term, positive; LoRA's product B A adds dB dA, which the +U/-U average does not cancel and
    # which moves the loss to first order, either way: there the gap is only certain to be non-zero.
    sharp = r["sharpness"]
    assert len(sharp) == 3 and all((s > 0) if scenario == "noise_full" else (s != 0) for s in sharp), sharp
    assert r["step_probe"] == [0.0] * 3
    assert r["moved"] > 1e-3 and r["finite"]
    if engine == "zero3":
        assert r["gathered_vs_partition"] and max(r["gathered_vs_partition"]) == 0.0


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
@pytest.mark.parametrize("scenario", ["resume_full", "resume_lora"])
def test_resume_equals_uninterrupted_and_saved_model_loads(runs, engine, scenario):
    r = runs[engine][scenario]
    assert r["steps"] == [4, 4]
    assert r["resumed_vs_uninterrupted"] == 0.0
    found = r["saved_vs_trained"]
    assert found and all(v == 0.0 for v in found.values()), found


def test_relative_noise_on_fsdp2_shards_uses_whole_rows(runs):
    r = runs["fsdp2"]["relative_scale"]
    assert r["tensors"] == 21 and r["max_gap"] < 1e-6
    assert all(s != 0 for s in runs["fsdp2"]["noise_lora_relative"]["sharpness"])


@pytest.mark.parametrize(
    "engine, relative, skip",
    [
        ("fsdp1", "FSDP1 shards parameters into flat 1-D pieces", None),
        ("fsdp2", None, None),
        ("zero2", None, "cannot skip an update under DeepSpeed ZeRO-2"),
        ("zero3", "DeepSpeed ZeRO-3 shards parameters into flat partitions", "under DeepSpeed ZeRO-3"),
    ],
)
def test_engine_refusals_name_the_engine_and_the_fix(runs, engine, relative, skip):
    r = runs[engine]["refusals"]
    for key, expected in (("relative", relative), ("skip", skip)):
        if expected is None:
            assert r[key] is None, r[key]
        else:
            assert r[key] and expected in r[key] and " Use " in r[key], r[key]


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_loss_raises_and_restores(runs, engine):
    r = runs[engine]["nonfinite"]
    assert r["raised"] and "is nan" in r["raised"]
    assert r["restored_max_diff"] == 0.0


def per_step(counts: dict[str, float], *names: str) -> float:
    return sum(counts.get(n, 0.0) for n in names)


@pytest.mark.parametrize("engine", ENGINES)
def test_collectives_per_optimizer_step(runs, engine):
    """What docs/distributed.md states: the reductions NSO adds per optimizer step, per engine."""
    for scenario, passes in (("sigma0_full_ga1", 2), ("sigma0_full_ga2", 4), ("sigma0_lora_ga1", 2)):
        r = runs[engine][scenario]
        plain, nso = r["plain_collectives"], r["nso_collectives"]
        gathers = ("all_gather", "all_gather_single", "all_gather_into_tensor")
        reduces = ("all_reduce", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor")
        if engine.startswith("fsdp"):
            # Gradients are reduced once per optimizer step, as Trainer does (the earlier passes
            # run under no_sync); each pass gathers the weights again: twice Trainer's all-gathers.
            assert per_step(nso, *reduces) == per_step(plain, *reduces) > 0, (scenario, plain, nso)
            assert per_step(nso, *gathers) == 2 * per_step(plain, *gathers) > 0, (scenario, plain, nso)
        elif engine == "zero2":
            # no_sync is a no-op under ZeRO-2: every backward reduces its gradients, so NSO's extra
            # pass per micro-batch adds one reduction; the weights are all-gathered once, after the step.
            micro_batches = passes // 2
            assert per_step(nso, *reduces) - per_step(plain, *reduces) == micro_batches, (scenario, plain, nso)
            assert per_step(nso, *gathers) == per_step(plain, *gathers), (scenario, plain, nso)
        else:
            # ZeRO-3: each pass reduce-scatters its own gradients (twice Trainer's) and gathers the
            # weights for its forward and backward, plus the re-gathers of the parameters ZeRO-3 keeps
            # gathered after each move of the partitions. Its prefetcher batches gathers depending on
            # its trace, so their count is reported in the docs, and only its direction is checked.
            assert per_step(nso, "reduce_scatter_tensor") == 2 * per_step(plain, "reduce_scatter_tensor") > 0
            assert per_step(nso, *gathers) > per_step(plain, *gathers), (scenario, plain, nso)


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
def test_fsdp_holds_unsharded_gradients_between_passes(runs, engine):
    """The price of one reduce-scatter per step: the earlier pass's gradient is kept unsharded."""
    r = runs[engine]["held_gradients"]
    assert r["held_between_passes"] > r["sharded_gradient"] > 0, r


# ---------------------------------------------------------------- the other methods (docs/methods.md)
@pytest.mark.parametrize("method", ["flat_lora", "nso_merged"])
def test_methods_at_zero_strength_equal_trainer_under_zero2(runs, method):
    r = runs["zero2"]["methods_zero2"][f"{method}_zero"]
    assert close(r["loss"], r["plain_loss"]), (r["loss"], r["plain_loss"])
    assert r["weights_max_diff"] == 0.0
    assert r["step_probe"] == [0.0] * 3 and r["moved"] > 1e-3


@pytest.mark.parametrize("method", ["flat_lora", "nso_merged"])
def test_merged_methods_under_zero2_step_at_w_and_restore_frozen_weights(runs, method):
    r = runs["zero2"]["methods_zero2"][method]
    assert r["step_probe"] == [0.0] * 3  # the engine stepped at W, not at W0 + U
    assert r["moved"] > 1e-3 and r["finite"] and r["vs_plain"] > 0.0  # the noise changed the trajectory
    assert r["frozen_max_diff"] == 0.0  # the base weights carry no trace of the noise


@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_engines_refuse_sam_and_merged_methods(runs, engine):
    r = runs[engine]["method_refusals"]
    name = {"fsdp1": "FSDP1", "fsdp2": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}[engine]
    for method in ("sam", "asam", "flat_lora", "nso_merged"):
        if engine == "zero2":  # whole parameters: every method runs (tests above and below)
            assert r[method] is None, r[method]
        elif method in ("sam", "asam"):
            assert r[method] and f"method='{method}' is not supported under {name}" in r[method], r[method]
            assert f"{name} shards them" in r[method] and " Use DDP or DeepSpeed ZeRO-2" in r[method], r[method]
        else:
            assert r[method] and f"which {name} shards" in r[method] and " Use " in r[method]


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("method", ["sam", "asam"])
def test_sam_at_zero_radius_equals_trainer_under_zero2(runs, method, grad_accum):
    r = runs["zero2"]["sam_zero2"][f"{method}_zero_ga{grad_accum}"]
    assert close(r["loss"], r["plain_loss"]), (r["loss"], r["plain_loss"])
    assert close(r["grad_norm"], r["plain_grad_norm"]), (r["grad_norm"], r["plain_grad_norm"])
    # The ascent pass accumulates nothing, so even with accumulation the sums are Trainer's: bit for bit.
    assert r["weights_max_diff"] == 0.0, r["weights_max_diff"]
    assert r["step_probe"] == [0.0] * 3 and r["moved"] > 1e-3
    # DeepSpeed never sees the ascent pass: it takes this rank's own gradient, with no collective.
    assert r["collectives"] == r["plain_collectives"], (r["collectives"], r["plain_collectives"])


@pytest.mark.parametrize("method, grad_accum", [("sam", 1), ("asam", 1), ("sam", 2)])
def test_sam_under_zero2_ascends_steps_at_w_and_communicates_like_trainer(runs, method, grad_accum):
    r = runs["zero2"]["sam_zero2"][f"{method}_ga{grad_accum}"]
    assert len(r["loss"]) == 3 and all(math.isfinite(v) for v in r["loss"]) and r["finite"], r
    # The loss at W + e exceeds the loss at W: e points up the gradient (to first order the gap is
    # rho * ||g|| for SAM), so the ascent gradient is the real one, not zero or a stale buffer.
    assert all(s > 0 for s in r["sharpness"]) and len(r["sharpness"]) == 3, r["sharpness"]
    assert r["step_probe"] == [0.0] * 3  # the engine stepped at W, not at W + e
    assert r["moved"] > 1e-3 and r["vs_plain"] > 1e-4  # the ascent changed the trajectory
    plain = runs["zero2"]["sam_zero2"][f"{method}_zero_ga{grad_accum}"]["plain_collectives"]
    assert r["collectives"] == plain, (r["collectives"], plain)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ["none", "rwp"])
def test_method_none_and_rwp_at_zero_strength_equal_trainer(runs, engine, method):
    r = runs[engine]["methods_every_engine"][method]
    plain = runs[engine]["sigma0_full_ga1"]  # the same run with transformers.Trainer
    assert close(r["loss"], plain["plain_loss"]), (r["loss"], plain["plain_loss"])
    assert close(r["grad_norm"], plain["plain_grad_norm"]), (r["grad_norm"], plain["plain_grad_norm"])
    assert r["step_probe"] == [0.0] * 3 and r["moved"] > 1e-3


# ---------------------------------------------------------------- the perturbation schedule
@pytest.mark.parametrize("engine, method", [*((e, "nso") for e in ENGINES), ("zero2", "sam")])
def test_schedule_is_the_same_on_every_rank_and_plain_steps_communicate_like_trainer(runs, engine, method):
    """perturb_start 0.25, perturb_every 2, 4 steps, accumulation 2: steps 1 and 3 run 2 passes per micro-batch."""
    r = runs[engine][f"schedule_{method}"]
    for rank in r["ranks"]:
        assert rank["forwards"] == [2, 4, 2, 4], r["ranks"]
        assert rank["perturbed_steps"] == [0, 1, 0, 1], r["ranks"]
    assert r["passes"] == 12
    assert r["step_probe"] == [0.0] * 4  # every step, plain or perturbed, starts from W
    assert r["moved"] > 0 and r["loss"][0] == r["plain_loss"][0]  # step 0 is Trainer's step
    plain, scheduled = r["plain_collectives"], r["collectives"]
    assert len(plain) == len(scheduled) == 4
    # A plain step makes exactly Trainer's collectives, each kind counted (ZeRO-3's gathers included).
    for step in (0, 2):
        assert scheduled[step] == plain[step], (step, plain, scheduled)
