"""Every method under DDP through the real launcher (2 CPU processes, gloo): tests/methods_ddp_worker.py.

- zero strength (rho = 0, sigma = 0, method 'none') equals Trainer under DDP, bit for bit;
- at a real strength the replicas agree after training (SAM's ascent uses each rank's local gradient,
  but the accumulated gradient is all-reduced once, by the last pass), and the updates land;
- the gradient all-reduces per run equal Trainer's: the ascent pass and the earlier noise passes run
  under no_sync and add no communication, with and without gradient accumulation.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import launch

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods_ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "methods_ddp_worker.py"), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    done = launch(cmd, env, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    records = json.loads((out / "rank0.json").read_text())

    def weights(name: str, rank: int) -> dict[str, torch.Tensor]:
        return torch.load(out / f"{name}_rank{rank}.pt")

    def of_rank(rank: int) -> dict:
        return json.loads((out / f"rank{rank}.json").read_text())

    return records, weights, of_rank


@pytest.mark.parametrize(
    "run, plain",
    [("none", "plain_full"), ("rwp_sigma0", "plain_full"), ("sam_rho0", "plain_full"), ("asam_rho0", "plain_full"),
     ("flat_lora_sigma0", "plain_lora"), ("nso_merged_sigma0", "plain_lora")],
)  # fmt: skip
def test_zero_strength_equals_trainer_under_ddp(ddp, run, plain):
    records, weights, _ = ddp
    got, ref = weights(run, 0), weights(plain, 0)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert records[run]["loss"] == records[plain]["loss"]
    assert records[run]["allreduce_calls"] == records[plain]["allreduce_calls"] > 0


@pytest.mark.parametrize(
    "run, plain",
    [("rwp", "plain_full"), ("sam", "plain_full"), ("sam_ga2", "plain_full_ga2"), ("asam", "plain_full"),
     ("flat_lora", "plain_lora"), ("nso_merged", "plain_lora")],
)  # fmt: skip
def test_methods_under_ddp_keep_replicas_equal_and_communicate_like_trainer(ddp, run, plain):
    records, weights, _ = ddp
    r0, r1, ref = weights(run, 0), weights(run, 1), weights(plain, 0)
    assert all(torch.equal(r0[n], r1[n]) for n in r0), "replicas differ"
    assert any(not torch.equal(r0[n], ref[n]) for n in ref)  # the method changed the trajectory
    assert all(torch.isfinite(v).all() for v in r0.values())
    assert records[run]["allreduce_calls"] == records[plain]["allreduce_calls"] > 0
    frozen = [n for n in r0 if "base_layer" in n]
    if run in ("flat_lora", "nso_merged"):  # the noise on the frozen base weights was removed exactly
        assert frozen and all(torch.equal(r0[n], ref[n]) for n in frozen)
    if run.startswith(("sam", "asam")):
        assert len(records[run]["sharpness"]) == 3  # the loss at W + e against the loss at W


@pytest.mark.parametrize("run", ["schedule_nso", "schedule_sam"])
def test_schedule_under_ddp_is_the_same_on_every_rank_and_communicates_like_trainer(ddp, run):
    """perturb_start 0.25, perturb_every 2, 4 steps, accumulation 2: steps 1 and 3 perturbed."""
    records, weights, of_rank = ddp
    for rank in (0, 1):
        r, plain_run = of_rank(rank)[run], of_rank(rank)["plain_full_ga2_4"]
        assert r["forwards_per_step"] == [2, 4, 2, 4]
        assert r["perturbed_steps"] == [0, 1, 0, 1]
        # the gradient buckets are all-reduced once per optimizer step, plain or perturbed, as Trainer does
        assert r["allreduces_per_step"] == plain_run["allreduces_per_step"] and min(r["allreduces_per_step"]) > 0
    r0, r1, plain = weights(run, 0), weights(run, 1), weights("plain_full_ga2_4", 0)
    assert all(torch.equal(r0[n], r1[n]) for n in r0), "replicas differ"
    assert any(not torch.equal(r0[n], plain[n]) for n in plain)
    assert records[run]["loss"][0] == records["plain_full_ga2_4"]["loss"][0]  # step 0 is Trainer's step
