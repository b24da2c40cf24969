"""What LLM users switch on beside the engines: gradient checkpointing and torch.compile.

Each with sigma = 0 equal to Trainer and sigma > 0 restored exactly. Gradient checkpointing
recomputes each block's forward during backward: it must see the same perturbed weights (the pass's
backward runs before the next pass moves them) and the same dropout masks (checkpoint replays the
RNG) as its pass; so the NSO gradient with checkpointing equals the one without.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from nso_hf import NSOConfig, NSOTrainer

from conftest import first_batch, lm_examples, params_of, tiny_llama


def _trained(cls, args, **kw) -> dict[str, torch.Tensor]:
    model = tiny_llama(dropout=0.2)
    cls(model=model, args=args, train_dataset=lm_examples(), **kw).train()
    return params_of(model)


def _nso_gradient(args, cfg: NSOConfig) -> tuple[dict[str, torch.Tensor], bool]:
    """One NSO training_step's accumulated gradient, and whether the weights came back bit for bit."""
    model = tiny_llama(dropout=0.2)
    before = params_of(model)
    trainer = NSOTrainer(model=model, args=args, train_dataset=lm_examples(), nso_config=cfg)
    trainer.current_gradient_accumulation_steps = 1
    if args.gradient_checkpointing:  # what Trainer.train() does before the first step
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    model.train()
    torch.manual_seed(0)
    trainer.training_step(model, first_batch(trainer))
    restored = all(torch.equal(p, before[n]) for n, p in params_of(model).items())
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, restored


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(args_factory, use_reentrant, one_thread):
    ckpt = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    args = args_factory(max_steps=3, **ckpt)
    ref = _trained(Trainer, args)
    got = _trained(NSOTrainer, args, nso_config=NSOConfig(sigma=0.0))
    for name in ref:
        assert torch.equal(ref[name], got[name]), name

    cfg = NSOConfig(sigma=0.1, num_perturbations=2)
    with_ckpt, restored = _nso_gradient(args_factory(**ckpt), cfg)
    without, _ = _nso_gradient(args_factory(), cfg)
    assert restored
    for name in without:
        torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().max() > 0 for g in with_ckpt.values())


# aot_eager traces and differentiates the graph as inductor does, without generating C++ (which takes
# most of a minute per model on 2 cores); the inductor run is in `make test-slow`.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile(args_factory, one_thread, backend):
    compiled = dict(torch_compile=True, torch_compile_backend=backend)
    args = args_factory(max_steps=2, **compiled)
    ref = _trained(Trainer, args)
    got = _trained(NSOTrainer, args, nso_config=NSOConfig(sigma=0.0))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    # sigma > 0 at learning rate 0: the compiled graph reads the perturbed weights (the logged gap
    # between the perturbed and the clean loss is not 0), and W is exactly as it was afterwards.
    model = tiny_llama(dropout=0.2)
    before = params_of(model)
    trainer = NSOTrainer(
        model=model,
        args=args_factory(max_steps=2, learning_rate=0.0, **compiled),
        train_dataset=lm_examples(),
        nso_config=NSOConfig(sigma=0.1, unperturbed_weight=0.5),
    )
    trainer.train()
    sharpness = [h["nso/sharpness"] for h in trainer.state.log_history if "nso/sharpness" in h]
    assert len(sharpness) == 2 and all(s != 0.0 for s in sharpness), sharpness
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name
