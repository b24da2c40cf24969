"""The pure pieces: seeds, parameter selection, noise, exact restore, pass plan, gradient scaling."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from nso_hf import NSOConfig
from nso_hf.noise import Perturbation, clean_parameter_name, draw_seed, row_rms, select_parameters
from nso_hf.passes import pass_plan, scale_gradient


def test_draw_seed_is_a_pure_function_of_its_fields():
    fields = (0, 5, 1, 0, 0, 3)
    # The same in a fresh interpreter: a resumed run (a new process) must redraw the same noise, which
    # Python's salted hash() would not give.
    code = f"from nso_hf.noise import draw_seed; print(draw_seed(*{fields}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "random"})
    assert int(done.stdout) == draw_seed(*fields)
    variants = {draw_seed(*fields[:i], fields[i] + 1, *fields[i + 1 :]) for i in range(len(fields))}
    assert len(variants) == len(fields) and draw_seed(*fields) not in variants
    assert 0 <= draw_seed(*fields) < 2**63


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("module.model.layers.0.weight", "model.layers.0.weight"),
        ("_orig_mod.module.lm_head.weight", "lm_head.weight"),
        ("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.weight", "model.layers.0.mlp.weight"),
        ("model.norm.weight", "model.norm.weight"),
    ],
)
def test_wrapper_prefixes_are_stripped(raw, clean):
    assert clean_parameter_name(raw) == clean


def test_select_skips_frozen_and_tied_and_filters():
    lin = nn.Linear(3, 3)
    model = nn.ModuleDict({"a": lin, "b": nn.Linear(3, 3), "norm": nn.LayerNorm(3)})
    model["b"].weight.requires_grad_(False)
    named = list(model.named_parameters()) + [("tied.weight", lin.weight)]
    assert [n for n, _ in select_parameters(named)] == ["a.weight", "a.bias", "b.bias", "norm.weight", "norm.bias"]
    assert [n for n, _ in select_parameters(named, exclude=["bias", "norm"])] == ["a.weight"]
    assert [n for n, _ in select_parameters(named, include=["^b"])] == ["b.bias"]
    with pytest.raises(ValueError, match="bad regular expression"):
        select_parameters(named, include=["("])


def test_row_rms():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(row_rms(w), torch.tensor([[math.sqrt(12.5)], [0.0]]))
    torch.testing.assert_close(row_rms(torch.tensor([1.0, -1.0])), torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_plus_and_minus_noise_then_exact_restore(dtype):
    params = [torch.randn(64, 32).to(dtype), torch.randn(32).to(dtype)]
    before = [p.clone() for p in params]
    pert = Perturbation(params, sigma=0.1, relative=False)
    pert.apply(+1, [11, 12])
    plus = [(p.double() - b.double()) for p, b in zip(params, before)]
    pert.apply(-1, [11, 12])
    minus = [(p.double() - b.double()) for p, b in zip(params, before)]
    pert.restore()
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # bit for bit, in every dtype
    for u, v in zip(plus, minus):
        # -U is the same draw negated (up to the rounding of W +/- U into the dtype).
        tol = {torch.float64: 1e-7, torch.float32: 1e-6}.get(dtype, 2e-2)
        torch.testing.assert_close(u, -v, rtol=0, atol=tol)
        assert 0.07 < u.std().item() < 0.13


def test_noise_depends_on_seed_only():
    a, b = torch.zeros(1000), torch.zeros(1000)
    Perturbation([a], 1.0, False).apply(1, [7])
    Perturbation([b], 1.0, False).apply(1, [7])
    assert torch.equal(a, b)
    Perturbation([b], 1.0, False).apply(1, [8])
    assert not torch.equal(a, b)


def test_relative_noise_follows_row_magnitude_and_spares_zero_rows():
    w = torch.zeros(3, 4000)
    w[0], w[1] = 1.0, 10.0  # row 2 stays zero, like a LoRA B at initialisation
    original = w.clone()
    Perturbation([w], sigma=0.1, relative=True).apply(1, [0])
    u = w - original
    assert u[0].std().item() == pytest.approx(0.1, rel=0.05)
    assert u[1].std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(u[2], torch.zeros(4000))


@pytest.mark.parametrize("k, two_point, lam", [(1, True, 0.0), (3, True, 0.2), (2, False, 0.0), (4, False, 0.5)])
def test_pass_plan_weights(k, two_point, lam):
    cfg = NSOConfig(num_perturbations=k, two_point=two_point, unperturbed_weight=lam)
    plan = pass_plan(cfg)
    n_perturbed = (2 if two_point else 1) * k
    assert len(plan) == cfg.passes_per_micro_batch == n_perturbed + (lam > 0)
    assert math.isclose(sum(p.weight for p in plan), 1.0)
    assert [p.clean for p in plan] == [True] * (lam > 0) + [False] * n_perturbed
    if lam > 0:
        assert plan[0].weight == lam
    perturbed = [p for p in plan if not p.clean]
    assert sorted({p.draw for p in perturbed}) == list(range(k))
    assert all(p.sign == 1 for p in perturbed[:: 2 if two_point else 1])


def test_scale_gradient_keeps_value_and_scales_gradient():
    x = torch.tensor(3.0, requires_grad=True)
    y = scale_gradient(x**2, 0.25)
    assert y.item() == 9.0
    y.backward()
    assert x.grad.item() == 0.25 * 6.0


def test_restore_is_a_no_op_at_w_and_complete_after_a_cut_short_apply():
    w = torch.randn(8, 4)
    before = w.clone()
    pert = Perturbation([w], sigma=0.5, relative=False)
    pert.apply(1, [3])
    pert.restore()
    assert pert.at_origin and torch.equal(w, before)
    w.add_(1.0)  # e.g. an optimizer update written after the restore
    pert.restore()  # must not copy the old W over it
    assert torch.equal(w, before + 1.0)

    v = torch.randn(4, 4)
    saved = v.clone()
    pert = Perturbation([v, torch.zeros(3)], sigma=0.5, relative=False)
    with pytest.raises((TypeError, RuntimeError)):
        pert.apply(1, [5, object()])  # the second seed is no int: the draw stops after the first tensor moved
    assert not pert.at_origin and not torch.equal(v, saved)
    pert.restore()
    assert torch.equal(v, saved)


def test_move_to_sets_w_plus_combination_of_directions_and_restores_exactly():
    w1, w2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    before = [w1.clone(), w2.clone()]
    d1 = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    d2 = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    pert = Perturbation([w1, w2], sigma=0.0, relative=False)
    pert.move_to([0.5, -2.0], [d1, d2])
    assert not pert.at_origin
    for w, b, a, c in zip((w1, w2), before, d1, d2):
        torch.testing.assert_close(w, b + 0.5 * a - 2.0 * c, rtol=0, atol=1e-15)
    pert.move_to([-0.5], [d1])  # from W, not from the point held: no drift
    for w, b, a in zip((w1, w2), before, d1):
        torch.testing.assert_close(w, b - 0.5 * a, rtol=0, atol=1e-15)
    pert.restore()
    assert pert.at_origin and all(torch.equal(w, b) for w, b in zip((w1, w2), before))


def test_move_to_rounds_once_into_bf16():
    w = torch.randn(64, 8).to(torch.bfloat16)
    saved = w.clone()
    d1, d2 = torch.randn(64, 8), torch.randn(64, 8)
    pert = Perturbation([w], sigma=0.0, relative=False)
    pert.move_to([1e-2, 3e-3], [[d1], [d2]])
    # The sum formed in float32 and rounded once, not after each direction.
    assert torch.equal(w, (saved.float() + 1e-2 * d1 + 3e-3 * d2).to(torch.bfloat16))
    pert.restore()
    assert torch.equal(w, saved)


def test_move_to_rejects_mismatched_directions():
    pert = Perturbation([torch.zeros(3), torch.zeros(2)], sigma=0.0, relative=False)
    with pytest.raises(ValueError, match=r"move_to: 1 coefficients for 2 directions"):
        pert.move_to([1.0], [[torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(2)]])
    with pytest.raises(ValueError, match=r"move_to: a direction has 1 tensors for 2 parameters"):
        pert.move_to([1.0], [[torch.ones(3)]])
    assert pert.at_origin


def test_apply_with_sigma_override_equals_a_perturbation_created_with_it():
    a, b = torch.randn(100), torch.zeros(100)
    b.copy_(a)
    Perturbation([a], sigma=0.3, relative=False).apply(1, [4])
    pert = Perturbation([b], sigma=0.0, relative=False)
    pert.apply(1, [4], sigma=0.3)
    assert torch.equal(a, b)
    before = b.clone()
    pert.apply(-1, [4], sigma=0.3)  # the reflection of the point held
    assert torch.equal(b, 2 * pert.backup[0] - before)
    pert.apply(1, [4], sigma=0.6)  # another sigma: a new draw, not a reflection
    torch.testing.assert_close(b - pert.backup[0], 2 * (before - pert.backup[0]), rtol=1e-5, atol=1e-6)
