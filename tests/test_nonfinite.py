"""nonfinite_loss='skip' never moves the model with a non-finite gradient, and nothing non-finite is saved.

A finite loss can still have a non-finite gradient, e.g. when a perturbed pass overflows in backward
only. Here sqrt(w * w) at w = 0 is 0, but its gradient is inf * 0 = nan (w is left unperturbed so
that every pass hits it). Skipping a pass (its loss is finite) cannot help: the optimizer step must
be skipped, with no weight decay and no moment update, as GradScaler skips an fp16 step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nso_hf import NSOConfig, NSOTrainer
from nso_hf.trainer import NonFiniteLossError

from conftest import params_of, training_args


class SqrtAtZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.v = nn.Parameter(torch.ones(4))

    def forward(self, x, labels=None):
        return {"loss": torch.sqrt(self.w * self.w).sum() + self.v.pow(2).sum() + 0.0 * x.sum()}


def examples(n: int = 8) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.zeros(1)} for _ in range(n)]


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # with and without clipping
def test_skip_does_not_step_on_a_non_finite_gradient(tmp_path, max_grad_norm):
    model = SqrtAtZero()
    before = params_of(model)
    args = training_args(tmp_path, max_steps=2, learning_rate=0.1, weight_decay=0.1, max_grad_norm=max_grad_norm)
    cfg = NSOConfig(sigma=0.1, nonfinite_loss="skip", perturb_exclude=["^w$"])
    trainer = NSOTrainer(model=model, args=args, train_dataset=examples(), nso_config=cfg)
    trainer.train()
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name  # no update, no weight decay
    assert not trainer.optimizer.state_dict()["state"]  # AdamW never stepped: no moments, no step count
    skipped = [h["nso/skipped_steps"] for h in trainer.state.log_history if "nso/skipped_steps" in h]
    assert sum(skipped) == 2
    trainer.save_model(str(tmp_path / "saved"))  # the weights are finite, so saving works


def test_raise_policy_is_unchanged_by_the_gradient_check(tmp_path):
    # With 'raise' the step does not look at the gradient: the non-finite update happens, and
    # save_model refuses to write the result.
    model = SqrtAtZero()
    args = training_args(tmp_path, max_steps=1, learning_rate=0.1, max_grad_norm=0.0)
    cfg = NSOConfig(sigma=0.1, perturb_exclude=["^w$"])
    trainer = NSOTrainer(model=model, args=args, train_dataset=examples(), nso_config=cfg)
    trainer.train()
    assert not torch.isfinite(model.w).all()
    with pytest.raises(NonFiniteLossError, match="Refusing to save: parameter 'w' holds non-finite values"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()
