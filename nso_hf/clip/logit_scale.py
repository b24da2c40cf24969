"""Keep CLIP's learnable temperature bounded: `logit_scale <= log(100)` after every optimizer step.

Why a `TrainerCallback` on `on_optimizer_step` (and not a wrapper around the model or the step):
- it runs right after `optimizer.step()`, before the next forward, which is where CLIP and
  open_clip clamp; NSO has already put the weights back by then, so the clamp acts on W itself and
  never on a perturbed copy;
- it leaves the training step alone, so `Trainer`, `NSOTrainer` and any `NSOMixin` subclass get
  the same clamp with no second copy of the step, and the model stays a plain `CLIPModel` that
  `save_pretrained` / `from_pretrained` handle as usual.
The cost is one in-place `clamp_` on a scalar per step. Under DDP every rank clamps its identical
replica. (A noise draw may carry the scale a hair past the bound during a perturbed pass; that is
the perturbation NSO means to apply.)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import TrainerCallback

DEFAULT_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP: the temperature never exceeds 100


def clamp_logit_scale(model: nn.Module, max_value: float = DEFAULT_MAX_LOGIT_SCALE, min_value: float = 0.0) -> None:
    """Clamp `model.logit_scale` in place.

    Args:
        model: a `CLIPModel`, possibly wrapped (DDP, peft); the first parameter named `logit_scale` is used.
        max_value: upper bound of log(temperature) (default log 100).
        min_value: lower bound (default 0: a temperature of at least 1).

    Raises:
        ValueError: the model has no `logit_scale` parameter.
    """
    for name, param in model.named_parameters():
        if name == "logit_scale" or name.endswith(".logit_scale"):
            with torch.no_grad():
                param.clamp_(min_value, max_value)
            return
    raise ValueError("The model has no 'logit_scale' parameter to clamp; is it a CLIPModel?")


class LogitScaleClampCallback(TrainerCallback):
    """Clamp the logit scale after each optimizer step (see the module docstring for why here)."""

    def __init__(self, max_value: float = DEFAULT_MAX_LOGIT_SCALE, min_value: float = 0.0):
        if not min_value <= max_value:
            raise ValueError(f"logit scale bounds must satisfy min <= max, got {min_value} > {max_value}.")
        self.max_value, self.min_value = max_value, min_value

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Trainer's callback handler passes its (unwrapped) model to every event.
        if model is None:
            raise RuntimeError("LogitScaleClampCallback needs the model; Trainer passes it to every callback event.")
        clamp_logit_scale(model, self.max_value, self.min_value)
        return control
