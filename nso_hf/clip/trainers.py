"""Which Trainer class trains CLIP: plain `Trainer`, `NSOTrainer`, or either with the gathered loss.

`--method none` is `transformers.Trainer`; every other method (nso, rwp, sam, asam; flat_lora and
nso_merged need LoRA layers) is `NSOTrainer` with `NSOConfig(method=...)`. With `gather_features` the loss comes
from `GatheredLossTrainer.compute_loss`, and NSO is mixed in on top of it (`NSOMixin` calls the
parent's `training_step` and `compute_loss`), so there is one NSO step for every variant.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from nso_hf.clip.gather import gathered_contrastive_loss
from nso_hf.config import METHODS, NSOConfig, config_for_method
from nso_hf.trainer import NSOMixin, NSOTrainer


class GatheredLossTrainer(Trainer):
    """`Trainer` whose loss is CLIP's contrastive loss over the embeddings of all ranks."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "return_loss"}  # the loss is computed here
        outputs = model(**inputs)
        # The temperature parameter itself (not a copy), so it gets its gradient; peft forwards the attribute.
        logit_scale = self.accelerator.unwrap_model(model).logit_scale
        loss = gathered_contrastive_loss(outputs.image_embeds, outputs.text_embeds, logit_scale)
        return (loss, outputs) if return_outputs else loss


class GatheredLossNSOTrainer(NSOMixin, GatheredLossTrainer):
    """The NSO step on the gathered contrastive loss."""


def trainer_class(method: str, gather_features: bool) -> type[Trainer]:
    """Args: method: one of `METHODS`; gather_features: use the all-rank loss. Returns: the class to build."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if method == "none":
        return GatheredLossTrainer if gather_features else Trainer
    return GatheredLossNSOTrainer if gather_features else NSOTrainer


def nso_kwargs(method: str, nso_config: NSOConfig) -> dict[str, Any]:
    """The extra keyword the chosen class takes: `nso_config` with its `method` set."""
    config = config_for_method(method, nso_config)
    return {} if config is None else {"nso_config": config}
