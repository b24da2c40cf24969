"""Worker for tests/test_flatness_fsdp.py: `torchrun --nproc_per_node 2 tests/flatness_fsdp_worker.py OUT`.

Shards a tiny Llama with FSDP2 (`fully_shard`, gloo, CPU), gives each rank one of the two batches,
and measures the Hessian trace (finite differences: the only product that runs on shards) and a
loss curve. Saves the estimates, and whether every rank's weights and `.grad` were left as found.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from nso_hf.flatness import hessian_trace, loss_curve  # noqa: E402

from helpers import finish_worker, lm_examples, tiny_llama  # noqa: E402

NUM_PROBES = 4
ALPHAS = [-0.5, 0.0, 0.5]


def model_and_batches() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The model and the two batches, the same in every process (and in the single-process reference)."""
    model = tiny_llama(seed=0, dropout=0.0)
    model.set_attn_implementation("sdpa")
    batches = [
        {k: torch.stack([e[k] for e in lm_examples(4, seed=s)]) for k in ("input_ids", "labels")} for s in (0, 1)
    ]
    return model, batches


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    try:
        model, batches = model_and_batches()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        params = list(model.parameters())
        assert all(hasattr(p, "to_local") for p in params), "FSDP2 parameters are DTensors"
        for p in params:  # gradients a Trainer would have accumulated: they must survive the measurement
            p.grad = torch.full_like(p, 0.5)
        weights = [p.to_local().detach().clone() for p in params]
        trace = hessian_trace(model, [batches[rank]], num_probes=NUM_PROBES, seed=3)
        curve = loss_curve(model, [batches[rank]], ALPHAS, seed=1)
        result = {
            "samples": trace.samples,
            "num_parameters": trace.num_parameters,
            "curve": curve.losses,
            "weights_restored": all(torch.equal(p.to_local(), w) for p, w in zip(params, weights)),
            "grads_kept": all(torch.equal(p.grad.to_local(), torch.full_like(p.grad.to_local(), 0.5)) for p in params),
            "sharded": any(p.to_local().numel() < p.numel() for p in params),
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    finish_worker()  # results are written: leave without interpreter teardown (see helpers.py)
