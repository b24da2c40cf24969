"""One launch of tests/test_methods_ddp.py: `torchrun --nproc_per_node 2 tests/methods_ddp_worker.py OUT`.

Every method of NSOTrainer but nso (tests/test_ddp.py) under DDP (2 CPU processes, gloo) on the tiny
Llama of conftest (full weights for none/rwp/sam/asam, LoRA for flat_lora/nso_merged): at zero
strength against Trainer, and at a real strength, counting the gradient all-reduces through a DDP communication hook. Each rank writes
its trainable weights and what it counted; the test holds them to the math.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from nso_hf import NSOConfig, NSOTrainer  # noqa: E402

from helpers import CountAllReduces, finish_worker, lm_examples, tiny_llama  # noqa: E402

OUT = sys.argv[1]
RANK = int(os.environ["RANK"])
STEPS = 3


def model(lora: bool) -> torch.nn.Module:
    m = tiny_llama(seed=0, dropout=0.1)
    if lora:
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return m


class PerStep(TrainerCallback):
    """All-reduces and forward calls of each optimizer step (from the counter and a forward hook)."""

    def __init__(self, counter: CountAllReduces):
        self.counter, self.forwards = counter, []
        self.allreduces_per_step: list[int] = []
        self.forwards_per_step: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.allreduces_per_step.append(self.counter.calls - sum(self.allreduces_per_step))
        self.forwards_per_step.append(len(self.forwards) - sum(self.forwards_per_step))


def train(name: str, lora: bool, cfg: NSOConfig | None, grad_accum: int = 1, steps: int = STEPS) -> dict:
    args = TrainingArguments(
        output_dir=os.path.join(OUT, name), per_device_train_batch_size=8 // grad_accum,
        gradient_accumulation_steps=grad_accum, max_steps=steps, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, ddp_backend="gloo",
        ddp_find_unused_parameters=False, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=11, dataloader_num_workers=0,
    )  # fmt: skip
    counter = CountAllReduces()
    per_step = PerStep(counter)
    kw = {} if cfg is None else {"nso_config": cfg}
    cls = Trainer if cfg is None else NSOTrainer
    net = model(lora)
    net.register_forward_hook(lambda *_: per_step.forwards.append(1))
    trainer = cls(model=net, args=args, train_dataset=lm_examples(64, seed=3), callbacks=[counter, per_step], **kw)
    counter.trainer = trainer
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    torch.save(weights, os.path.join(OUT, f"{name}_rank{RANK}.pt"))
    logs = trainer.state.log_history
    return {
        "allreduce_calls": counter.calls,
        "loss": [h["loss"] for h in logs if "loss" in h],
        "sharpness": [h["nso/sharpness"] for h in logs if "nso/sharpness" in h],
        "allreduces_per_step": per_step.allreduces_per_step,
        "forwards_per_step": per_step.forwards_per_step,
        "perturbed_steps": [h["nso/perturbed_steps"] for h in logs if "nso/perturbed_steps" in h],
    }


RUNS = {
    "plain_full": (False, None, 1),
    "plain_full_ga2": (False, None, 2),
    "plain_lora": (True, None, 1),
    "none": (False, NSOConfig(method="none"), 1),
    "rwp_sigma0": (False, NSOConfig(method="rwp", sigma=0.0), 1),
    "sam_rho0": (False, NSOConfig(method="sam", rho=0.0), 1),
    "asam_rho0": (False, NSOConfig(method="asam", rho=0.0), 1),
    "flat_lora_sigma0": (True, NSOConfig(method="flat_lora", sigma=0.0), 1),
    "nso_merged_sigma0": (True, NSOConfig(method="nso_merged", sigma=0.0), 1),
    "rwp": (False, NSOConfig(method="rwp", sigma=0.05), 1),
    "sam": (False, NSOConfig(method="sam", rho=0.05), 1),
    "sam_ga2": (False, NSOConfig(method="sam", rho=0.05), 2),
    "asam": (False, NSOConfig(method="asam", rho=0.5), 1),
    "flat_lora": (True, NSOConfig(method="flat_lora", sigma=0.1), 1),
    "nso_merged": (True, NSOConfig(method="nso_merged", sigma=0.1), 1),
    # The schedule over 4 steps with accumulation 2: steps 1 and 3 perturbed, 0 and 2 plain.
    "plain_full_ga2_4": (False, None, 2, 4),
    "schedule_nso": (False, NSOConfig(sigma=0.05, perturb_start=0.25, perturb_every=2), 2, 4),
    "schedule_sam": (False, NSOConfig(method="sam", rho=0.05, perturb_start=0.25, perturb_every=2), 2, 4),
}

if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(420, exit=True)
    results = {name: train(name, *spec) for name, spec in RUNS.items()}
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(results, f)
    finish_worker()  # results are written: leave without interpreter teardown (see helpers.py)
