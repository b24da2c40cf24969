"""Worker for tests/test_ddp.py: `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT SIGMA SYNC GA`.

Trains a small regression MLP with NSOTrainer under DDP (gloo, CPU), counts the gradient
all-reduces through a DDP communication hook, and saves each rank's parameters.

`... ddp_worker.py OUT batchnorm`: the same MLP with BatchNorm, trained by Trainer and by NSOTrainer at
sigma = 0 (accumulation 1 at lr > 0, and 2 at lr 0), each rank's weights and buffers saved per run.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

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


class RegressionBN(nn.Module):
    """BatchNorm between the layers: its running statistics and counter are replicated buffers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))

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


BATCHNORM_RUNS = {  # name: (NSO?, gradient accumulation, learning rate)
    "trainer-ga1": (False, 1, 0.05), "nso-ga1": (True, 1, 0.05), "trainer-ga2": (False, 2, 0.0), "nso-ga2": (True, 2, 0.0),
}  # fmt: skip


def train_batchnorm(out_dir: str, nso: bool, grad_accum: int, learning_rate: float, world_size: int) -> nn.Module:
    # With broadcast_buffers (Trainer's default) each syncing forward starts from rank 0's buffers, then every
    # rank updates them with its own half batch: the ranks' buffers differ after a step, as with plain DDP.
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // (world_size * grad_accum),
        gradient_accumulation_steps=grad_accum, max_steps=STEPS, learning_rate=learning_rate, use_cpu=True,
        ddp_backend="gloo", ddp_find_unused_parameters=False, report_to=[], save_strategy="no", disable_tqdm=True, seed=7,
    )  # fmt: skip
    model = RegressionBN()
    kw = {"nso_config": NSOConfig(sigma=0.0, num_perturbations=2)} if nso else {}
    (NSOTrainer if nso else Trainer)(model=model, args=args, train_dataset=dataset(), **kw).train()
    return model


if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    if sys.argv[2] == "batchnorm":
        for name, (nso, grad_accum, lr) in BATCHNORM_RUNS.items():
            model = train_batchnorm(sys.argv[1], nso, grad_accum, lr, int(os.environ["WORLD_SIZE"]))
            torch.save(model.state_dict(), os.path.join(sys.argv[1], f"{name}-rank{rank}.pt"))
        finish_worker()
    out, sigma, sync, grad_accum = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    trainer = train(out, sigma, sync, grad_accum, int(os.environ["WORLD_SIZE"]))
    torch.save(trainer.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"allreduce_calls": trainer.allreduce_calls, "steps": trainer.state.global_step}, f)
    finish_worker()  # results are written: leave without interpreter teardown (see helpers.py)
