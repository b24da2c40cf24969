"""Evaluate a CLIP model on a held-out split: zero-shot accuracy and retrieval recall@1/@5, as JSON.

Zero-shot: each class name is put through prompt templates, the prompt embeddings are averaged per
class, and an image is assigned its most similar class. Retrieval: image->text and text->image
recall@k over the split's captions (see `metrics.caption_positives` for what counts as a hit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nso_hf.clip.collator import CLIPCollator
from nso_hf.clip.metrics import (
    caption_positives,
    class_embeddings,
    recall_at_k,
    zero_shot_accuracy,
)


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected feature; 4.x a tensor.
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def encode_texts(model: Any, collator: CLIPCollator, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Args: model: has `get_text_features`; texts: strings. Returns: (len(texts), D) L2-normalised embeddings."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = collator.tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=collator.max_length, return_tensors="pt"
        )
        feats = _features(
            model.get_text_features(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        )
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_images(model: Any, collator: CLIPCollator, rows: Sequence[dict], batch_size: int = 256) -> torch.Tensor:
    """Args: model: has `get_image_features`; rows: dataset rows. Returns: (len(rows), D) L2-normalised embeddings."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        pixels = collator.pixels(list(rows[i : i + batch_size]))  # never augmented
        feats = _features(model.get_image_features(pixel_values=pixels.to(device)))
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


def evaluate_clip(
    model: Any,
    dataset: Any,
    collator: CLIPCollator,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = ("a photo of a {}",),
    label_column: str | None = "label",
    ks: Sequence[int] = (1, 5),
    batch_size: int = 256,
) -> dict[str, float]:
    """Zero-shot accuracy (when class names and labels are given) and retrieval recall@k.

    Args:
        model: a `CLIPModel` (or anything with `get_image_features` / `get_text_features`).
        dataset: held-out rows (a `datasets.Dataset` or a list of dicts) with images and captions.
        collator: gives the tokenizer, caption column and image processing.
        class_names: names put into the templates; None skips zero-shot.
        templates: prompts with one "{}" for the class name.
        label_column: integer class of each row (indexes `class_names`).
        ks: recall cut-offs.
        batch_size: rows per forward.

    Returns:
        {"zero_shot_accuracy", "i2t_recall@k", "t2i_recall@k" for each k, "num_images", "num_texts"}.
    """
    was_training = model.training
    model.eval()
    try:
        rows = [dataset[i] for i in range(len(dataset))]
        image_embeds = encode_images(model, collator, rows, batch_size)
        captions = [_as_list(r[collator.caption_column]) for r in rows]
        texts, positives = caption_positives(captions)
        text_embeds = encode_texts(model, collator, texts, batch_size)
        sim = image_embeds @ text_embeds.T
        metrics: dict[str, float] = {"num_images": float(len(rows)), "num_texts": float(len(texts))}
        for k, v in recall_at_k(sim, positives, ks).items():
            metrics[f"i2t_recall@{k}"] = v
        for k, v in recall_at_k(sim.T, positives.T, ks).items():
            metrics[f"t2i_recall@{k}"] = v
        if class_names is not None:
            if label_column is None or label_column not in rows[0]:
                raise ValueError(f"Zero-shot evaluation needs a label column; rows have {sorted(rows[0])}.")
            for t in templates:
                if t.count("{}") != 1:
                    raise ValueError(f"A zero-shot template needs exactly one '{{}}' for the class name, got {t!r}.")
            prompts = [t.format(name) for name in class_names for t in templates]
            classes = class_embeddings(encode_texts(model, collator, prompts, batch_size), len(class_names))
            labels = torch.tensor([int(r[label_column]) for r in rows])
            metrics["zero_shot_accuracy"] = zero_shot_accuracy(image_embeds, classes, labels)
        return metrics
    finally:
        model.train(was_training)


def write_json(metrics: dict[str, Any], path: str) -> None:
    """Write `metrics` as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
        f.write("\n")


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]
