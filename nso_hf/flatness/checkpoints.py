"""Load a causal-LM checkpoint to measure: a full model folder, or a peft adapter folder on its base."""

from __future__ import annotations

import json
import os
from typing import Any

import torch


def load_checkpoint(
    path: str, base_model: str | None, dtype: torch.dtype, attn_implementation: str | None = None
) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) for a full model folder or a peft adapter folder (adapters made trainable).

    Args:
        path: a `save_pretrained` folder, or an adapter folder (it holds `adapter_config.json`).
        base_model: the adapter's base model folder (default: the path the adapter records).
        dtype: the dtype to load in.
        attn_implementation: passed to `from_pretrained` (default: the library's choice, e.g. SDPA;
            the finite-difference product needs no double backward, and the exact one switches the
            kernel to eager for the measurement itself).

    Returns:
        The model on CUDA when available (else CPU), its tokenizer (the adapter's, or its base's), and
        "full" or "adapter".

    Raises:
        ValueError: an adapter folder without a base model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    load: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        load["attn_implementation"] = attn_implementation
    adapter_config = os.path.join(path, "adapter_config.json")
    if not os.path.exists(adapter_config):
        model = AutoModelForCausalLM.from_pretrained(path, **load).to(device)
        return model, AutoTokenizer.from_pretrained(path), "full"
    from peft import PeftModel

    with open(adapter_config) as f:
        base_path = base_model or json.load(f).get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"{path} is an adapter without base_model_name_or_path: pass --base_model.")
    base = AutoModelForCausalLM.from_pretrained(base_path, **load)
    model = PeftModel.from_pretrained(base, path, is_trainable=True).to(device)
    has_tokenizer = any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(path if has_tokenizer else base_path), "adapter"
