"""Worker for tests/test_ddp.py: `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT SIGMA SYNC GA`.

Trains a small regression MLP with NSOTrainer under DDP (gloo, CPU), counts the gradient
all-reduces through a DDP communication hook, and saves each rank's parameters.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from transformers import TrainingArguments

from nso_hf import NSOConfig, NSOTrainer

sys.path.insert(0, os.path.dirname(__file__))
from helpers import CountAllReduces, finish_worker  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, y):
        return {"loss": nn.functional.mse_loss(self.net(x).squeeze(-1), y)}


def dataset(n: int = GLOBAL_BATCH) -> list[dict[str, torch.Tensor]]:
    # One global batch is the whole data set: every step sees all of it, on one process or two.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(-1).sin()
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def train(out_dir: str, sigma: float, sync: bool, grad_accum: int, world_size: int) -> NSOTrainer:
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=GLOBAL_BATCH // (world_size * grad_accum),
        gradient_accumulation_steps=grad_accum,
        max_steps=STEPS,
        learning_rate=0.05,
        use_cpu=True,
        ddp_backend="gloo" if world_size > 1 else None,
        ddp_find_unused_parameters=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=7,
    )
    cfg = NSOConfig(sigma=sigma, num_perturbations=2, sync_noise_across_ranks=sync)
    counter = CountAllReduces() if world_size > 1 else None
    trainer = NSOTrainer(
        model=Regression(), args=args, train_dataset=dataset(), nso_config=cfg, callbacks=[counter] if counter else None
    )
    if counter:
        counter.trainer = trainer
    trainer.train()
    trainer.allreduce_calls = counter.calls if counter else 0
    return trainer


if __name__ == "__main__":
    out, sigma, sync, grad_accum = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    rank = int(os.environ["RANK"])
    trainer = train(out, sigma, sync, grad_accum, int(os.environ["WORLD_SIZE"]))
    torch.save(trainer.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"allreduce_calls": trainer.allreduce_calls, "steps": trainer.state.global_step}, f)
    finish_worker()  # results are written: leave without interpreter teardown (see helpers.py)
