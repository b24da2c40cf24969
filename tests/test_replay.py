"""What the passes of a micro-batch replay besides the weights: buffers and every global generator.

A model with BatchNorm whose forward draws from torch's, numpy's and Python's generators (as dropout,
SpecAugment and LayerDrop do): Trainer runs one forward per micro-batch, the step runs several.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Trainer

from nso_hf import NSOConfig, NSOTrainer
from nso_hf.buffers import accumulate_difference, weighted_mean
from nso_hf.passes import pass_plan

from conftest import assert_same_weights, first_batch, params_of, tiny_llama
from helpers import assert_same_rng, buffers_of, rng_state, set_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")


class Noisy(nn.Module):
    """Linear -> BatchNorm -> a draw from every global generator -> dropout -> head; it records its draws."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        # No bias before BatchNorm (it would cancel): its gradient would be rounding noise, which Adam
        # turns into full-size steps of either sign.
        self.lin, self.bn, self.head = nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 1)
        self.register_buffer("constant", torch.arange(3.0))  # never written
        self.draws: list[tuple[float, float, float]] = []

    def forward(self, x, y):
        t, n, r = torch.rand(()), float(np.random.rand()), random.random()
        self.draws.append((t.item(), n, r))
        h = self.bn(self.lin(x)) * (1 + 0.1 * t) + 0.1 * (n + r)
        h = nn.functional.dropout(h, 0.2, self.training)
        return {"loss": nn.functional.mse_loss(self.head(h).squeeze(-1), y)}


def examples(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "y": x[i].sum().sin()} for i in range(n)]


def test_batchnorm_running_stats_do_not_bump_version_counters():
    # Why nso_hf/buffers.py compares values on the first micro-batch and always copies norm statistics
    # (compat.natively_updated_buffers): torch's CPU kernel writes them in place without a version bump.
    bn = nn.BatchNorm1d(3)
    before = {n: b._version for n, b in bn.named_buffers()}
    mean = bn.running_mean.clone()
    bn(torch.randn(4, 3))
    assert not torch.equal(bn.running_mean, mean)
    after = {n: b._version for n, b in bn.named_buffers()}
    assert after["running_mean"] == before["running_mean"] and after["running_var"] == before["running_var"]
    assert after["num_batches_tracked"] == before["num_batches_tracked"] + 1


# 1. sigma = 0 is Trainer: buffers, counters, generators, and every draw the forward makes.
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sigma_zero_equals_trainer_with_batchnorm_and_host_randomness(args_factory, grad_accum):
    args = args_factory(max_steps=3, gradient_accumulation_steps=grad_accum, learning_rate=0.05)
    runs = {}
    for name, cls, kw in (("trainer", Trainer, {}), ("nso", NSOTrainer, {"nso_config": NSOConfig(sigma=0.0, num_perturbations=2)})):
        model = Noisy()
        cls(model=model, args=args, train_dataset=examples(), **kw).train()
        runs[name] = (model, rng_state())
    (ref, ref_rng), (got, rng) = runs["trainer"], runs["nso"]
    assert_same_weights(params_of(got), params_of(ref), exact=grad_accum == 1)
    assert_same_weights(buffers_of(got), buffers_of(ref), exact=grad_accum == 1)
    assert got.bn.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == 3 * grad_accum
    assert_same_rng(rng, ref_rng)
    # Four passes per micro-batch, each drawing what Trainer's one pass drew.
    assert len(got.draws) == 4 * len(ref.draws)
    assert [got.draws[i] for i in range(0, len(got.draws), 4)] == ref.draws
    assert all(got.draws[i] == got.draws[i - i % 4] for i in range(len(got.draws)))


def test_a_schedule_of_plain_and_perturbed_steps_keeps_batchnorm_equal_to_trainer(args_factory):
    # Steps 0 and 2 of 4 run two passes (replayed), steps 1 and 3 are Trainer's own step: one update each.
    args = args_factory(max_steps=4, learning_rate=0.05)
    ref, got = Noisy(), Noisy()
    Trainer(model=ref, args=args, train_dataset=examples()).train()
    ref_rng = rng_state()
    NSOTrainer(model=got, args=args, train_dataset=examples(), nso_config=NSOConfig(sigma=0.0, perturb_every=2)).train()
    assert_same_weights(params_of(got), params_of(ref), exact=True)
    assert_same_weights(buffers_of(got), buffers_of(ref), exact=True)
    assert got.bn.num_batches_tracked.item() == 4 and len(got.draws) == 6
    assert_same_rng(rng_state(), ref_rng)


# 2. Every method's plan, at a strength > 0, one micro-batch: the passes see the same draws, the
# generators end where one pass leaves them, and the buffers hold the documented update, by hand.
CONFIGS = {
    "nso": NSOConfig(sigma=0.3),
    "nso-k2": NSOConfig(sigma=0.3, num_perturbations=2),
    "nso-clean": NSOConfig(sigma=0.3, unperturbed_weight=0.5),
    "rwp-k2": NSOConfig(method="rwp", sigma=0.3, num_perturbations=2),
    "sam": NSOConfig(method="sam", rho=0.5),
    "asam": NSOConfig(method="asam", rho=0.5),
    "flat_lora-k2": NSOConfig(method="flat_lora", sigma=0.3, num_perturbations=2),
    "nso_merged": NSOConfig(method="nso_merged", sigma=0.3),
}


def model_for(name: str) -> nn.Module:
    if name in ("flat_lora-k2", "nso_merged"):
        lora = LoraConfig(r=2, target_modules=["lin", "head"], init_lora_weights=False)
        return get_peft_model(Noisy(), lora)
    return Noisy()


def expected_update(trainer, model, batch, cfg, buffers, rng) -> dict[str, torch.Tensor]:
    """The documented update of one micro-batch, each pass run by hand from the same buffers and generators."""
    plan = pass_plan(cfg)

    def forward_from_start() -> dict[str, torch.Tensor]:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        set_rng_state(rng)
        with torch.no_grad():
            model(**batch)
        return buffers_of(model)

    if any(p.at_w for p in plan):  # SAM/ASAM's ascent pass, or the clean pass: its update is kept
        return forward_from_start()
    named = trainer._nso_parameters(model)
    seeds = trainer._nso_seed_table(named, 0, 0)
    moved = trainer._nso_perturbation([p for _, p in named], 0)
    results = []
    for p in plan:
        moved.apply(p.sign, seeds[p.draw])
        results.append(forward_from_start())
    moved.restore()
    out = {}
    for name, ref in results[0].items():
        if not ref.is_floating_point():
            out[name] = ref
            continue
        total = sum((p.weight * (r[name] - ref) for p, r in zip(plan[1:], results[1:])), torch.zeros_like(ref))
        mean = ref + total / sum(p.weight for p in plan)
        out[name] = torch.where(total == 0, ref, mean)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_method_replays_generators_and_keeps_the_documented_buffer_update(args_factory, name):
    cfg = CONFIGS[name]
    model = model_for(name)
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=examples(), nso_config=cfg)
    batch = first_batch(trainer)
    weights, buffers, rng = params_of(model), buffers_of(model), rng_state()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.draws.clear()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)
    got, got_rng = buffers_of(model), rng_state()
    draws = list(base.draws)

    assert len(draws) == cfg.passes_per_micro_batch and len(set(draws)) == 1
    assert_same_weights(params_of(model), weights, exact=True)
    expected = expected_update(trainer, model, batch, cfg, buffers, rng)
    for n in expected:
        assert torch.equal(got[n], expected[n]), n
    assert got["bn.num_batches_tracked" if base is model else "base_model.model.bn.num_batches_tracked"].item() == 1
    # The perturbed passes really did update the statistics differently (for the mean rule to matter).
    assert not torch.equal(got[[n for n in got if n.endswith("running_mean")][0]], buffers[[n for n in got if n.endswith("running_mean")][0]])
    # Generators: where one plain forward from the same start leaves them.
    set_rng_state(rng)
    with torch.no_grad():
        model(**batch)
    assert_same_rng(got_rng, rng_state())


def test_weighted_mean_by_hand():
    ref = torch.tensor([1.0, 2.0, -0.0], dtype=torch.bfloat16)
    total = accumulate_difference(None, torch.tensor([3.0, 2.0, -0.0], dtype=torch.bfloat16), ref, 0.25)
    total = accumulate_difference(total, torch.tensor([1.0, 2.0, -0.0], dtype=torch.bfloat16), ref, 0.25)
    assert total.dtype == torch.float32
    # B1 + (0.25 * (3 - 1) + 0.25 * 0) / 0.75 = 1 + 2/3, rounded once into bf16; B1's own bits where all agree.
    got = weighted_mean(ref, total, 0.75)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.tensor([1.0 + 2.0 / 3.0, 2.0, -0.0]).to(torch.bfloat16))
    assert torch.signbit(got[2])


# 3. A pass that raises: weights, buffers and generators all as before the micro-batch.
def test_a_pass_that_raises_restores_buffers_and_generators(args_factory):
    model = Noisy()
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=examples(), nso_config=NSOConfig(sigma=0.3))
    batch = first_batch(trainer)
    calls = []

    def fail_on_second_pass(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    hook = model.head.register_forward_pre_hook(fail_on_second_pass, with_kwargs=True)
    weights, buffers, rng = params_of(model), buffers_of(model), rng_state()
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(RuntimeError, match="boom"):
        trainer.training_step(model, batch)
    assert len(calls) == 2  # the first pass did update the statistics, the second raised inside its forward
    assert_same_weights(params_of(model), weights, exact=True)
    assert_same_weights(buffers_of(model), buffers, exact=True)
    assert_same_rng(rng_state(), rng)
    hook.remove()
    trainer.training_step(model, batch)  # usable again
    assert model.bn.num_batches_tracked.item() == 1


# 4. Passes dropped as non-finite do not count in the mean.
class NoisyInfOnSecondPass(Noisy):
    def forward(self, x, y):
        out = super().forward(x, y)
        return {"loss": out["loss"] * float("inf")} if len(self.draws) % 4 == 2 else out


def test_skipped_passes_do_not_count_in_the_buffer_update(args_factory):
    cfg = NSOConfig(sigma=0.3, num_perturbations=2, nonfinite_loss="skip")
    model = NoisyInfOnSecondPass()
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=examples(), nso_config=cfg)
    batch = first_batch(trainer)
    buffers, rng = buffers_of(model), rng_state()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)
    got = buffers_of(model)
    # By hand: passes 1, 3, 4 (weights 1/4 each) count; pass 2 (inf) does not.
    named = trainer._nso_parameters(model)
    seeds = trainer._nso_seed_table(named, 0, 0)
    moved = trainer._nso_perturbation([p for _, p in named], 0)
    results = []
    for p in [p for i, p in enumerate(pass_plan(cfg)) if i != 1]:
        moved.apply(p.sign, seeds[p.draw])
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        set_rng_state(rng)
        with torch.no_grad():
            Noisy.forward(model, **batch)
        results.append(buffers_of(model))
    moved.restore()
    ref = results[0]["bn.running_mean"]
    total = 0.25 * (results[1]["bn.running_mean"] - ref) + 0.25 * (results[2]["bn.running_mean"] - ref)
    assert torch.equal(got["bn.running_mean"], ref + total / 0.75)
    assert got["bn.num_batches_tracked"].item() == 1


# 5. What it costs: copies of the changed buffers only, nothing for a model whose forward changes none.
def test_only_the_buffers_a_forward_changes_are_copied(args_factory):
    model = Noisy()
    trainer = NSOTrainer(model=model, args=args_factory(max_steps=2), train_dataset=examples(), nso_config=NSOConfig(sigma=0.1))
    trainer.train()
    names = {id(b): n for n, b in model.named_buffers()}
    replay = trainer._nso_buffers.replay(model, at_w=[False, False], weights=[0.5, 0.5])
    assert sorted(names[k] for k in replay.copied) == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
    assert [flat.numel() for flat in replay.backup] == [16, 1]  # one flat copy per dtype: 8 + 8 floats, one counter

    llama = tiny_llama()  # rotary inv_freq: a buffer no forward writes
    trainer = NSOTrainer(model=llama, args=args_factory(max_steps=2), train_dataset=[{"input_ids": torch.arange(3, 19), "labels": torch.arange(3, 19)}] * 8, nso_config=NSOConfig(sigma=0.1))
    trainer.train()
    assert list(llama.buffers()) and trainer._nso_buffers.changing == set()
    assert trainer._nso_buffers.replay(llama, at_w=[False, False], weights=[0.5, 0.5]).backup == []

    plain = Noisy()  # method 'none': one pass, nothing replayed or copied
    none = NSOTrainer(model=plain, args=args_factory(max_steps=1), train_dataset=examples(), nso_config=NSOConfig(method="none"))
    none.train()
    assert none._nso_buffers.changing is None


class HiddenEMA(Noisy):
    """An EMA buffer written in place without a version bump (as torch's BatchNorm kernel writes its statistics)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x, y):
        with torch.autograd._unsafe_preserve_version_counter(self.ema):
            self.ema.mul_(0.9).add_(0.1 * self.lin.weight.detach().sum(0))
        return super().forward(x, y)


def test_a_buffer_written_without_a_version_bump_is_learned_from_its_value(args_factory):
    args = args_factory(max_steps=3, learning_rate=0.05)
    ref, got = HiddenEMA(), HiddenEMA()
    Trainer(model=ref, args=args, train_dataset=examples()).train()
    trainer = NSOTrainer(model=got, args=args, train_dataset=examples(), nso_config=NSOConfig(sigma=0.0))
    trainer.train()
    assert torch.equal(got.ema, ref.ema) and torch.equal(got.bn.running_var, ref.bn.running_var)
    assert (id(got), "ema") in trainer._nso_buffers.changing and (id(got), "constant") not in trainer._nso_buffers.changing


# 6. A forward that replaces a buffer (a cache), or changes one for the first time late in training.
class Cache(Noisy):
    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(8))
        self.register_buffer("late", torch.zeros(()))
        self.seen: list[torch.Tensor] = []  # the cache object each pass started from
        self.made: list[torch.Tensor] = []

    def forward(self, x, y):
        self.seen.append(self.cache)
        self.cache = self.lin(x).detach().mean(0)  # assigning to a buffer name replaces the object
        self.made.append(self.cache)
        if len(self.draws) >= 4:  # from the third micro-batch on (two passes each)
            self.late.add_(1)
        return super().forward(x, y)


def test_replaced_buffers_and_late_changes(args_factory, caplog):
    model = Cache()
    original = model.cache
    trainer = NSOTrainer(model=model, args=args_factory(max_steps=4, learning_rate=0.0), train_dataset=examples(), nso_config=NSOConfig(sigma=0.3))
    with caplog.at_level(logging.WARNING, logger="nso_hf.buffers"):
        trainer.train()
    # Both passes of a micro-batch start from the same cache object; the first pass's object is kept.
    assert model.seen[0] is original and model.seen[1] is original
    assert all(model.seen[i] is model.seen[i + 1] for i in range(0, len(model.seen), 2))
    assert all(model.seen[i] is model.made[i - 2] for i in range(2, len(model.seen), 2))
    assert model.cache is model.made[-2]
    # `late` first changed in micro-batch 3, unreplayed there (2 passes: +2), then replayed (+1 in micro-batch 4).
    assert model.late.item() == 3.0
    warned = [r for r in caplog.records if "first changed by a forward after the first micro-batch" in r.getMessage()]
    assert len(warned) == 1 and "'late'" in warned[0].getMessage()
