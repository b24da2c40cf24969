"""Flatness estimators against exact answers: a dense Hessian, a quadratic, and model state checks.

Tolerances of the finite-difference product (the default for float32 weights): a relative error of at
most 1e-3 per product against the dense Hessian (its step, sqrt(machine epsilon) * ||W|| / ||v||,
leaves about 1e-4 on these models), and exact to rounding on a quadratic (no third derivative).
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from nso_hf.flatness import (
    FiniteDifferenceHessian,
    HessianOperator,
    Measurement,
    ReportSettings,
    finite_difference_step,
    flatness_report,
    hessian_operator,
    hessian_trace,
    loss_curve,
    noise_stability,
    pac_bayes_curvature,
    select_measured_parameters,
    snapshot_parameters,
    top_eigenvalue,
)
from nso_hf.flatness.mode import measurement_mode

from conftest import Quadratic, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def dense_hessian(model: nn.Module, batches, loss_fn) -> torch.Tensor:
    """The exact Hessian of the mean batch loss over all of `model`'s parameters, in float64."""
    double_model = copy.deepcopy(model).double()
    names = [n for n, _ in double_model.named_parameters()]
    shapes = [p.shape for _, p in double_model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in double_model.parameters()])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = w[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        call = lambda m, b: loss_fn(lambda x: functional_call(m, params, (x,)), (b[0].double(), b[1]))  # noqa: E731
        return sum(call(double_model, b) for b in batches) / len(batches)

    return torch.autograd.functional.hessian(loss_of, flat)


@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP trained near a minimum of cross-entropy (67 parameters), its batches, exact H."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2, foreach=False)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
    for p in mlp.parameters():
        p.grad = None
    batches = [(x, y)]
    hessian = dense_hessian(mlp, batches, cross_entropy_loss)
    return mlp, batches, hessian


@pytest.fixture
def quadratic():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(7, 7, dtype=torch.float64, generator=gen)
    a = m @ m.T / 7 + torch.diag(torch.arange(1.0, 8.0, dtype=torch.float64))  # SPD, distinct eigenvalues
    model = Quadratic(a=a, sizes=(3, 4), linear=False, seed=2)  # loss 1/2 w^T A w + b^T w, b from the batch
    batches = [{"b": torch.randn(7, dtype=torch.float64)} for _ in range(2)]
    return model, batches, a


def test_hessian_vector_product_matches_dense(trained_mlp):
    mlp, batches, hessian = trained_mlp
    params = list(mlp.parameters())
    v = [torch.randn_like(p) for p in params]
    x, y = batches[0]
    split = [(x[:20], y[:20]), (x[20:], y[20:])]
    with measurement_mode(mlp, params):
        reused = HessianOperator(mlp, params, batches, cross_entropy_loss).matvec(v)
        # Two unequal halves weigh 1/2 each: H of their mean, not of the 64-row batch.
        fresh = HessianOperator(mlp, params, split, cross_entropy_loss, reuse_graph=False).matvec(v)
    flat_v = torch.cat([t.reshape(-1) for t in v]).double()
    flat = lambda vectors: torch.cat([h.reshape(-1) for h in vectors]).double()  # noqa: E731
    torch.testing.assert_close(flat(reused), hessian @ flat_v, rtol=1e-4, atol=1e-5)
    halves = sum(dense_hessian(mlp, [b], cross_entropy_loss) for b in split) / 2
    torch.testing.assert_close(flat(fresh), halves @ flat_v, rtol=1e-4, atol=1e-5)


def flat(vectors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in vectors]).double()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_finite_difference_product_matches_dense(trained_mlp, kind):
    mlp, batches, hessian = trained_mlp
    with Measurement(mlp, batches, loss_fn=cross_entropy_loss) as m:
        op = hessian_operator(m, "auto")
        assert isinstance(op, FiniteDifferenceHessian)  # float32 weights: finite differences
        gens: dict = {}
        for _ in range(4):
            v = m.random_vector(gens, 0, kind, torch.float32)
            assert relative_error(flat(op.matvec(v)), hessian @ flat(v)) <= 1e-3
        assert op.num_products == 4


def test_cube_root_step_is_too_coarse_near_a_minimum(trained_mlp):
    """Why the step is sqrt(u), not the central difference's textbook u^(1/3): near a minimum the
    truncation error dominates, and at u^(1/3) the product misses the 1e-3 the default meets."""
    mlp, batches, hessian = trained_mlp
    cube_root = torch.finfo(torch.float32).eps ** (1 / 3)
    with Measurement(mlp, batches, loss_fn=cross_entropy_loss) as m:
        gens: dict = {}
        v = m.random_vector(gens, 0, "rademacher", torch.float32)
        default = relative_error(flat(FiniteDifferenceHessian(m).matvec(v)), hessian @ flat(v))
        coarse = relative_error(flat(FiniteDifferenceHessian(m, cube_root).matvec(v)), hessian @ flat(v))
    assert default <= 1e-3 < coarse


def test_finite_difference_product_is_exact_on_quadratic(quadratic):
    model, batches, a = quadratic  # float64; L is quadratic: the central difference has no truncation error
    with Measurement(model, batches) as m:
        op = FiniteDifferenceHessian(m)
        v = [torch.randn_like(p) for p in m.params]
        torch.testing.assert_close(flat(op.matvec(v)), a @ flat(v), rtol=1e-7, atol=1e-9)
        # Far larger steps are exact too: only rounding is left.
        big = FiniteDifferenceHessian(m, relative_step=0.1)
        torch.testing.assert_close(flat(big.matvec(v)), a @ flat(v), rtol=1e-10, atol=1e-10)


def test_finite_difference_step_rule():
    u = torch.finfo(torch.float32).eps
    assert finite_difference_step(4.0, 2.0, torch.float32) == pytest.approx(u**0.5 * 4.0 / 2.0)
    assert finite_difference_step(0.25, 2.0, torch.float32) == pytest.approx(u**0.5 / 2.0)  # ||W|| < 1 counts as 1
    assert finite_difference_step(4.0, 2.0, torch.float64, relative_step=1e-3) == pytest.approx(2e-3)
    assert finite_difference_step(4.0, 0.0, torch.float32) == 0.0
    with pytest.raises(ValueError, match=r"relative_step must be > 0"):
        finite_difference_step(1.0, 1.0, torch.float32, relative_step=0.0)


def test_finite_difference_matches_exact_on_llama_under_sdpa():
    """A tiny Llama on SDPA (no double backward): finite differences in float32 vs the exact product in float64."""
    from conftest import lm_examples, tiny_llama

    model = tiny_llama(seed=0, dropout=0.0)
    batches = [{k: torch.stack([e[k] for e in lm_examples(4)]) for k in ("input_ids", "labels")}]
    reference = copy.deepcopy(model).double()
    model.set_attn_implementation("sdpa")
    kernels = []

    def loss_fn(m, b):
        kernels.append(m.config._attn_implementation)
        return m(**b).loss

    with Measurement(model, batches, loss_fn=loss_fn) as m:
        gens: dict = {}
        vectors = [m.random_vector(gens, 0, "rademacher", torch.float32) for _ in range(2)]
        approx = [flat(hessian_operator(m).matvec(v)) for v in vectors]
    assert set(kernels) == {"sdpa"}  # the model's own kernel: no switch to eager
    with Measurement(reference, batches) as m:
        op = hessian_operator(m, "exact")
        for v, a in zip(vectors, approx):
            assert relative_error(a, flat(op.matvec([t.double() for t in v]))) <= 1e-3


@pytest.mark.parametrize("hvp", ["finite_difference", "exact"])
def test_trace_within_three_stderr_of_exact(trained_mlp, hvp):
    mlp, batches, hessian = trained_mlp
    est = hessian_trace(mlp, batches, num_probes=100, loss_fn=cross_entropy_loss, hvp=hvp)
    exact = hessian.trace().item()
    assert est.num_probes == 100 and est.num_parameters == 67
    assert est.stderr > 0
    assert abs(est.value - exact) <= 3 * est.stderr, (est.value, est.stderr, exact)


def test_trace_tolerance_stops_early(trained_mlp):
    mlp, batches, _ = trained_mlp
    est = hessian_trace(mlp, batches, num_probes=500, tolerance=0.2, min_probes=5, loss_fn=cross_entropy_loss)
    assert est.converged is True
    assert 5 <= est.num_probes < 500
    assert est.stderr <= 0.2 * abs(est.value)


@pytest.mark.parametrize("hvp", ["finite_difference", "exact"])
@pytest.mark.parametrize("top_n", [1, 3])
def test_top_eigenvalues_within_one_percent(trained_mlp, top_n, hvp):
    mlp, batches, hessian = trained_mlp
    exact = torch.linalg.eigvalsh(hessian).flip(0)[:top_n]
    # At this minimum the largest eigenvalues also have the largest magnitude.
    assert exact[0] > torch.linalg.eigvalsh(hessian).abs().max() - 1e-9
    est = top_eigenvalue(
        mlp, batches, max_iter=200, top_n=top_n, tolerance=1e-7, loss_fn=cross_entropy_loss, hvp=hvp
    )
    assert len(est.values) == top_n and all(est.converged)
    torch.testing.assert_close(torch.tensor(est.values, dtype=torch.float64), exact, rtol=1e-2, atol=0.0)
    # The residual bound holds: an exact eigenvalue lies within it (plus float32 rounding).
    eig = torch.linalg.eigvalsh(hessian)
    for value, residual in zip(est.values, est.residuals):
        assert (eig - value).abs().min() <= residual + 1e-4


def test_noise_stability_is_half_sigma_squared_trace_on_quadratic(quadratic):
    model, batches, a = quadratic
    sigma = 0.05
    est = noise_stability(model, batches, sigma=sigma, num_draws=400)
    expected = sigma**2 / 2 * a.trace().item()
    assert abs(est.value - expected) <= 3 * est.stderr, (est.value, est.stderr, expected)
    torch.testing.assert_close(est.value, expected, rtol=0.1, atol=0.0)
    # Antithetic samples are exactly sigma^2/2 u^T A u >= 0 for SPD A; one-point samples carry g^T u.
    assert min(est.samples) > 0
    one_point = noise_stability(model, batches, sigma=sigma, num_draws=400, antithetic=False)
    assert min(one_point.samples) < 0 < max(one_point.samples)
    assert abs(one_point.value - expected) <= 3 * one_point.stderr
    assert one_point.stderr > est.stderr


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_pac_bayes_curvature_is_exact_on_quadratic(quadratic, hvp):
    model, batches, a = quadratic
    init = snapshot_parameters(model)
    with torch.no_grad():
        model.w1.add_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
        model.w2.sub_(torch.tensor([1.0, 0.25, 0.0, -3.0], dtype=torch.float64))
    v1 = model.w1.detach() - init["w1"]
    v2 = model.w2.detach() - init["w2"]
    v = torch.cat([v1, v2])
    est = pac_bayes_curvature(model, batches, init, hvp=hvp)
    torch.testing.assert_close(est.per_layer["w1"], (v1 @ a[:3, :3] @ v1).item())
    torch.testing.assert_close(est.per_layer["w2"], (v2 @ a[3:, 3:] @ v2).item())
    torch.testing.assert_close(est.total, est.per_layer["w1"] + est.per_layer["w2"])
    torch.testing.assert_close(est.full, (v @ a @ v).item())
    torch.testing.assert_close(est.displacement_norm, v.norm().item())


def test_pac_bayes_curvature_rejects_mismatched_init(quadratic):
    model, batches, _ = quadratic
    with pytest.raises(ValueError, match=r"init has no tensor of the right shape for 1 measured"):
        pac_bayes_curvature(model, batches, {"w1": model.w1.detach().clone()})


class DropoutMLP(nn.Module):
    """An MLP with dropout (train/eval matters) returning an HF-style output with .loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2))
        self.head_frozen = nn.Linear(2, 2)
        self.head_frozen.requires_grad_(False)

    def forward(self, x, labels):
        return SimpleNamespace(loss=nn.functional.cross_entropy(self.head_frozen(self.net(x)), labels))


MEASURES = {
    "hessian_trace": lambda m, b: hessian_trace(m, b, num_probes=3),
    "hessian_trace_exact": lambda m, b: hessian_trace(m, b, num_probes=3, hvp="exact"),
    "top_eigenvalue": lambda m, b: top_eigenvalue(m, b, max_iter=3, top_n=2),
    "top_eigenvalue_exact": lambda m, b: top_eigenvalue(m, b, max_iter=3, top_n=2, hvp="exact"),
    "loss_curve": lambda m, b: loss_curve(m, b, [-1.0, 0.5]),
    "noise_stability": lambda m, b: noise_stability(m, b, sigma=0.1, num_draws=3),
    "pac_bayes_curvature": lambda m, b: pac_bayes_curvature(
        m, b, {n: torch.zeros_like(p) for n, p in m.named_parameters()}, parameters="all"
    ),
    "pac_bayes_curvature_fd": lambda m, b: pac_bayes_curvature(
        m, b, {n: torch.zeros_like(p) for n, p in m.named_parameters()}, parameters="all", hvp="finite_difference"
    ),
    "frozen_parameters": lambda m, b: hessian_trace(m, b, num_probes=2, parameters="all", include=["head_frozen"]),
}


@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_measure_leaves_model_as_found(measure):
    torch.manual_seed(3)
    model = DropoutMLP().train()
    model.net[2].eval()  # a submodule in another mode than its parent keeps its own flag
    batches = [{"x": torch.randn(8, 5), "labels": torch.randint(0, 2, (8,))} for _ in range(2)]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: (p.detach().clone(), p.grad.clone(), p.requires_grad) for n, p in model.named_parameters()}
    rng_before = torch.get_rng_state()
    MEASURES[measure](model, batches)
    for n, p in model.named_parameters():
        weight, grad, requires = before[n]
        assert torch.equal(p.detach(), weight), n
        assert torch.equal(p.grad, grad), n
        assert p.requires_grad == requires, n
    assert model.training and model.net.training and not model.net[2].training
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_trace_is_reproducible_and_measures_only_the_filter():
    torch.manual_seed(4)
    model = DropoutMLP()
    batches = [{"x": torch.randn(8, 5), "labels": torch.randint(0, 2, (8,))}]
    first = hessian_trace(model, batches, num_probes=4, seed=7)
    second = hessian_trace(model, batches, num_probes=4, seed=7)
    assert first.samples == second.samples
    assert first.num_parameters == 5 * 16 + 16 + 16 * 2 + 2  # trainable only: the frozen head is left out
    last = hessian_trace(model, batches, num_probes=4, include=[r"net\.3\."], exclude=["bias"])
    assert last.num_parameters == 16 * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parameters": "frozen"}, r"parameters='frozen' is not one of \('trainable', 'all'\)"),
        ({"include": ["("]}, r"include/exclude: bad regular expression"),
        ({"include": ["nothing_matches"]}, r"No parameter to measure"),
        ({"num_probes": 0}, r"num_probes must be >= 1"),
        ({"tolerance": 0.0}, r"tolerance must be > 0"),
        ({"hvp": "double_backward"}, r"hvp='double_backward' is not one of \('auto', 'finite_difference', 'exact'\)"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    model = DropoutMLP()
    batches = [{"x": torch.randn(4, 5), "labels": torch.randint(0, 2, (4,))}]
    with pytest.raises(ValueError, match=message):
        hessian_trace(model, batches, **{"num_probes": 2, **kwargs})


def test_report_and_callback_reject_unknown_product():
    from nso_hf.flatness import FlatnessCallback

    with pytest.raises(ValueError, match=r"ReportSettings.hvp='hessian' is not one of"):
        ReportSettings(hvp="hessian")
    with pytest.raises(ValueError, match=r"hvp='hessian' is not one of"):
        FlatnessCallback([{"x": torch.zeros(1)}], hvp="hessian")


def test_batch_without_loss_needs_loss_fn():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match=r"needs a loss_fn\(model, batch\)"):
        hessian_trace(model, [torch.randn(2, 3)], num_probes=1)


def test_peft_lora_measures_adapters_under_sdpa():
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=5, dropout=0.0, attention="sdpa", max_positions=32)  # SDPA has no double backward
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # B starts at 0; move it so the adapters' Hessian is not degenerate
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    impl = lora.base_model.model.config._attn_implementation
    assert impl == "sdpa"
    ids = torch.randint(0, 64, (2, 12))
    batches = [{"input_ids": ids, "labels": ids}]
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    adapter_numel = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)

    trace = hessian_trace(lora, batches, num_probes=3)  # finite differences, under SDPA
    eig = top_eigenvalue(lora, batches, max_iter=5)
    assert trace.num_parameters == adapter_numel == eig.num_parameters
    assert torch.isfinite(torch.tensor([trace.value, eig.value])).all() and trace.value != 0
    assert lora.base_model.model.config._attn_implementation == "sdpa"
    # The exact product (switched to eager for the measurement) on the same probes gives the same samples.
    exact = hessian_trace(lora, batches, num_probes=3, hvp="exact")
    torch.testing.assert_close(torch.tensor(trace.samples), torch.tensor(exact.samples), rtol=1e-3, atol=1e-5)
    assert lora.base_model.model.config._attn_implementation == "sdpa"
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters())
    named = select_measured_parameters(lora)
    assert all("lora_" in n for n, _ in named)


@pytest.mark.parametrize("trainer_kind", ["Trainer", "NSOTrainer"])
def test_callback_logs_flatness_through_trainer(tmp_path, trainer_kind):
    from transformers import Trainer

    from nso_hf import NSOConfig, NSOTrainer
    from nso_hf.callbacks import FlatnessCallback

    from conftest import lm_examples, tiny_llama, training_args

    model = tiny_llama(seed=0)
    probe_batches = [{k: torch.stack([e[k] for e in lm_examples(4, seed=9)]) for k in ("input_ids", "labels")}]
    callback = FlatnessCallback(probe_batches, every_n_steps=2, num_probes=4, max_iter=5)
    args = training_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4)
    kwargs = {"nso_config": NSOConfig(sigma=0.01)} if trainer_kind == "NSOTrainer" else {}
    trainer_cls = NSOTrainer if trainer_kind == "NSOTrainer" else Trainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=lm_examples(16), eval_dataset=lm_examples(4, seed=1),
        callbacks=[callback], **kwargs,
    )
    callback.bind(trainer)
    trainer.train()

    keys = {
        "flatness/hessian_trace", "flatness/hessian_trace_stderr",
        "flatness/top_eigenvalue", "flatness/top_eigenvalue_residual",
    }
    logged = [e for e in trainer.state.log_history if "flatness/hessian_trace" in e]
    # every 2 steps (2, 4) and after the evaluation at step 3; once per step.
    assert [e["step"] for e in logged] == [2, 3, 4]
    assert all(keys <= e.keys() and all(torch.isfinite(torch.tensor(e[k])) for k in keys) for e in logged)
    assert logged[0]["flatness/hessian_trace"] != logged[-1]["flatness/hessian_trace"]  # the weights moved
    # The last entry is the measure of the final weights, on the same batches with the same probes.
    final = hessian_trace(model, probe_batches, num_probes=4)
    torch.testing.assert_close(logged[-1]["flatness/hessian_trace"], final.value)


def test_callback_without_trainer_raises():
    from nso_hf.callbacks import FlatnessCallback

    callback = FlatnessCallback([{"x": torch.zeros(1)}])
    with pytest.raises(ValueError, match=r"no trainer to log through: pass FlatnessCallback\(batches, trainer="):
        callback.on_train_begin(None, None, None)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # Loaded from a file, not passed to spawn: torch.multiprocessing would share the tensors' memory
    # between the processes, and one rank's perturbation would show in the other's weights.
    model, batches = torch.load(f"{out_dir}/inputs.pt", weights_only=False)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = [batches[rank]]
        result = {
            "trace": hessian_trace(model, mine, num_probes=5, loss_fn=cross_entropy_loss).samples,
            "eig": top_eigenvalue(model, mine, max_iter=10, loss_fn=cross_entropy_loss).values,
            "noise": noise_stability(model, mine, sigma=0.1, num_draws=3, loss_fn=cross_entropy_loss).samples,
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_distributed_estimates_average_across_ranks(tmp_path, trained_mlp):
    """Two gloo processes, one batch each, give the estimate of one process holding both batches."""
    import torch.multiprocessing as mp

    mlp, batches, _ = trained_mlp
    x, y = batches[0]
    halves = [(x[:32], y[:32]), (x[32:], y[32:])]
    torch.save((mlp, halves), tmp_path / "inputs.pt")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = {
        "trace": hessian_trace(mlp, halves, num_probes=5, loss_fn=cross_entropy_loss).samples,
        "eig": top_eigenvalue(mlp, halves, max_iter=10, loss_fn=cross_entropy_loss).values,
        "noise": noise_stability(mlp, halves, sigma=0.1, num_draws=3, loss_fn=cross_entropy_loss).samples,
    }
    for key, expected in single.items():
        for result in ranks:  # every rank returns the same, whole-data estimate
            torch.testing.assert_close(torch.tensor(result[key]), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_attention_that_cannot_switch_raises_clear_error():
    model = DropoutMLP()
    model.config = SimpleNamespace(_attn_implementation="flash_attention_2")  # no set_attn_implementation
    batches = [{"x": torch.randn(4, 5), "labels": torch.randint(0, 2, (4,))}]
    with pytest.raises(ValueError, match=r'no double backward .* Load the model with attn_implementation="eager"'):
        hessian_trace(model, batches, num_probes=1, hvp="exact")
    assert model.config._attn_implementation == "flash_attention_2" and model.training
    # The finite-difference product needs no switch: it measures the model as it is.
    assert hessian_trace(model, batches, num_probes=1).num_probes == 1


def test_state_is_restored_when_the_measure_fails():
    from conftest import lm_examples, tiny_llama

    model = tiny_llama(seed=0).train()
    model.set_attn_implementation("sdpa")
    batch = {k: torch.stack([e[k] for e in lm_examples(2)]) for k in ("input_ids", "labels")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def failing_loss(m, b):
        calls.append(m.config._attn_implementation)
        if len(calls) == 3:
            raise RuntimeError("loss failed")
        return m(**b).loss

    with pytest.raises(RuntimeError, match="loss failed"):
        noise_stability(model, [batch], sigma=0.5, num_draws=2, loss_fn=failing_loss)
    assert calls == ["sdpa"] * 3  # forward passes only: the model's own kernel; failed while perturbed
    assert model.config._attn_implementation == "sdpa" and model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    calls.clear()  # the exact product: failed under eager attention, inside a double-backward measurement
    with pytest.raises(RuntimeError, match="loss failed"):
        hessian_trace(model, [batch, batch, batch], num_probes=2, loss_fn=failing_loss, hvp="exact")
    assert calls == ["eager"] * 3
    assert model.config._attn_implementation == "sdpa" and model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    calls.clear()  # finite differences: failed at W + eps v (the second batch of the first gradient)
    with pytest.raises(RuntimeError, match="loss failed"):
        hessian_trace(model, [batch, batch, batch, batch], num_probes=2, loss_fn=failing_loss)
    assert calls == ["sdpa"] * 3
    assert model.training and all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_hvp_auto_is_exact_for_16_bit_weights():
    """Finite differences of bf16 gradients are not accurate: "auto" takes the double-backward product there."""
    from conftest import lm_examples, tiny_llama

    batch = {k: torch.stack([e[k] for e in lm_examples(2)]) for k in ("input_ids", "labels")}
    for dtype, expected in [(torch.float32, FiniteDifferenceHessian), (torch.bfloat16, HessianOperator)]:
        model = tiny_llama(seed=0, dtype=dtype)
        model.set_attn_implementation("sdpa")
        with Measurement(model, [batch]) as m:
            assert isinstance(hessian_operator(m), expected)
            assert model.config._attn_implementation == ("eager" if expected is HessianOperator else "sdpa")
        assert model.config._attn_implementation == "sdpa"


def test_report_enters_one_measurement(monkeypatch):
    """Selection, batch moves and the attention switch happen once for all the report's estimators."""
    import nso_hf.flatness.context as context

    from conftest import lm_examples, tiny_llama

    model = tiny_llama(seed=0, dropout=0.0)
    model.set_attn_implementation("sdpa")
    batches = [
        {k: torch.stack([e[k] for e in lm_examples(2, seed=s)]) for k in ("input_ids", "labels")} for s in (0, 1)
    ]
    init = snapshot_parameters(model)
    counts = {"select": 0, "move": 0, "eager": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(context, "select_measured_parameters", counted("select", context.select_measured_parameters))
    monkeypatch.setattr(context, "move_to_device", counted("move", context.move_to_device))
    monkeypatch.setattr(context, "eager_attention", counted("eager", context.eager_attention))
    settings = ReportSettings(num_probes=2, max_iter=2, top_n=2, num_draws=1, curve_points=3, surface_points=2)
    flatness_report(model, batches, settings, init=init)
    assert counts == {"select": 1, "move": 2, "eager": 0}  # finite differences: no attention switch
    counts.update(select=0, move=0)
    flatness_report(model, batches, dataclasses.replace(settings, hvp="exact"), init=init)
    assert counts == {"select": 1, "move": 2, "eager": 1}
    assert model.config._attn_implementation == "sdpa"


def test_zero3_parameters_are_refused():
    model = DropoutMLP()
    model.net[0].weight.ds_tensor = torch.zeros(3)  # what DeepSpeed ZeRO-3 attaches to its partitioned parameters
    batches = [{"x": torch.randn(4, 5), "labels": torch.randint(0, 2, (4,))}]
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-3 parameters cannot be measured"):
        hessian_trace(model, batches, num_probes=1)


def test_0_1_import_paths_point_to_the_subpackage():
    import nso_hf.flatness as flatness
    from nso_hf import callbacks, flatness_report, hvp, landscape, measurement
    from nso_hf.flatness import callback, context, mode, report
    from nso_hf.flatness import hvp as products
    from nso_hf.flatness import landscape as landscapes

    assert callbacks.FlatnessCallback is callback.FlatnessCallback is flatness.FlatnessCallback
    assert landscape.loss_curve is landscapes.loss_curve and landscape.loss_at_offsets is landscapes.loss_at_offsets
    assert hvp.HessianOperator is products.HessianOperator and hvp.mean_loss is context.mean_loss
    assert hvp.prepare_measurement is context.prepare_measurement
    assert measurement.measurement_mode is mode.measurement_mode
    assert flatness_report.flatness_report is report.flatness_report
    assert flatness_report.REPORT_KEYS is report.REPORT_KEYS
    missing = [name for name in flatness.__all__ if not hasattr(flatness, name)]
    assert not missing
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        flatness.no_such_name  # noqa: B018
