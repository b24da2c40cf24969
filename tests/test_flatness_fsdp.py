"""A Hessian trace of an FSDP2-sharded model, through the real launcher: `torchrun --nproc_per_node 2`, gloo, CPU.

The finite-difference product needs no double backward, so it runs on sharded parameters: each rank
holds its shards of the probe and of Hv, and the dot products are summed across ranks. Two ranks
with one batch each must give the trace of one process holding the whole model and both batches,
with the same probes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import flatness_fsdp_worker as worker  # noqa: E402

from nso_hf.flatness import hessian_trace, loss_curve  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]


def test_fsdp2_trace_matches_single_process(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(os.path.dirname(__file__), "flatness_fsdp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    model, batches = worker.model_and_batches()
    single = hessian_trace(model, batches, num_probes=worker.NUM_PROBES, seed=3)
    curve = loss_curve(model, batches, worker.ALPHAS, seed=1)
    for r in ranks:
        assert r["sharded"] and r["weights_restored"] and r["grads_kept"]
        assert r["num_parameters"] == single.num_parameters
        # Same probes; each side carries the finite-difference error (about 1e-4 relative) of its own
        # summation order, so the samples agree to 1e-3, not bit for bit.
        torch.testing.assert_close(torch.tensor(r["samples"]), torch.tensor(single.samples), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(torch.tensor(r["curve"]), torch.tensor(curve.losses), rtol=1e-5, atol=1e-6)
