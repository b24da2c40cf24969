"""The architecture matrix: NSOMixin on each model family changes the gradient and nothing else.

For every architecture of tests/architectures.py, three short runs (three steps, batch 4, one thread):
- sigma = 0 against the parent trainer: weights, buffers, logged losses and the torch / numpy / Python
  generator states after training are equal bit for bit;
- sigma > 0 at learning rate 0: the weights come back bit for bit, and each micro-batch, recomputed by
  hand from what the step saw (its batch, buffers, generator states and noise seeds), gives exactly
  the buffers, the logged loss and the generator states the step left: every pass started from the
  same generators and buffers, the buffers hold the mean of the two passes' updates
  (nso_hf/buffers.py), and the generators are where one plain pass leaves them.
"""

from __future__ import annotations

import pytest
import torch

from nso_hf import NSOConfig, NSOMixin
from nso_hf.noise import Perturbation

from architectures import ARCHITECTURES, Architecture
from helpers import assert_same_rng, buffers_of, params_of, rng_state, set_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
SIGMA = 0.05


def assert_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == ref.keys(), what
    for name in ref:
        assert torch.equal(got[name], ref[name]), f"{what}: {name}"


class Recording:
    """Placed first in the MRO: keeps what each micro-batch's step saw, and what it returned."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        seen = {
            "inputs": {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()},
            "buffers": buffers_of(model), "rng": rng_state(), "step": self.state.global_step,
            "num_items": num_items_in_batch,
        }  # fmt: skip
        seen["loss"] = super().training_step(model, inputs, num_items_in_batch)
        self.seen = [*getattr(self, "seen", []), seen]
        return seen["loss"]


def run(arch: Architecture, trainer_cls: type, tmp_path, learning_rate: float = 1e-2, **kw):
    model = arch.build()
    args = arch.arguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=learning_rate,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=5,
        dataloader_num_workers=0, **arch.extra_args,
    )  # fmt: skip
    trainer = trainer_cls(model=model, args=args, train_dataset=arch.examples(), data_collator=arch.collator, **kw)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, trainer, losses, rng_state()


def nso_class(arch: Architecture, recording: bool = False) -> type:
    bases = (Recording, NSOMixin, arch.parent) if recording else (NSOMixin, arch.parent)
    return type(f"NSO{arch.parent.__name__}", bases, {})


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=[a.name for a in ARCHITECTURES])
def test_sigma_zero_equals_the_parent_trainer(arch, tmp_path):
    ref, _, ref_losses, ref_rng = run(arch, arch.parent, tmp_path / "parent")
    got, _, losses, rng = run(arch, nso_class(arch), tmp_path / "nso", nso_config=NSOConfig(sigma=0.0))
    assert_equal(params_of(got), params_of(ref), "weights")
    assert_equal(buffers_of(got), buffers_of(ref), "buffers")
    assert len(losses) == STEPS and losses == ref_losses
    assert_same_rng(rng, ref_rng)
    init = params_of(arch.build())
    assert sum(not torch.equal(init[n], p) for n, p in params_of(got).items()) >= 4  # training moved the weights


def by_hand(trainer, model: torch.nn.Module, seen: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple]:
    """One micro-batch of two-point NSO (k = 1, lam = 0), each pass run by hand from what the step saw.

    Returns the documented buffer update B+ + (B- - B+) / 2 (B+ where the passes agree; counters: B+), the
    mean loss of the two passes, and the generator states after the first pass.
    """
    named = trainer._nso_parameters(model)
    seeds = trainer._nso_seed_table(named, seen["step"], 0)[0]
    moved = Perturbation([p for _, p in named], SIGMA, relative=False)
    results, losses = [], []
    for sign in (1, -1):
        moved.apply(sign, seeds)
        for name, b in model.named_buffers():
            b.data.copy_(seen["buffers"][name])
        set_rng_state(seen["rng"])
        with trainer.compute_loss_context_manager():
            losses.append(trainer.compute_loss(model, dict(seen["inputs"]), num_items_in_batch=seen["num_items"]).detach())
        results.append(buffers_of(model))
        if sign == 1:
            after_first = rng_state()
    moved.restore()
    expected = {}
    for name, plus in results[0].items():
        minus = results[1][name]
        if plus.is_floating_point():
            half = (minus.float() - plus.float()) * 0.5
            expected[name] = torch.where(half == 0, plus, (plus.float() + half).to(plus.dtype))
        else:
            expected[name] = plus
    return expected, torch.stack(losses).mean(), after_first


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=[a.name for a in ARCHITECTURES])
def test_perturbed_step_at_lr_zero_restores_weights_and_leaves_the_documented_buffers(arch, tmp_path):
    init = params_of(arch.build())
    model, trainer, _, rng = run(arch, nso_class(arch, recording=True), tmp_path, learning_rate=0.0, nso_config=NSOConfig(sigma=SIGMA))
    assert_equal(params_of(model), init, "weights after training at lr 0")
    after = [s["buffers"] for s in trainer.seen[1:]] + [buffers_of(model)]
    rngs = [s["rng"] for s in trainer.seen[1:]] + [rng]
    assert len(trainer.seen) == STEPS
    model.train()
    for seen, buffers_after, rng_after in zip(trainer.seen, after, rngs):
        expected, loss, after_first = by_hand(trainer, model, seen)
        assert_equal(buffers_after, expected, f"buffers after step {seen['step']}")
        assert torch.equal(seen["loss"], loss), f"step {seen['step']}: {seen['loss']} != {loss}"
        assert_same_rng(rng_after, after_first)
