"""SAM, ASAM, Flat-LoRA and merged-space NSO in the same step: known answers, Trainer equivalence, bad input."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Trainer

from nso_hf import NSOConfig, NSOTrainer
from nso_hf.config import METHODS
from nso_hf.engines import check_engine
from nso_hf.merged import lora_targets, merged_row_rms
from nso_hf.noise import draw_seed
from nso_hf.ramp import noise_ramp_factor
from nso_hf.sam import sam_perturbation

from conftest import Quadratic, assert_same_weights, first_batch, lm_examples, params_of, tiny_llama

LORA_METHODS = ("flat_lora", "nso_merged")


def lora_llama(dtype: torch.dtype = torch.float32, dropout: float = 0.1) -> nn.Module:
    # B starts random (not zero), so s B A is not zero and the merged rows differ from W0's.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.1)
    return get_peft_model(tiny_llama(dropout=dropout, dtype=dtype), config)


# 1. The ascent offset, by hand.
def test_sam_perturbation_by_hand():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    e = sam_perturbation(grads, rho=0.5)
    # ||g|| = sqrt(9 + 16) = 5: e = 0.5 * g / 5.
    torch.testing.assert_close(e[0], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([[0.4]]))


def test_asam_perturbation_by_hand():
    grads = [torch.tensor([3.0, 1.0]), torch.tensor([2.0])]
    weights = [torch.tensor([1.0, -2.0]), torch.tensor([-1.0])]
    e = sam_perturbation(grads, rho=2.0, weights=weights)
    # |w| g = [3, 2], [2]: norm sqrt(17); w^2 g = [3, 4], [2]: e = 2 * w^2 g / sqrt(17).
    r = 2.0 / math.sqrt(17.0)
    torch.testing.assert_close(e[0], torch.tensor([3.0 * r, 4.0 * r]))
    torch.testing.assert_close(e[1], torch.tensor([2.0 * r]))


def test_sam_perturbation_is_none_without_a_direction():
    assert sam_perturbation([torch.zeros(3), torch.zeros(2, 2)], rho=0.05) is None
    assert sam_perturbation([torch.tensor([1.0, float("nan")])], rho=0.05) is None
    assert sam_perturbation([], rho=0.05) is None
    # ASAM: a gradient only where the weight is 0 has no |w|-weighted direction either.
    assert sam_perturbation([torch.tensor([1.0, 0.0])], rho=0.05, weights=[torch.tensor([0.0, 3.0])]) is None


# 2. A quadratic whose gradient differs per micro-batch: with gradient accumulation 2, .grad must be
# exactly the mean of g_i(W + e_i), e_i from micro-batch i's own gradient. An ascent gradient leaking
# into .grad would add g_i(W), which rho = 0 cannot reveal.
class BatchQuadratic(Quadratic):
    """loss(w; x) = 1/2 w^T A w + (c + mean(x))^T w: gradient A w + c + mean(x)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        return {"loss": 0.5 * self.w @ self.A @ self.w + (self.c + x.mean(0)) @ self.w}

    def grad_at(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (self.A @ w + self.c + x.mean(0)).detach()


def batch_quadratic_examples(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(6, generator=g, dtype=torch.float64)} for _ in range(n)]


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_accumulated_gradient_is_the_mean_of_ascended_gradients(args_factory, method):
    model = BatchQuadratic()
    rho = 0.3
    trainer = NSOTrainer(
        model=model, args=args_factory(gradient_accumulation_steps=2, per_device_train_batch_size=2),
        train_dataset=batch_quadratic_examples(), nso_config=NSOConfig(method=method, rho=rho),
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad()
    batches = iter(trainer.get_train_dataloader())
    w = model.w.detach().clone()
    expected = torch.zeros_like(w)
    for _ in range(2):
        batch = next(batches)
        trainer.training_step(model, batch)
        g = model.grad_at(w, batch["x"])
        if method == "sam":
            e = rho * g / g.norm()  # e_i = rho g_i / ||g_i||
        else:
            e = rho * w * w * g / (w.abs() * g).norm()  # e_i = rho w^2 g_i / || |w| g_i ||
        expected += 0.5 * model.grad_at(w + e, batch["x"])  # Trainer divides each micro-batch by 2
    torch.testing.assert_close(model.w.grad, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.w.detach(), w)  # restored by copy
    # The leak this catches: adding g_i(W) would move .grad by about ||g||.
    assert (expected - model.grad_at(w, batch["x"])).norm() > 1e-3


# 3. rho = 0 and sigma = 0 reproduce Trainer for every method, dropout on.
def _train(trainer_cls, model, args, **kw):
    trainer = trainer_cls(model=model, args=args, train_dataset=lm_examples(), **kw)
    trainer.train()
    return params_of(model), trainer


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_zero_strength_reproduces_trainer(args_factory, method, grad_accum):
    build = lora_llama if method in LORA_METHODS or method == "asam" else tiny_llama
    args = args_factory(gradient_accumulation_steps=grad_accum, max_steps=3)
    ref, _ = _train(Trainer, build(), args)
    got, trainer = _train(NSOTrainer, build(), args, nso_config=NSOConfig(method=method, sigma=0.0, rho=0.0))
    assert_same_weights(got, ref, exact=grad_accum == 1)
    init = params_of(build())
    assert sum(not torch.equal(init[n], got[n]) for n in init) >= 4  # training did move the weights
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(math.isfinite(v) for v in logged)


# 4. Passes per micro-batch, counted by forward hook.
@pytest.mark.parametrize(
    "method, passes", [("none", 1), ("nso", 2), ("rwp", 1), ("sam", 2), ("asam", 2), ("flat_lora", 1), ("nso_merged", 2)]
)
def test_pass_count_per_method(args_factory, method, passes):
    model = lora_llama()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    cfg = NSOConfig(method=method, sigma=0.05)
    trainer = NSOTrainer(model=model, args=args_factory(max_steps=2), train_dataset=lm_examples(), nso_config=cfg)
    trainer.train()
    assert cfg.passes_per_micro_batch == passes
    assert len(calls) == 2 * passes


# 5. SAM moves the weights to W + e for its second pass, and only the selected ones.
def test_sam_second_pass_sees_w_plus_e(args_factory):
    model = tiny_llama(dropout=0.0)
    seen = []
    model.register_forward_pre_hook(lambda m, _: seen.append(m.model.layers[0].mlp.up_proj.weight.detach().clone()))
    before = params_of(model)
    rho = 0.1
    cfg = NSOConfig(method="sam", rho=rho)
    trainer = NSOTrainer(model=model, args=args_factory(), train_dataset=lm_examples(), nso_config=cfg)
    trainer.current_gradient_accumulation_steps = 1
    batch = first_batch(trainer)
    # The gradient at W by hand, on a copy.
    ref = tiny_llama(dropout=0.0)
    loss = ref(**batch).loss
    grads = torch.autograd.grad(loss, [p for p in ref.parameters()])
    norm = torch.stack([g.norm() for g in grads]).norm()
    g_up = dict(zip([n for n, _ in ref.named_parameters()], grads))["model.layers.0.mlp.up_proj.weight"]
    model.zero_grad()
    trainer.training_step(model, batch)
    w = before["model.layers.0.mlp.up_proj.weight"]
    assert len(seen) == 2 and torch.equal(seen[0], w)
    torch.testing.assert_close(seen[1] - w, rho * g_up / norm, rtol=1e-4, atol=1e-7)
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name


# 6. Merged-space noise, by hand: the pass sees W0 + U with U = sigma * rowRMS(W0 + s B A) * z.
@pytest.mark.parametrize("method", LORA_METHODS)
def test_merged_noise_equals_merged_weight_noise_by_hand(args_factory, method):
    model = lora_llama(dropout=0.0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    merged = w0 + (8 / 4) * b @ a  # s = alpha / r
    seen = []
    layer.register_forward_pre_hook(lambda m, _: seen.append(m.base_layer.weight.detach().clone()))
    sigma = 0.1
    trainer = NSOTrainer(
        model=model, args=args_factory(), train_dataset=lm_examples(), nso_config=NSOConfig(method=method, sigma=sigma)
    )
    names = [n for n, _ in trainer._nso_parameters(model)]
    assert len(names) == 4 and all(n.endswith("base_layer.weight") for n in names)
    index = names.index("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, first_batch(trainer))
    # The seed of this tensor's draw: (seed, step 0, micro-step 0, rank 0, draw 0, tensor index).
    z = torch.empty_like(w0).normal_(0.0, 1.0, generator=torch.Generator().manual_seed(draw_seed(123, 0, 0, 0, 0, index)))
    row_rms = merged.pow(2).mean(dim=1, keepdim=True).sqrt()
    u = sigma * row_rms * z
    torch.testing.assert_close(seen[0] - w0, u, rtol=1e-5, atol=1e-7)
    if method == "nso_merged":
        torch.testing.assert_close(seen[1] - w0, -u, rtol=1e-5, atol=1e-7)
    assert torch.equal(layer.base_layer.weight.detach(), w0)
    torch.testing.assert_close(merged_row_rms(layer), row_rms)


@pytest.mark.parametrize("method", LORA_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_base_weights_bit_identical_after_training(args_factory, method, dtype, lr):
    model = lora_llama(dtype=dtype)
    before = params_of(model)
    cfg = NSOConfig(method=method, sigma=0.2)
    trainer = NSOTrainer(model=model, args=args_factory(max_steps=3, learning_rate=lr), train_dataset=lm_examples(), nso_config=cfg)
    trainer.train()
    after = params_of(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("base_layer" in n for n in frozen)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    adapters = [n for n in before if "lora_" in n]
    assert all(torch.equal(before[n], after[n]) == (lr == 0.0) for n in adapters)
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h]


# 7. Bad input.
@pytest.mark.parametrize("method", LORA_METHODS)
def test_merged_method_without_lora_layers_raises(args_factory, method):
    with pytest.raises(ValueError, match=rf"method='{method}' perturbs the merged weight W0 \+ s BA of LoRA layers, but found none"):
        NSOTrainer(model=tiny_llama(), args=args_factory(), train_dataset=lm_examples(), nso_config=NSOConfig(method=method))


def test_merged_method_rejects_merged_and_dora_layers():
    model = lora_llama()
    model.merge_adapter()
    with pytest.raises(ValueError, match="has its adapters merged into the base weight"):
        lora_targets(model)
    dora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="does not support DoRA"):
        lora_targets(dora, method="nso_merged")


class ZeroGradient(nn.Module):
    """A loss that does not depend on the weights: its gradient is exactly zero."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x, labels=None):
        return {"loss": (self.w * 0.0).sum() + 1.0 + 0.0 * x.sum()}


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_zero_gradient_skips_the_ascent_and_warns_once(args_factory, method, caplog):
    model = ZeroGradient()
    trainer = NSOTrainer(
        model=model, args=args_factory(max_steps=3), train_dataset=[{"x": torch.zeros(1)}] * 16,
        nso_config=NSOConfig(method=method, rho=0.5),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="nso_hf.trainer"):
        trainer.train()
    warnings = [r for r in caplog.records if "no ascent direction" in r.getMessage()]
    assert len(warnings) == 1 and method.upper() in warnings[0].getMessage()
    assert torch.equal(model.w.detach(), torch.ones(3))  # no NaN: W + 0 is W


def test_noise_ramp_factor():
    assert noise_ramp_factor(0, 10, "cosine") == 0.0
    assert noise_ramp_factor(5, 10, "cosine") == pytest.approx(0.5)
    assert noise_ramp_factor(10, 10, "cosine") == pytest.approx(1.0)
    assert noise_ramp_factor(20, 10, "cosine") == pytest.approx(1.0)
    assert noise_ramp_factor(3, 10, "none") == 1.0
    with pytest.raises(ValueError, match="NSOConfig.noise_ramp must be 'none' or 'cosine', got 'linear'"):
        noise_ramp_factor(3, 10, "linear")


def test_cosine_ramp_starts_without_noise(args_factory):
    # At step 0 the cosine ramp gives sigma_t = 0: a one-step run equals Trainer bit for bit.
    args = args_factory(max_steps=1)
    ref, _ = _train(Trainer, lora_llama(), args)
    got, _ = _train(NSOTrainer, lora_llama(), args, nso_config=NSOConfig(method="flat_lora", sigma=0.5, noise_ramp="cosine"))
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    moved, _ = _train(NSOTrainer, lora_llama(), args, nso_config=NSOConfig(method="flat_lora", sigma=0.5))
    assert any(not torch.equal(ref[n], moved[n]) for n in ref)


def _fake_trainer(engine: str, deepspeed_config: dict | None = None):
    """Just enough of a built Trainer for `engine_name` to say `engine`."""
    stage = int(engine[-1]) if engine.startswith("DeepSpeed") else 0
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=deepspeed_config or {})
    accelerator = SimpleNamespace(is_fsdp2=engine == "FSDP2", state=SimpleNamespace(deepspeed_plugin=plugin))
    return SimpleNamespace(
        is_deepspeed_enabled=engine.startswith("DeepSpeed"), is_fsdp_enabled=engine.startswith("FSDP"),
        accelerator=accelerator, args=SimpleNamespace(fp16=False),
    )  # fmt: skip


@pytest.mark.parametrize("engine", ["FSDP1", "FSDP2", "DeepSpeed ZeRO-3", "DeepSpeed ZeRO-2"])
@pytest.mark.parametrize("method", ["sam", "asam", "flat_lora", "nso_merged"])
def test_engines_refuse_the_methods_they_cannot_run(engine, method):
    cfg = NSOConfig(method=method)
    if engine == "DeepSpeed ZeRO-2":
        check_engine(_fake_trainer(engine), cfg)  # whole parameters: every method runs (tests/test_engines.py)
        return
    if method in ("sam", "asam"):
        match = (
            rf"method='{method}' is not supported under {engine}: its ascent gradient is taken with "
            rf"torch.autograd.grad on the parameters, but {engine} shards them.* Use DDP or DeepSpeed ZeRO-2"
        )
    else:
        match = rf"method='{method}' writes noise into the frozen base weights of the LoRA layers .* which {engine} shards"
    with pytest.raises(ValueError, match=match):
        check_engine(_fake_trainer(engine), cfg)
    check_engine(_fake_trainer("DDP/single"), cfg)  # accepted there


@pytest.mark.parametrize(
    "ds, name", [({"torch_autocast": {"enabled": True}}, "torch_autocast"), ({"fp16": {"auto_cast": True}}, "fp16.auto_cast")]
)
def test_sam_under_deepspeed_refuses_casts_of_the_engine_forward(ds, name):
    # SAM's ascent pass runs the wrapped module, not the engine, so a cast the engine's forward adds would
    # be missing from that pass alone.
    for method in ("sam", "asam"):
        with pytest.raises(ValueError, match=rf"under DeepSpeed ZeRO-2 cannot use DeepSpeed's {name}: .* Turn {name} off"):
            check_engine(_fake_trainer("DeepSpeed ZeRO-2", ds), NSOConfig(method=method))
    check_engine(_fake_trainer("DeepSpeed ZeRO-2", ds), NSOConfig(method="nso"))  # the other methods run the engine


# 8. Mixed precision.
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_zero_strength_reproduces_trainer_under_autocast(args_factory, method, precision):
    # On CPU this covers the autocast path; the fp16 GradScaler arithmetic is checked below.
    build = lora_llama if method in LORA_METHODS else tiny_llama
    args = args_factory(max_steps=2, **{precision: True})
    ref, _ = _train(Trainer, build(), args)
    got, trainer = _train(NSOTrainer, build(), args, nso_config=NSOConfig(method=method, sigma=0.0, rho=0.0))
    assert trainer.accelerator.mixed_precision == precision
    assert all(torch.equal(ref[n], got[n]) for n in ref)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_restores_bf16_weights_bit_exactly(args_factory, method):
    model = lora_llama(dtype=torch.bfloat16) if method in LORA_METHODS else tiny_llama(dtype=torch.bfloat16)
    before = params_of(model)
    trainer = NSOTrainer(
        model=model, args=args_factory(), train_dataset=lm_examples(), nso_config=NSOConfig(method=method, sigma=0.1, rho=0.1)
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, first_batch(trainer))
    assert all(torch.equal(v, before[n]) for n, v in params_of(model).items())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_grad_scaler_scales_only_the_accumulated_gradient(args_factory, method):
    # fp16's GradScaler (here its CPU form): Trainer's backward of the pass at W + e is scaled by S and
    # unscaled once by the optimizer; the ascent gradient is taken from S * loss and divided by S, so
    # .grad holds exactly S * g(W + e), e from the unscaled gradient.
    model = BatchQuadratic()
    rho, scale = 0.3, 1024.0
    trainer = NSOTrainer(
        model=model, args=args_factory(per_device_train_batch_size=2), train_dataset=batch_quadratic_examples(),
        nso_config=NSOConfig(method=method, rho=rho),
    )  # fmt: skip
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    trainer.current_gradient_accumulation_steps = 1
    batch = first_batch(trainer)
    w = model.w.detach().clone()
    model.zero_grad()
    trainer.training_step(model, batch)
    g = model.grad_at(w, batch["x"])
    e = rho * g / g.norm() if method == "sam" else rho * w * w * g / (w.abs() * g).norm()
    torch.testing.assert_close(model.w.grad, scale * model.grad_at(w + e, batch["x"]), rtol=1e-12, atol=1e-9)
