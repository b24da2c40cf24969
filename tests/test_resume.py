"""A resumed run repeats the uninterrupted one: noise seeds derive from (seed, step, micro-step, rank, draw)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback

from nso_hf import NSOConfig, NSOTrainer

from conftest import lm_examples, params_of, tiny_llama, training_args


class StopAt(TrainerCallback):
    """Interrupt training after `step` optimizer steps (the schedule still spans max_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, grad_accum):
    cfg = NSOConfig(sigma=0.05, num_perturbations=2)

    def run(out, stop_at=None, resume=None):
        args = training_args(out, max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=grad_accum)
        model = tiny_llama(dropout=0.2)  # dropout on: the RNG state must also come back
        callbacks = [StopAt(stop_at)] if stop_at else None
        trainer = NSOTrainer(model=model, args=args, train_dataset=lm_examples(64), nso_config=cfg, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return params_of(model)

    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "part", stop_at=3)
    checkpoint = tmp_path / "part" / "checkpoint-3"
    assert os.path.isdir(checkpoint)
    assert any(not torch.equal(full[n], interrupted[n]) for n in full)
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    # and training did move the weights
    assert any(not torch.equal(full[n], v) for n, v in params_of(tiny_llama()).items())
