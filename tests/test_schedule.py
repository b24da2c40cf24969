"""The perturbation schedule (NSOConfig.perturb_start, perturb_every): which optimizer steps run the method's passes.

Known answers: the decision by hand; a plain phase that is Trainer's run bit for bit; a late phase that
is Trainer's checkpoint resumed by the method; forward calls per step; resume across the boundary.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback

import nso_hf.trainer as trainer_module
from nso_hf import NSOConfig, NSOTrainer
from nso_hf.ramp import noise_ramp_factor
from nso_hf.schedule import first_perturbed_step, is_perturbed_step, perturbed_step_count, ramp_factor, scheduled_passes

from conftest import assert_same_weights, lm_examples, load_script, params_of, tiny_llama, training_args


# 1. The decision: a pure function of (step, max_steps), checked by hand.
def test_first_perturbed_step_reads_the_decimal_the_user_wrote():
    assert 0.29 * 100 < 29  # binary floating point: a plain floor would give 28
    assert first_perturbed_step(100, 0.29) == 29
    assert first_perturbed_step(200, 0.75) == 150
    assert first_perturbed_step(7, 0.5) == 3
    assert first_perturbed_step(10, 0.0) == 0
    assert first_perturbed_step(0, 0.5) == 0  # max_steps unknown (a step called outside train): perturb


@pytest.mark.parametrize(
    "max_steps, start, every, perturbed",
    [(8, 0.5, 1, [4, 5, 6, 7]), (8, 0.0, 3, [0, 3, 6]), (10, 0.25, 2, [2, 4, 6, 8]), (7, 0.25, 3, [1, 4]),
     (4, 0.99, 1, [3]), (8, 0.0, 1, list(range(8)))],
)  # fmt: skip
def test_which_steps_are_perturbed(max_steps, start, every, perturbed):
    assert [t for t in range(max_steps) if is_perturbed_step(t, max_steps, start, every)] == perturbed
    assert perturbed_step_count(max_steps, start, every) == len(perturbed)
    # A plain step makes 1 pass, a perturbed one 2 (nso): steps + perturbed steps.
    assert scheduled_passes(max_steps, start, every, 2) == max_steps + len(perturbed)
    assert scheduled_passes(max_steps, start, every, 1) == max_steps


def test_cosine_ramp_spans_the_perturbed_phase():
    assert ramp_factor(4, 8, 0.5, "cosine") == 0.0  # the first perturbed step starts the ramp
    assert ramp_factor(6, 8, 0.5, "cosine") == pytest.approx(0.5)  # half-way through the phase
    assert ramp_factor(6, 8, 0.5, "none") == 1.0
    assert [ramp_factor(t, 8, 0.0, "cosine") for t in range(8)] == [noise_ramp_factor(t, 8, "cosine") for t in range(8)]


# 2. The plain phase is Trainer's run, and the perturbed phase is Trainer's checkpoint resumed by the method.
N = 2  # max_steps = 2N, perturb_start = 0.5: steps 0..N-1 plain, N..2N-1 perturbed


def build(lora: bool) -> torch.nn.Module:
    model = tiny_llama(dropout=0.2)  # dropout on: the global RNG must match Trainer's too
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    return model


class WeightsAt(TrainerCallback):
    """The model's parameters right after optimizer step `step`."""

    def __init__(self, step: int):
        self.step, self.weights = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = params_of(model)


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("lora", [False, True])
def test_plain_phase_is_trainer_and_the_late_phase_is_its_checkpoint_resumed(tmp_path, lora, grad_accum):
    def args(out, **kw):
        return training_args(tmp_path / out, max_steps=2 * N, gradient_accumulation_steps=grad_accum, **kw)

    at_n = WeightsAt(N)
    plain = build(lora)
    Trainer(model=plain, args=args("plain", save_strategy="steps", save_steps=N), train_dataset=lm_examples(),
            callbacks=[at_n]).train()  # fmt: skip
    checkpoint = str(tmp_path / "plain" / f"checkpoint-{N}")
    for method in ("nso", "sam"):
        cfg = NSOConfig(method=method, sigma=0.05, rho=0.05, noise_ramp="none")
        mid, late = WeightsAt(N), build(lora)
        NSOTrainer(model=late, args=args(f"{method}_late"), train_dataset=lm_examples(), callbacks=[mid],
                   nso_config=replace(cfg, perturb_start=0.5)).train()  # fmt: skip
        assert_same_weights(mid.weights, at_n.weights, exact=True)
        resumed = build(lora)
        NSOTrainer(model=resumed, args=args(f"{method}_resumed"), train_dataset=lm_examples(), nso_config=cfg).train(
            resume_from_checkpoint=checkpoint
        )
        assert_same_weights(params_of(late), params_of(resumed), exact=True)
        # and the perturbed phase did change the trajectory
        assert any(not torch.equal(v, params_of(plain)[n]) for n, v in params_of(late).items())


# 3. Forward calls per optimizer step follow the schedule; a plain step never snapshots W.
class CallsPerStep(TrainerCallback):
    def __init__(self, calls: list):
        self.calls, self.per_step, self.seen = calls, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(len(self.calls) - self.seen)
        self.seen = len(self.calls)


# max_steps 7, perturb_start 0.25: the phase starts at floor(1.75) = 1; counted from there.
PERTURBED = {2: [1, 3, 5], 3: [1, 4]}
# per logging window of 3 steps (steps 0-2, 3-5; step 6 is not logged): perturbed steps in each
LOGGED = {2: [1, 2], 3: [1, 1]}


@pytest.mark.parametrize(
    "method, every",
    [("nso", 2), ("nso", 3), ("rwp", 2), ("sam", 3), ("asam", 2), ("flat_lora", 2), ("nso_merged", 3)],
)
def test_forward_calls_per_step_follow_the_schedule(args_factory, monkeypatch, method, every):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    calls, backups = [], []
    model.register_forward_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(trainer_module, "Perturbation", lambda *a, **k: backups.append(1) or Perturbation(*a, **k))
    cfg = NSOConfig(method=method, sigma=0.05, perturb_start=0.25, perturb_every=every)
    counter = CallsPerStep(calls)
    args = args_factory(max_steps=7, gradient_accumulation_steps=2, per_device_train_batch_size=2, logging_steps=3)
    trainer = NSOTrainer(model=model, args=args, train_dataset=lm_examples(), nso_config=cfg, callbacks=[counter])
    trainer.train()
    passes = cfg.passes_per_micro_batch
    expected = [2 * (passes if t in PERTURBED[every] else 1) for t in range(7)]
    assert counter.per_step == expected
    assert trainer.nso_passes == sum(expected) == 2 * scheduled_passes(7, 0.25, every, passes)
    assert len(backups) == 2 * len(PERTURBED[every])  # W is copied on perturbed micro-batches only
    assert [h["nso/perturbed_steps"] for h in trainer.state.log_history if "loss" in h] == LOGGED[every]


Perturbation = trainer_module.Perturbation


# 4. Resume before, at and after the boundary ends where the uninterrupted run ends.
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("schedule_resume")
    model = tiny_llama(dropout=0.2)
    args = training_args(out, max_steps=4, save_strategy="steps", save_steps=1)
    NSOTrainer(model=model, args=args, train_dataset=lm_examples(), nso_config=NSOConfig(sigma=0.05, perturb_start=0.5)).train()
    return out, params_of(model)


@pytest.mark.parametrize("resume_at", [1, 2, 3])  # the first perturbed step is 2 (of 0..3)
def test_resume_across_the_phase_boundary_repeats_the_uninterrupted_run(tmp_path, uninterrupted, resume_at):
    out, full = uninterrupted
    model = tiny_llama(dropout=0.2)
    args = training_args(tmp_path, max_steps=4, save_strategy="no")
    cfg = NSOConfig(sigma=0.05, perturb_start=0.5)
    NSOTrainer(model=model, args=args, train_dataset=lm_examples(), nso_config=cfg).train(
        resume_from_checkpoint=str(out / f"checkpoint-{resume_at}")
    )
    assert_same_weights(params_of(model), full, exact=True)


# 5. The benchmark's schedule rows and the ratio they should cost.
def test_benchmark_schedule_rows_and_expected_ratio():
    bench_script = load_script("benchmark_step.py")
    row = bench_script["parse_schedule"]("nso", "start=0.5,every=2")
    assert (row.method, row.perturb_start, row.perturb_every, row.label) == ("nso", 0.5, 2, "nso late 0.5 every 2")
    bench = bench_script["BenchArguments"](warmup=2, steps=8)  # steps 0..9; perturbed 5, 7, 9; timed 2..9
    assert bench_script["expected_time_ratio"](bench, row) == 1 + 3 / 8
    # Two rounds of steps 2..9 (perturbed: 5, 7, 9): the plain steps take 1 s, the perturbed 2 s, and one
    # plain step of the second round stalls for 100 s. Each kind's median ignores the stall; the step time
    # is 5/8 x 1 + 3/8 x 2 (the mean would be 1.375 + 100/16).
    round_times = [1.0, 1.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
    stalled = [1.0, 100.0, *round_times[2:]]
    stats = bench_script["step_statistics"](round_times + stalled, bench_script["BenchArguments"](warmup=2, steps=8, rounds=2), row)
    assert (stats["plain_s_per_step"], stats["perturbed_s_per_step"], stats["s_per_step"]) == (1.0, 2.0, 1.375)
    every_step = bench_script["step_statistics"]([1.0, 3.0, 2.0], bench, bench_script["Arm"]("nso"))
    assert every_step == {"s_per_step": 2.0, "mean_s_per_step": 2.0}
    with pytest.raises(ValueError, match=r"--schedules: 'late=0.5' is not start=F, every=N"):
        bench_script["parse_schedule"]("nso", "late=0.5")
    with pytest.raises(ValueError, match=r"NSOConfig.perturb_every must be an int >= 1, got 0"):
        bench_script["parse_schedule"]("nso", "every=0")
