"""scripts/gpu_check.py in its CPU smoke mode: the script runs end to end and its checks hold on CPU."""

from __future__ import annotations

import json

from nso_hf.config import METHODS

from conftest import load_script


def test_gpu_check_smoke_on_cpu(tmp_path, one_thread):
    script = load_script("gpu_check.py")
    argv = ["--device", "cpu", "--tiny", "--steps", "2", "--batch_size", "2", "--seq_len", "16", "--output_dir", str(tmp_path)]
    report = script["main"](argv)
    bf16 = report["precision"]["bf16"]
    assert bf16["sigma0_losses_equal"] and bf16["sigma0_weights_max_gap"] == 0.0
    assert bf16["restore_max_gap"] == 0.0
    for mode in ("lora", "full"):
        for method in METHODS:
            row = report["speed"][f"{mode}/{method}"]
            assert "refused" in row or row["s_per_step"] > 0
    assert json.loads((tmp_path / "gpu_check.json").read_text())["device"] == "CPU"
    assert "| lora/none |" in (tmp_path / "gpu_check.md").read_text()
