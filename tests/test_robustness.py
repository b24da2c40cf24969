"""The deployed-model measures: gguf's Q8_0 / Q4_0 round trip against hand-computed blocks, the moves of the
weights (Linear, Conv1D, merged LoRA) and their bit-exact restore, seeded relative weight noise, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from nso_hf.robustness import (
    RobustnessArguments,
    check_quantizable,
    deployed_weights,
    gguf_round_trip,
    measure_robustness,
    noisy_point,
    quantized_point,
    split_by_block_size,
)

from conftest import params_of, tiny_llama


def fp16(x: float) -> float:
    """x rounded to float16 and back: how a block stores its scale d."""
    return torch.tensor(x, dtype=torch.float32).half().float().item()


# --------------------------------------------------------------------------- the round trip, by hand
def test_q8_0_block_by_hand():
    # Block 1: max |x| = 127, so d = 1 (exact in fp16) and x' = round-half-away-from-zero(x).
    x = [127.0, -127.0, 0.5, -0.5, 2.5, -2.5, 1.49, -1.51, 0.0, 63.7] + [0.25] * 22
    want = [127.0, -127.0, 1.0, -1.0, 3.0, -3.0, 1.0, -2.0, 0.0, 64.0] + [0.0] * 22
    # Block 2: max |x| = 1, d = 1/127 in float32 (1/d is 127.0 again), q = round-half-away(x * 127); the block
    # stores d in fp16, so x' = q * fp16(1/127).
    d = fp16(1 / 127)
    y = [1.0, -1.0, 0.5, 0.1] + [0.0] * 28
    want2 = [127 * d, -127 * d, 64 * d, 13 * d] + [0.0] * 28  # 0.5 * 127 = 63.5 -> 64; 0.1 * 127 = 12.7 -> 13
    got = gguf_round_trip(torch.tensor([x, y]), "q8_0")
    assert torch.equal(got, torch.tensor([want, want2]))
    assert got[1, 0].item() != 1.0  # the fp16 scale: 127 * fp16(1/127) = 0.99993896484375
    assert got[1, 0].item() == 0.99993896484375
    # The GGUF block itself (34 bytes): d as little-endian fp16, then the 32 values of q as int8.
    q = [127, -127, 1, -1, 3, -3, 1, -2, 0, 64] + [0] * 22
    assert gguf_blocks(x, "Q8_0") == np.float16(1.0).tobytes() + np.array(q, dtype=np.int8).tobytes()


def gguf_blocks(values: list[float], kind: str) -> bytes:
    """The bytes gguf's quantizer writes for one block of 32 values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(np.array([values], dtype=np.float32), GGMLQuantizationType[kind]).tobytes()


def test_q4_0_block_by_hand():
    # Block 1: the value of largest magnitude is -8, so d = -8 / -8 = 1 and q = clip(trunc(x + 8.5), 0, 15), x' = q - 8:
    # Q4_0 rounds halves up (-0.5 -> 0, -2.5 -> -2) and clips at 7 above.
    x = [-8.0, 7.4, 7.6, 0.5, -0.5, 0.49, 2.5, -2.5, -7.6, 3.0] + [0.0] * 22
    want = [-8.0, 7.0, 7.0, 1.0, 0.0, 0.0, 3.0, -2.0, -8.0, 3.0] + [0.0] * 22
    # Block 2: the largest magnitude is +4, so d = 4 / -8 = -0.5, q = clip(trunc(-2x + 8.5), 0, 15), x' = -0.5 (q - 8):
    # +4 comes back exactly, -4 is clipped to -3.5 (the 16 levels are -8..7 times d).
    y = [4.0, -4.0, 1.0, -1.3, 0.2] + [0.0] * 27
    want2 = [4.0, -3.5, 1.0, -1.5, 0.0] + [0.0] * 27  # -1.3: trunc(11.1) = 11 -> -1.5; 0.2: trunc(8.1) = 8 -> 0
    got = gguf_round_trip(torch.tensor([x, y]), "q4_0")
    assert torch.equal(got, torch.tensor([want, want2]))
    # The GGUF block itself (18 bytes): d as fp16, then 16 bytes, byte j = q[j] | q[j + 16] << 4 (low nibbles hold
    # the first half of the block). Block 1's q = x' + 8; values 16-31 are 0, q = 8.
    q = [0, 15, 15, 9, 8, 8, 11, 6, 0, 11] + [8] * 22
    packed = bytes(q[j] | q[j + 16] << 4 for j in range(16))
    assert gguf_blocks(x, "Q4_0") == np.float16(1.0).tobytes() + packed
    q2 = [0, 15, 6, 11, 8] + [8] * 27  # block 2, d = -0.5
    assert gguf_blocks(y, "Q4_0") == np.float16(-0.5).tobytes() + bytes(q2[j] | q2[j + 16] << 4 for j in range(16))


def test_round_trip_refuses_an_unknown_type_and_a_ragged_row():
    with pytest.raises(ValueError, match="Unknown GGUF type 'q4_k'"):
        gguf_round_trip(torch.zeros(1, 32), "q4_k")
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_round_trip(torch.zeros(1, 40), "q8_0")


# --------------------------------------------------------------------------- moves of the weights
class Net(nn.Module):
    """Linear layers of three kinds: quantizable (64 inputs), ragged (40 inputs), GPT-2's transposed Conv1D."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(64, 16)
        self.odd = nn.Linear(40, 8)
        self.conv = Conv1D(16, 32)  # weight (in 32, out 16)
        self.norm = nn.LayerNorm(16)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_point_is_gguf_of_each_weight_and_restore_is_bit_exact(kind):
    net = Net()
    before = params_of(net)
    weights = deployed_weights(net)
    assert [w.name for w in weights] == ["fc.weight", "odd.weight", "conv.weight"]
    kept, skipped = split_by_block_size(weights)
    assert [w.name for w in skipped] == ["odd.weight"]
    point = quantized_point(kept, kind)
    # Exactly gguf's round trip of each weight, along the input dimension (Conv1D is stored transposed).
    assert torch.equal(net.fc.weight, gguf_round_trip(before["fc.weight"], kind))
    assert torch.equal(net.conv.weight, gguf_round_trip(before["conv.weight"].T, kind).T)
    assert not torch.equal(net.fc.weight, before["fc.weight"])
    for name in ("odd.weight", "fc.bias", "conv.bias", "norm.weight"):  # full precision, or not a Linear weight
        assert torch.equal(dict(net.named_parameters())[name], before[name]), name
    point.restore()
    for name, value in net.named_parameters():
        assert torch.equal(value, before[name]), name


def test_lora_round_trip_quantizes_the_merged_weight_and_restores_every_bit():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=1, dropout=0.0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0: give the adapters a delta, so merged differs from W0
            with torch.no_grad():
                p.normal_(0, 0.05)
    before = params_of(model)
    weights = deployed_weights(model)
    lora = [w for w in weights if w.lora is not None]
    assert len(lora) == 4 and len(weights) == 15  # 2 layers x 7 Linear, lm_head (tied to the embedding) once
    assert not any("lora_" in w.name for w in weights)
    merged = {w.name: w.merged() for w in lora}
    point = quantized_point(weights, "q4_0")
    for w in lora:  # the layer's effective weight W0' + s BA is the round trip of M = W0 + s BA
        effective = w.merged()
        torch.testing.assert_close(effective, gguf_round_trip(merged[w.name], "q4_0"), rtol=0, atol=1e-6)
    point.restore()
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), name


def test_weight_noise_draws_the_same_normals_for_every_model_and_scales_by_row_rms():
    a, b = Net(seed=0), Net(seed=5)
    offsets = []
    for net in (a, b):
        before = params_of(net)
        weights = deployed_weights(net)
        scales = [w.row_scale() for w in weights]
        point = noisy_point(weights, 0.1, seed=3)
        offsets.append([(w.param.detach() - before[w.name]) / (0.1 * s) for w, s in zip(weights, scales)])
        assert torch.equal(net.fc.bias, before["fc.bias"])  # biases are not deployed weights: never moved
        point.restore()
        for name, value in net.named_parameters():
            assert torch.equal(value, before[name]), name
    for za, zb in zip(*offsets):  # the same standard normals in models with different weights
        torch.testing.assert_close(za, zb, rtol=1e-4, atol=1e-4)
    z = torch.cat([t.flatten() for t in offsets[0]])
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1  # 1,856 draws of N(0, 1)
    # Conv1D rows are output rows: its scale is the RMS over the input dimension (dim 0 of its weight).
    conv = deployed_weights(a)[2]
    torch.testing.assert_close(conv.row_scale().flatten(), a.conv.weight.detach().pow(2).mean(dim=0).sqrt())
    before, scale = params_of(a), deployed_weights(a)[0].row_scale()
    other = noisy_point(deployed_weights(a), 0.1, seed=4)  # another seed, other draws
    z4 = (a.fc.weight.detach() - before["fc.weight"]) / (0.1 * scale)
    other.restore()
    assert (z4 - offsets[0][0]).abs().max() > 1


def test_measure_robustness_reports_each_accuracy_and_drop_and_leaves_the_model_as_found():
    net = Net()
    before = params_of(net)
    seen = []

    def evaluate(label):  # a stand-in accuracy: a known function of the weights it is given
        seen.append(label)
        return {"test": net.fc.weight.sum().item(), "ood": net.conv.weight.abs().sum().item()}

    clean = evaluate("clean")
    logged = []
    report = measure_robustness(net, evaluate, clean, noise=0.05, draws=2, seed=7, log=logged.append)
    assert seen == ["clean", "q8_0", "q4_0", "noise0", "noise1"]
    q4 = gguf_round_trip(before["fc.weight"], "q4_0").sum().item()
    row = report["sources"]["test"]
    assert row["clean"] == clean["test"] and row["q4_0"] == q4 and row["q4_0_drop"] == clean["test"] - q4
    assert len(row["noise_draws"]) == 2 and row["noise"] == pytest.approx(sum(row["noise_draws"]) / 2)
    assert row["noise_drop"] == clean["test"] - row["noise"]
    assert (report["weights"], report["quantized"], report["full_precision"]) == (3, 2, ["odd.weight"])
    assert report["weight_noise"] == {"relative_std": 0.05, "draws": 2, "seed": 7}
    assert "odd.weight" in logged[0]
    for name, value in net.named_parameters():
        assert torch.equal(value, before[name]), name


def test_a_model_with_nothing_to_quantize_and_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"--robustness: none of the model's 1 Linear weights .*input sizes \[40\].*drop --robustness"):
        check_quantizable(nn.Sequential(nn.Linear(40, 8)))
    assert [w.name for w in check_quantizable(Net())] == ["fc.weight", "conv.weight"]
    with pytest.raises(ValueError, match="--robustness_noise must be a finite fraction > 0"):
        RobustnessArguments(robustness_noise=0.0)
    with pytest.raises(ValueError, match="--robustness_noise_draws must be >= 1"):
        RobustnessArguments(robustness_noise_draws=0)


def test_robustness_without_gguf_is_refused(monkeypatch):
    import importlib.util

    from nso_hf.robustness import require_gguf

    require_gguf()  # installed with the test extra
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ValueError, match=r"--robustness quantizes with the gguf package, which is not installed: pip install"):
        require_gguf()


# --------------------------------------------------------------------------- in the scripts
def test_cot_script_scores_the_quantized_weights_and_ends_holding_the_trained_ones(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """During the 'q8_0' pass the model holds gguf's round trip of the trained weights; afterwards, those weights."""
    from test_best_checkpoint import cot_argv, run_cot

    import nso_hf.cot.evaluation as evaluation
    import nso_hf.robustness as robustness

    real, held = evaluation.evaluate_cot, {}

    def evaluate_cot(model, tokenizer, dataset, recipe, template, name, *args, **kwargs):
        held[name] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return real(model, tokenizer, dataset, recipe, template, name, *args, **kwargs)

    def measure_robustness(model, *args, **kwargs):
        report = real_measure(model, *args, **kwargs)
        held["after"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return report

    real_measure = robustness.measure_robustness
    monkeypatch.setattr(evaluation, "evaluate_cot", evaluate_cot)
    monkeypatch.setattr(robustness, "measure_robustness", measure_robustness)
    results = run_cot(cot_argv(tiny_model_dir, tmp_path / "r", "nso", "--max_steps", "1", "--full_finetune", "true",
                               "--robustness", "true", "--robustness_noise", "0.1", "--save_final_model", "false"))
    assert list(held) == ["test", "ood", "test q8_0", "ood q8_0", "test q4_0", "ood q4_0", "test noise0", "ood noise0", "after"]
    trained = held["test"]
    weight = "model.layers.0.mlp.down_proj.weight"  # input size 64: two blocks per row
    for kind in ("q8_0", "q4_0"):
        assert torch.equal(held[f"test {kind}"][weight], gguf_round_trip(trained[weight], kind))
        assert torch.equal(held[f"test {kind}"]["model.norm.weight"], trained["model.norm.weight"])  # not a Linear weight
    noisy = held["test noise0"][weight] - trained[weight]
    assert noisy.abs().max() > 0 and abs((noisy / trained[weight].pow(2).mean(1, keepdim=True).sqrt()).std().item() - 0.1) < 0.01
    assert held["after"].keys() == trained.keys() and all(torch.equal(held["after"][k], v) for k, v in trained.items())
    report = results["robustness"]
    # 2 layers x 7 Linear weights and the lm_head, all of input size 32 or 64: every one quantized.
    assert (report["weights"], report["quantized"], report["num_full_precision"]) == (15, 15, 0)
    for source in ("test", "ood"):
        row = report["sources"][source]
        assert row["clean"] == results["eval"][source]["exact_match"]
        assert row["q4_0_drop"] == row["clean"] - row["q4_0"] and row["noise_drop"] == row["clean"] - row["noise"]
    assert json.loads((tmp_path / "r" / "cot_results.json").read_text())["robustness"] == report
