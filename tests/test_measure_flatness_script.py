"""scripts/measure_flatness.py (`nso_hf.flatness.compare`) on tiny checkpoints saved by the test."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM, TrainingArguments

from nso_hf import NSOConfig
from nso_hf.flatness import compare
from nso_hf.flatness.report import REPORT_KEYS

from conftest import byte_level_tokenizer, tiny_llama_config

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "measure_flatness.py")
ENTRY_KEYS = {"label", "checkpoint", "kind", "num_batches", *REPORT_KEYS}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def script():
    """The script's library side: its arguments, parser and run."""
    return SimpleNamespace(
        MeasureFlatnessArguments=compare.MeasureFlatnessArguments, DEFAULT_TEXTS=compare.DEFAULT_TEXTS,
        parse=compare.parse, main=compare.compare_checkpoints,
    )


def tiny_checkpoint(path, tokenizer, seed: int, train_steps: int, texts: list[str]) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        tiny_llama_config(vocab_size=len(tokenizer), max_positions=64, pad_token_id=tokenizer.pad_token_id)
    )
    enc = tokenizer(texts[:8], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)
    for _ in range(train_steps):
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_argument_names_do_not_clash_with_trainer_or_nso(script):
    ours = {f.name for f in dataclasses.fields(script.MeasureFlatnessArguments)}
    theirs = {f.name for f in dataclasses.fields(TrainingArguments)} | {f.name for f in dataclasses.fields(NSOConfig)}
    assert ours and not ours & theirs


def test_script_writes_json_and_png_for_two_checkpoints(tmp_path, script):
    tokenizer = byte_level_tokenizer(script.DEFAULT_TEXTS)
    init_dir, trained_dir = tmp_path / "init", tmp_path / "trained"
    tiny_checkpoint(init_dir, tokenizer, seed=0, train_steps=0, texts=script.DEFAULT_TEXTS)
    tiny_checkpoint(trained_dir, tokenizer, seed=0, train_steps=30, texts=script.DEFAULT_TEXTS)
    config = tmp_path / "flatness.yaml"
    config.write_text(f"num_probes: 3\nmax_iter: 4\ntop_n: 2\nnum_draws: 2\nreport_dir: {tmp_path / 'report'}\n")
    args = script.parse([
        "--config", str(config), "--checkpoints", str(init_dir), str(trained_dir), "--labels", "init", "trained",
        "--reference_checkpoint", str(init_dir), "--curve_points", "5", "--surface_points", "3",
        "--measure_batch_size", "4", "--num_batches", "2",
    ])
    assert args.num_probes == 3 and args.curve_points == 5  # YAML and command line both applied
    script.main(args)

    png = tmp_path / "report" / "landscape.png"
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "report" / "flatness.json").read_text())
    assert set(result) == {"settings", "checkpoints", "plot"}
    init, trained = result["checkpoints"]
    for entry in (init, trained):
        assert set(entry) == ENTRY_KEYS
        assert entry["kind"] == "full" and entry["num_batches"] == 2
        assert entry["hessian_trace"]["num_probes"] == 3 and len(entry["top_eigenvalues"]["values"]) == 2
        assert len(entry["landscape_1d"]["losses"]) == 5
        assert len(entry["landscape_2d"]["losses"]) == 3 and len(entry["landscape_2d"]["losses"][0]) == 3
        # alpha = 0 is the checkpoint itself: the curve's middle point is the measured loss.
        torch.testing.assert_close(entry["landscape_1d"]["losses"][2], entry["loss"])
    # The reference is the init checkpoint: v = 0 there, and the trained one has moved.
    assert init["pac_bayes_curvature"]["total"] == 0.0 and init["pac_bayes_curvature"]["displacement_norm"] == 0.0
    assert trained["pac_bayes_curvature"]["displacement_norm"] > 0
    assert trained["loss"] < init["loss"]
    saved = LlamaForCausalLM.from_pretrained(init_dir)
    assert init["num_parameters_measured"] == sum(p.numel() for p in saved.parameters())


def test_script_measures_adapter_checkpoint(tmp_path, script, monkeypatch):
    from peft import LoraConfig, get_peft_model

    tokenizer = byte_level_tokenizer(script.DEFAULT_TEXTS)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_checkpoint(base_dir, tokenizer, seed=1, train_steps=0, texts=script.DEFAULT_TEXTS)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter_numel = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    lora.save_pretrained(adapter_dir)
    argv = [
        "--checkpoints", str(adapter_dir), "--base_model", str(base_dir), "--num_probes", "2", "--max_iter", "2",
        "--num_draws", "1", "--curve_points", "3", "--num_batches", "1", "--report_dir", str(tmp_path / "report"),
    ]
    # Through the script file itself (in this process: no second interpreter start-up).
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    runpy.run_path(SCRIPT, run_name="__main__")
    result = json.loads((tmp_path / "report" / "flatness.json").read_text())
    (entry,) = result["checkpoints"]
    assert entry["kind"] == "adapter" and entry["num_parameters_measured"] == adapter_numel
    assert entry["pac_bayes_curvature"] is None and entry["landscape_2d"] is None
    assert (tmp_path / "report" / "landscape.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], r"--checkpoints: give at least one checkpoint folder"),
        (["--checkpoints", "a", "b", "--labels", "x"], r"--labels: 1 labels for 2 checkpoints"),
        (["--checkpoints", "a", "--num_probes", "0"], r"--num_probes must be >= 1"),
    ],
)
def test_bad_arguments_raise(script, argv, message):
    with pytest.raises(ValueError, match=message):
        script.parse(argv)
