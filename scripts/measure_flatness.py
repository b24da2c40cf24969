"""Flatness of one or more causal-LM checkpoints: every measure in a JSON, loss landscapes in a PNG.

Each checkpoint is a full model folder (`save_pretrained`) or a peft adapter folder
(`adapter_config.json`; its base model is `--base_model` or the path the adapter names). For a
full model every parameter is measured; for an adapter, the adapters. All checkpoints are measured
on the same batches of text: `--data_file` (JSONL, or JSON list, of objects with `--text_field`),
or a small embedded default. Writes `<report_dir>/flatness.json` (Hessian trace with its standard
error, top eigenvalues, noise stability, loss, the loss along a random filter-normalised direction,
and with `--reference_checkpoint` the PAC-Bayes quantity sum_l v_l^T H_l v_l, v = W - W_reference)
and `<report_dir>/landscape.png` (the 1-D curves of all checkpoints on one plot; with
`--surface_points N` also a contour of each checkpoint's 2-D surface).

Launch:
    python scripts/measure_flatness.py --checkpoints outputs/trainer outputs/nso --labels Trainer NSO
    python scripts/measure_flatness.py --checkpoints outputs/lora_nso --base_model my_base \
        --reference_checkpoint outputs/lora_init --data_file data.jsonl --surface_points 11
    python scripts/measure_flatness.py --config flatness.yaml        # YAML keys = argument names

The arguments and the run live in `nso_hf.flatness.compare`; `--help` lists every option.
"""

from __future__ import annotations

import sys

from nso_hf.flatness.compare import compare_checkpoints, parse

if __name__ == "__main__":
    compare_checkpoints(parse(sys.argv[1:]))
