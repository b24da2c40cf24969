"""The state a model is measured in, and its exact return to the state it was found in.

`measurement_state` and `eager_attention` each put everything back on exit, even when the
measurement raises:
- eval mode (dropout off: the Hessian of a deterministic loss; gradient checkpointing in HF models
  only runs in training mode, and its reentrant variant has no double backward), then each
  module's own `training` flag back;
- `requires_grad` on the measured parameters (frozen ones can be measured), then the old flags;
- gradients enabled (a caller may be under `torch.no_grad()`);
- `eager_attention`, only for the exact (double-backward) Hessian-vector product: SDPA and flash
  attention have no double backward, so every Hugging Face sub-model not on "eager" is switched to
  it, and each config's own value is put back. The finite-difference product and the forward-only
  measures keep the model's own kernel.
`measurement_mode` is both (the 0.1 API). Weights are not touched here: the functions that move
them go through `nso_hf.noise.Perturbation`, which restores them by copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

# The one attention implementation of transformers known to support double backward.
DOUBLE_BACKWARD_ATTENTION = "eager"


def _hf_configs(model: nn.Module) -> list:
    """Every distinct transformers config reachable from the model's sub-models, sub-configs included."""
    configs, seen = [], set()
    stack = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        configs.append(config)
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return configs


def _set_config_attention(config, value) -> None:
    # Written to the internal field, as `set_attn_implementation` does, so that restoring a value
    # never re-runs its availability checks (which could refuse e.g. flash attention on a CPU run).
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch every Hugging Face sub-model to eager attention for the duration, then restore.

    Raises:
        ValueError: a sub-model uses another attention kernel and cannot switch it at run time
            (transformers before 4.48 fixes the kernel when the model is built).
    """
    configs = _hf_configs(model)
    before = [(c, c._attn_implementation) for c in configs]
    if all(v in (None, DOUBLE_BACKWARD_ATTENTION) for _, v in before):
        yield
        return
    try:
        for module in model.modules():
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if impl in (None, DOUBLE_BACKWARD_ATTENTION):
                continue
            if not hasattr(module, "set_attn_implementation"):
                raise ValueError(
                    f"{type(module).__name__} uses attn_implementation={impl!r}, whose kernel has no double backward "
                    "(needed for Hessian-vector products), and this transformers version cannot switch it at run "
                    'time. Load the model with attn_implementation="eager" for the measurement.'
                )
            module.set_attn_implementation(DOUBLE_BACKWARD_ATTENTION)
        left = sorted({str(c._attn_implementation) for c in configs} - {"None", DOUBLE_BACKWARD_ATTENTION})
        if left:
            raise ValueError(
                f"Could not switch attention to {DOUBLE_BACKWARD_ATTENTION!r} (still {left}): its kernel has no double "
                'backward. Load the model with attn_implementation="eager" for the measurement.'
            )
        yield
    finally:
        for config, value in before:
            _set_config_attention(config, value)


@contextmanager
def measurement_state(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Eval mode, `params` requiring grad, gradients on; each module's flag and each `requires_grad` put back.

    Args:
        model: the model to measure.
        params: the measured parameters.
    """
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag


@contextmanager
def measurement_mode(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """`measurement_state` and `eager_attention`: the state the exact Hessian-vector product needs.

    Args:
        model: the model to measure.
        params: the measured parameters.
    """
    with measurement_state(model, params), eager_attention(model):
        yield
