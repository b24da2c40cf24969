"""`scripts/find_sigma.py`: the sigma finder (`nso_hf.sigma_finder`) on the model and data of a CoT run.

The model is loaded exactly as `scripts/finetune_cot.py` would start training it (same options, same
seed, fresh LoRA adapters when it trains LoRA), the first training batches are collated as in training, and the loss
increase under noise is measured over the grid on them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from nso_hf.sigma_finder import DEFAULT_GRID, DEFAULT_TARGET, find_sigma


@dataclass
class SigmaFinderArguments:
    """The grid, the rule's target and the work per sigma."""

    sigma_grid: list[float] = field(default_factory=lambda: list(DEFAULT_GRID), metadata={"help": "Sigmas tried."})
    target: float = field(
        default=DEFAULT_TARGET, metadata={"help": "Largest loss increase allowed, as a fraction of the loss (0.05: five percent)."}
    )
    num_draws: int = field(default=8, metadata={"help": "Antithetic noise draws per sigma."})
    num_batches: int = field(default=4, metadata={"help": "Training batches (of --per_device_train_batch_size) measured."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the sweep and the choice here."})


def run_find_sigma(script_args: Any, data_args: Any, training_args: Any, lora_args: Any, finder: SigmaFinderArguments):
    """Measure the sweep, print its table and the recommendation; returns the `SigmaSearch`."""
    from transformers import DataCollatorForSeq2Seq

    from nso_hf.cot.checks import InputError
    from nso_hf.cot.finetune import load_model, training_features, training_inputs
    from nso_hf.flatness.final import flatness_batches

    try:
        inputs = training_inputs(script_args, data_args)
    except (ValueError, OSError) as error:
        raise InputError(str(error)) from None
    model, tokenizer, _, _ = load_model(script_args, training_args, lora_args)
    features, _ = training_features(inputs, data_args, tokenizer)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    batches = flatness_batches(features, collator, training_args.per_device_train_batch_size, finder.num_batches)
    search = find_sigma(model, batches, finder.sigma_grid, finder.target, finder.num_draws, seed=training_args.seed)
    print(f"\nLoss L(W) = {search.base_loss:.4f} on {len(batches)} batches; noise on the trainable weights "
          f"(absolute, {finder.num_draws} antithetic draws per sigma):\n\n{search.table()}\n", flush=True)
    if search.sigma is None:
        print(f"No recommendation: {search.note}.", flush=True)
    else:
        print(f"Recommended: --sigma {search.sigma:g} ({search.note}).", flush=True)
    if finder.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(finder.output_json)), exist_ok=True)
        with open(finder.output_json, "w", encoding="utf-8") as handle:
            json.dump(search.to_dict(), handle, indent=1)
    return search
