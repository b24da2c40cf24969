"""CLIP model presets built from a config (no download), or any pretrained CLIP by id or path.

The presets size the text tower to the tokenizer: `vocab_size`, the maximal caption length and
the special-token ids come from it. The eos id matters most: `CLIPTextModel` pools the hidden
state at the first position holding `eos_token_id`; with a wrong id `argmax` of an all-False mask
is 0 and every caption is pooled at position 0 (the bos token), silently. An eos id of 2 selects a
legacy path that pools at the largest token id instead, so it is refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPConfig, CLIPModel

PRESETS = ("tiny", "small", "base")


@dataclass(frozen=True)
class TowerSize:
    """Width and depth of one transformer tower."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


# tiny: CPU runs and tests (0.16M parameters with a 50-word vocabulary; about 20 ms a Trainer step
#   at batch 64 on 2 cores).
# small: a single-GPU experiment (8.1M parameters with 50 words, 15.8M with a 30k vocabulary).
# base: the shapes of ViT-B/32 CLIP (151M parameters with a 49,408-token vocabulary).
_PRESET_SHAPES: dict[str, dict] = {
    "tiny": dict(
        text=TowerSize(64, 128, 2, 2), vision=TowerSize(64, 128, 2, 2), projection_dim=64, image_size=32, patch_size=8
    ),
    "small": dict(
        text=TowerSize(256, 1024, 4, 4), vision=TowerSize(256, 1024, 6, 4), projection_dim=256, image_size=64, patch_size=8
    ),
    "base": dict(
        text=TowerSize(512, 2048, 12, 8), vision=TowerSize(768, 3072, 12, 12), projection_dim=512, image_size=224, patch_size=32
    ),
}


def preset_image_size(preset: str) -> int:
    """Args: preset: one of PRESETS. Returns: the preset's square image side in pixels."""
    _check_preset(preset)
    return _PRESET_SHAPES[preset]["image_size"]


def clip_config_from_preset(
    preset: str,
    vocab_size: int,
    max_length: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    image_size: int | None = None,
) -> CLIPConfig:
    """A `CLIPConfig` of the named size whose text tower matches a tokenizer.

    Args:
        preset: "tiny", "small" or "base".
        vocab_size: the tokenizer's vocabulary size.
        max_length: longest tokenized caption (bos and eos included): the text position table size.
        pad_token_id, bos_token_id, eos_token_id: the tokenizer's special ids.
        image_size: override of the preset's image side (must be a multiple of its patch size).

    Returns:
        The config; `CLIPModel(config)` builds a randomly initialised model.

    Raises:
        ValueError: unknown preset, eos id 2 (legacy pooling), or an image size the patches do not tile.
    """
    _check_preset(preset)
    check_eos_id(eos_token_id)
    shape = _PRESET_SHAPES[preset]
    side = image_size if image_size is not None else shape["image_size"]
    if side % shape["patch_size"]:
        raise ValueError(
            f"image_size={side} is not a multiple of the {preset} preset's patch size {shape['patch_size']}."
        )
    text = dict(
        vars(shape["text"]),
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    vision = dict(vars(shape["vision"]), image_size=side, patch_size=shape["patch_size"])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=shape["projection_dim"])


def check_eos_id(eos_token_id: int | None) -> None:
    """Refuse eos ids the text pooling would misread.

    Raises:
        ValueError: None (pooling would read position 0) or 2 (transformers then pools at argmax of the ids).
    """
    if eos_token_id is None:
        raise ValueError("The tokenizer has no eos token: CLIP's text tower pools at the eos position. Add one.")
    if eos_token_id == 2:
        raise ValueError(
            "eos_token_id=2 makes transformers' CLIPTextModel pool at the largest token id (a legacy path), "
            "not at the eos token. Give the eos token another id."
        )


def build_clip_model(config: CLIPConfig, seed: int) -> CLIPModel:
    """A randomly initialised `CLIPModel`, the same for the same seed (Trainer's `model_init` seeding aside)."""
    import torch

    torch.manual_seed(seed)
    return CLIPModel(config)


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"Unknown CLIP preset {preset!r}; choose one of {PRESETS} or pass a pretrained model id.")
