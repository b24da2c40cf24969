"""Data-parallel NSO through the real launcher: `torchrun --nproc_per_node 2` on CPU with gloo.

(`accelerate launch --cpu --num_processes 2` starts a single process, so it cannot test this.)
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import launch

pytestmark = pytest.mark.distributed

sys.path.insert(0, os.path.dirname(__file__))
import ddp_worker  # noqa: E402


def torchrun(out, sigma: float, sync: bool, grad_accum: int = 1) -> list[dict]:
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(os.path.dirname(__file__), "ddp_worker.py"), str(out), str(sigma), "1" if sync else "0", str(grad_accum),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = launch(cmd, env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [
        {"params": torch.load(out / f"rank{r}.pt"), **json.loads((out / f"rank{r}.json").read_text())} for r in range(2)
    ]


@pytest.mark.parametrize("sigma, sync, grad_accum", [(0.0, True, 1), (0.3, True, 2), (0.3, False, 1)])
def test_ddp_matches_single_process_and_replicas_agree(tmp_path, sigma, sync, grad_accum):
    ranks = torchrun(tmp_path / "ddp", sigma, sync, grad_accum)
    r0, r1 = ranks[0]["params"], ranks[1]["params"]
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"replicas differ at {name}"
    # Only the last backward of each optimizer step all-reduces (one bucket for this model),
    # although every micro-batch runs 4 backward passes (k = 2, two-point).
    assert [r["allreduce_calls"] for r in ranks] == [ddp_worker.STEPS, ddp_worker.STEPS]

    single = ddp_worker.train(str(tmp_path / "single"), sigma, sync, grad_accum, world_size=1).model.state_dict()
    if sync:
        # Shared noise: the two ranks' half batches add up to the single process's full batch.
        for name in single:
            torch.testing.assert_close(r0[name], single[name], rtol=1e-5, atol=1e-6)
    else:
        # Each rank drew its own noise, so the step averaged other draws than the single process.
        assert any(not torch.allclose(r0[n], single[n], rtol=1e-5, atol=1e-6) for n in single)


def test_batchnorm_under_ddp_equals_trainer_on_every_rank_at_sigma_zero(tmp_path):
    # BatchNorm's statistics are replicated buffers that DDP broadcasts from rank 0 at the start of a
    # syncing forward; every pass of a micro-batch must start from that broadcast (compat.py,
    # broadcast_buffers_now), or rank 1's later passes would start from its own statistics.
    out = tmp_path / "bn"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(os.path.dirname(__file__), "ddp_worker.py"), str(out), "batchnorm",
    ]  # fmt: skip
    done = launch(cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        for ga in (1, 2):
            ref = torch.load(out / f"trainer-ga{ga}-rank{rank}.pt")
            got = torch.load(out / f"nso-ga{ga}-rank{rank}.pt")
            for name in ref:
                assert torch.equal(got[name], ref[name]), f"rank {rank}, accumulation {ga}: {name}"
            assert got["net.1.num_batches_tracked"].item() == ddp_worker.STEPS * ga
    # The ranks' statistics differ (each saw its own half batch), so the comparison above is per rank.
    r0, r1 = torch.load(out / "nso-ga1-rank0.pt"), torch.load(out / "nso-ga1-rank1.pt")
    assert not torch.equal(r0["net.1.running_mean"], r1["net.1.running_mean"])
