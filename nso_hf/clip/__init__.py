"""CLIP contrastive pretraining with the NSO step: presets, data, collator, evaluation, trainers.

`scripts/pretrain_clip.py` is the command-line entry (its parser and main are `nso_hf.clip.cli`);
everything it does is importable from here.
"""

from nso_hf.clip.arguments import (
    CLIPDataArguments,
    CLIPModelArguments,
    CLIPRunArguments,
)
from nso_hf.clip.augment import Augment
from nso_hf.clip.collator import CLIPCollator
from nso_hf.clip.evaluation import evaluate_clip
from nso_hf.clip.gather import (
    contrastive_loss,
    gather_with_local_grad,
    gathered_contrastive_loss,
    require_shared_noise,
)
from nso_hf.clip.logit_scale import LogitScaleClampCallback, clamp_logit_scale
from nso_hf.clip.metrics import class_embeddings, recall_at_k, zero_shot_accuracy
from nso_hf.clip.pipeline import CLIPTask, format_table, run_method, run_methods
from nso_hf.clip.presets import PRESETS, clip_config_from_preset
from nso_hf.clip.shift import rotate_image, rotated_split
from nso_hf.clip.tokenizer import build_word_tokenizer
from nso_hf.clip.trainers import METHODS, trainer_class

__all__ = [
    "METHODS",
    "PRESETS",
    "Augment",
    "CLIPCollator",
    "CLIPDataArguments",
    "CLIPModelArguments",
    "CLIPRunArguments",
    "CLIPTask",
    "LogitScaleClampCallback",
    "build_word_tokenizer",
    "clamp_logit_scale",
    "class_embeddings",
    "clip_config_from_preset",
    "contrastive_loss",
    "evaluate_clip",
    "format_table",
    "gather_with_local_grad",
    "gathered_contrastive_loss",
    "recall_at_k",
    "require_shared_noise",
    "rotate_image",
    "rotated_split",
    "run_method",
    "run_methods",
    "trainer_class",
    "zero_shot_accuracy",
]
