"""The NSO step checked against math with known answers, and against plain Trainer."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer

from nso_hf import NSOConfig, NSOMixin, NSOTrainer
from nso_hf.trainer import NonFiniteLossError

from conftest import Quadratic, assert_same_weights, first_batch, lm_examples, params_of, quadratic_examples, tiny_llama


def one_step_grad(trainer) -> None:
    """Run a single training_step outside the loop (no optimizer step), as Trainer's loop would."""
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    trainer.training_step(trainer.model, first_batch(trainer))


# 1. Quadratic loss: the two-point gradient is exact for every draw; the one-point one is not.
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("noise_seed", [0, 1, 2])
def test_two_point_gradient_is_exact_on_a_quadratic(args_factory, k, noise_seed):
    model = Quadratic()
    cfg = NSOConfig(sigma=1.0, num_perturbations=k, noise_seed=noise_seed)
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=quadratic_examples(), nso_config=cfg)
    one_step_grad(trainer)
    torch.testing.assert_close(model.w.grad, model.exact_grad(), rtol=1e-12, atol=1e-12)


def test_one_point_gradient_is_not_exact_on_a_quadratic(args_factory):
    model = Quadratic()
    cfg = NSOConfig(sigma=1.0, two_point=False)
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=quadratic_examples(), nso_config=cfg)
    one_step_grad(trainer)
    # RWP's gradient is A (W + U) + c: off by A U, of the order of sigma * ||A||.
    assert (model.w.grad - model.exact_grad()).norm() > 0.1 * model.exact_grad().norm()


def test_clean_weight_mixes_in_the_exact_gradient(args_factory):
    model = Quadratic()
    cfg = NSOConfig(sigma=1.0, two_point=False, unperturbed_weight=0.25, noise_seed=5)
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=quadratic_examples(), nso_config=cfg)
    one_step_grad(trainer)
    g_mixed = model.w.grad.clone()
    cfg_pure = NSOConfig(sigma=1.0, two_point=False, noise_seed=5)
    trainer_pure = NSOTrainer(model=model, args=args_factory(), train_dataset=quadratic_examples(), nso_config=cfg_pure)
    one_step_grad(trainer_pure)
    # lam * g(W) + (1 - lam) * g(W + U), with the same U in both runs.
    torch.testing.assert_close(g_mixed, 0.25 * model.exact_grad() + 0.75 * model.w.grad, rtol=1e-12, atol=1e-12)


# 2. sigma = 0 reproduces Trainer: same seed, same data, dropout on.
def _train(trainer_cls, model, args, **kw):
    trainer = trainer_cls(model=model, args=args, train_dataset=lm_examples(), **kw)
    trainer.train()
    return params_of(model), trainer


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("lora", [False, True])
def test_sigma_zero_reproduces_trainer(args_factory, grad_accum, lora):
    def build():
        model = tiny_llama(dropout=0.2)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
        return model

    args = args_factory(gradient_accumulation_steps=grad_accum, max_steps=3)
    ref, _ = _train(Trainer, build(), args)
    got, trainer = _train(NSOTrainer, build(), args, nso_config=NSOConfig(sigma=0.0))
    assert_same_weights(got, ref, exact=grad_accum == 1)  # 1/2 g + 1/2 g = g bit for bit without accumulation
    init = params_of(build())
    assert sum(not torch.equal(init[n], got[n]) for n in init) >= 4  # training did move the weights
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(logged)))


# 3. Pass count, by forward hook.
@pytest.mark.parametrize(
    "cfg, passes",
    [
        (NSOConfig(num_perturbations=1), 2),
        (NSOConfig(num_perturbations=3), 6),
        (NSOConfig(num_perturbations=2, unperturbed_weight=0.5), 5),
        (NSOConfig(num_perturbations=2, two_point=False), 2),
        (NSOConfig(num_perturbations=2, two_point=False, unperturbed_weight=0.1), 3),
    ],
)
def test_pass_count(args_factory, cfg, passes):
    model = tiny_llama()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    trainer = NSOTrainer(model=model, args=args_factory(max_steps=2), train_dataset=lm_examples(), nso_config=cfg)
    trainer.train()
    assert cfg.passes_per_micro_batch == passes
    assert len(calls) == 2 * passes


# 4. Exact restore, fp32 and bf16, also when a pass raises.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise_scale", ["absolute", "relative"])
def test_step_restores_weights_bit_exactly(args_factory, dtype, noise_scale):
    model = tiny_llama(dtype=dtype)
    before = params_of(model)
    seen = []  # a weight as each pass sees it: proof that the passes really were perturbed
    model.register_forward_pre_hook(lambda m, _: seen.append(m.model.layers[0].mlp.up_proj.weight.detach().clone()))
    cfg = NSOConfig(sigma=0.05, num_perturbations=2, unperturbed_weight=0.5, noise_scale=noise_scale)
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=lm_examples(), nso_config=cfg)
    one_step_grad(trainer)
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name
    w = before["model.layers.0.mlp.up_proj.weight"]
    assert len(seen) == 5 and torch.equal(seen[0], w)
    assert all(not torch.equal(s, w) for s in seen[1:])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_weights_restored_when_a_pass_raises(args_factory):
    model = tiny_llama()
    before = params_of(model)
    calls = []

    def fail_on_second_pass(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    model.register_forward_pre_hook(fail_on_second_pass)
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=lm_examples(), nso_config=NSOConfig(sigma=0.5))
    with pytest.raises(RuntimeError, match="boom"):
        one_step_grad(trainer)
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name
    # The trainer is usable again: the next step runs from a clean state.
    one_step_grad(trainer)
    assert trainer.accelerator.sync_gradients


# Non-finite perturbed loss: both policies leave clean, finite weights.
class _BlowsUpWhenPerturbed(torch.nn.Module):
    """Loss finite at W and infinite at W +/- U (mimics a too-large sigma).

    With lam > 0 the passes run clean, +U, -U: every third forward call is the clean one.
    Without a clean pass every call is perturbed.
    """

    def __init__(self, clean_every: int | None = 3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self.clean_every, self.calls = clean_every, 0

    def forward(self, x, labels=None):
        clean = self.clean_every is not None and self.calls % self.clean_every == 0
        self.calls += 1
        loss = (self.w**2).sum() + 0.0 * x.sum()
        return {"loss": loss if clean else loss * float("inf")}


def test_nonfinite_raise_names_step_and_sigma(args_factory):
    model = _BlowsUpWhenPerturbed(clean_every=None)
    trainer = NSOTrainer(
        model=model, args=args_factory(), train_dataset=quadratic_examples(), nso_config=NSOConfig(sigma=0.3)
    )
    with pytest.raises(NonFiniteLossError, match=r"NSO step 0: the loss at W \+ U \(draw 0\) is inf with sigma=0.3"):
        one_step_grad(trainer)
    assert torch.equal(model.w.detach(), torch.ones(4))


def test_nonfinite_skip_drops_the_pass_and_keeps_weights_finite(args_factory):
    model = _BlowsUpWhenPerturbed()
    cfg = NSOConfig(sigma=0.3, unperturbed_weight=0.5, nonfinite_loss="skip")
    trainer = NSOTrainer(model=model, args=args_factory(max_steps=2, learning_rate=0.1), train_dataset=quadratic_examples(), nso_config=cfg)
    trainer.train()
    # Only the clean passes contributed: the weights moved and stayed finite.
    assert torch.isfinite(model.w).all() and (model.w.detach() < 1).all()
    logs = [h for h in trainer.state.log_history if "nso/skipped_passes" in h]
    assert [h["nso/skipped_passes"] for h in logs] == [2, 2]


# 5. peft LoRA: the frozen base stays bit-identical, the adapters move.
def test_lora_trains_adapters_only(args_factory):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    before = params_of(model)
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=lm_examples(), nso_config=NSOConfig(sigma=0.05))
    perturbed = [n for n, _ in trainer._nso_parameters(model)]
    assert perturbed and all("lora_" in n for n in perturbed)
    trainer.train()
    after = params_of(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)


def test_include_exclude_patterns(args_factory):
    model = tiny_llama()
    cfg = NSOConfig(perturb_include=[r"layers\.0\."], perturb_exclude=["norm"])
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=lm_examples(), nso_config=cfg)
    names = [n for n, _ in trainer._nso_parameters(model)]
    assert names and all(n.startswith("model.layers.0.") and "norm" not in n for n in names)
    bad = NSOTrainer(model=model, args=args_factory(), train_dataset=lm_examples(), nso_config=NSOConfig(perturb_include=["nope"]))
    with pytest.raises(ValueError, match="found no parameter to perturb"):
        bad._nso_parameters(model)


# Logging: loss is the mean perturbed loss; clean loss and sharpness when the clean pass runs.
def test_logs_clean_loss_and_sharpness(args_factory):
    model = tiny_llama(dropout=0.0)
    cfg = NSOConfig(sigma=0.05, unperturbed_weight=0.5)
    trainer = NSOTrainer(model=model, args=args_factory(max_steps=2), train_dataset=lm_examples(), nso_config=cfg)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["nso/sharpness"] == pytest.approx(h["loss"] - h["nso/clean_loss"], abs=1e-4)
    no_clean = NSOTrainer(model=tiny_llama(), args=args_factory(max_steps=1), train_dataset=lm_examples())
    no_clean.train()
    assert not any("nso/clean_loss" in h for h in no_clean.state.log_history)


# 9. NSOMixin on a Trainer subclass that overrides compute_loss.
class WeightedLossTrainer(Trainer):
    """A user's Trainer: doubles the loss (so its effect on gradients is visible)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.compute_loss_calls = getattr(self, "compute_loss_calls", 0) + 1
        out = model(**inputs)
        return (2.0 * out["loss"], out) if return_outputs else 2.0 * out["loss"]


class NSOWeightedLossTrainer(NSOMixin, WeightedLossTrainer):
    pass


def test_mixin_with_custom_compute_loss(args_factory):
    model = Quadratic()
    trainer = NSOWeightedLossTrainer(
        model=model, args=args_factory(), train_dataset=quadratic_examples(), nso_config=NSOConfig(sigma=1.0)
    )
    one_step_grad(trainer)
    # The subclass's loss (2x) is what NSO differentiates, once per pass, and the result is exact.
    assert trainer.compute_loss_calls == 2
    torch.testing.assert_close(model.w.grad, 2.0 * model.exact_grad(), rtol=1e-12, atol=1e-12)


def test_default_config_and_type_check(args_factory):
    trainer = NSOTrainer(model=tiny_llama(), args=args_factory(), train_dataset=lm_examples())
    assert trainer.nso_config == NSOConfig()
    with pytest.raises(TypeError, match="nso_config must be an NSOConfig"):
        NSOTrainer(model=tiny_llama(), args=args_factory(), nso_config={"sigma": 0.1})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sigma_zero_reproduces_trainer_under_autocast(args_factory, precision):
    # On CPU this covers the autocast path only: the fp16 GradScaler exists on CUDA alone.
    args = args_factory(max_steps=3, **{precision: True})
    ref, _ = _train(Trainer, tiny_llama(), args)
    got, trainer = _train(NSOTrainer, tiny_llama(), args, nso_config=NSOConfig(sigma=0.0))
    assert trainer.accelerator.mixed_precision == precision
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


# trl's online trainers are refused by their place in the class hierarchy, without importing trl.
def _trainer_class(name: str, module: str, **attrs) -> type:
    return type(name, (Trainer,), {"__module__": module, **attrs})


@pytest.mark.parametrize(
    "parent, refused",
    [
        (_trainer_class("GRPOTrainer", "trl.trainer.grpo_trainer"), True),
        (_trainer_class("XPOTrainer", "trl.experimental.xpo.xpo_trainer"), True),
        # an unknown trl trainer that prepares its own inputs (where trl's online trainers generate)
        (_trainer_class("NewOnlineTrainer", "trl.experimental.new", _prepare_inputs=lambda self, inputs: inputs), True),
        (_trainer_class("SFTTrainer", "trl.trainer.sft_trainer"), False),
        # a user's own Trainer may prepare its inputs: nothing says it is stateful
        (_trainer_class("MyTrainer", "my_project.train", _prepare_inputs=lambda self, inputs: inputs), False),
    ],
)
def test_trainers_with_stateful_input_preparation_are_refused(args_factory, parent, refused):
    cls = type("NSOTrainerOf" + parent.__name__, (NSOMixin, parent), {})
    if refused:
        with pytest.raises(ValueError, match=rf"NSOMixin cannot wrap {parent.__name__}: its input preparation is stateful"):
            cls(model=tiny_llama(), args=args_factory())
    else:
        assert cls(model=tiny_llama(), args=args_factory()).nso_config == NSOConfig()
