"""Zero-shot accuracy and retrieval recall@k from embeddings: pure functions, no model.

Retrieval positives are given as a boolean matrix so that one definition covers single-caption
sets, multi-caption sets (COCO: any of an image's captions counts) and template captions, where
many images share the very same caption string (every such image is a correct answer for it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def class_embeddings(prompt_embeds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Average each class's prompt embeddings (prompt ensembling, as in the CLIP paper).

    Args:
        prompt_embeds: (num_classes * T, D), class-major: rows c*T .. c*T+T-1 are class c's T prompts.
        num_classes: C.

    Returns:
        (C, D): the mean of each class's L2-normalised prompt embeddings, L2-normalised again.
    """
    if prompt_embeds.shape[0] % num_classes:
        raise ValueError(f"{prompt_embeds.shape[0]} prompt embeddings do not split into {num_classes} classes.")
    per_class = F.normalize(prompt_embeds, dim=-1).view(num_classes, -1, prompt_embeds.shape[-1])
    return F.normalize(per_class.mean(dim=1), dim=-1)


def zero_shot_accuracy(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose most similar class (cosine) is their label.

    Args:
        image_embeds: (N, D).
        class_embeds: (C, D), e.g. from `class_embeddings`.
        labels: (N,) class indices.

    Returns:
        Accuracy in [0, 1]. A tie goes to the lower class index (argmax).
    """
    logits = F.normalize(image_embeds, dim=-1) @ F.normalize(class_embeds, dim=-1).T
    return (logits.argmax(dim=-1) == labels.to(logits.device)).float().mean().item()


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Share of queries with at least one positive among their k most similar gallery items.

    Args:
        similarity: (Q, G) scores, higher is closer.
        positives: (Q, G) bool; every query needs at least one positive.
        ks: cut-offs; a k above G counts the whole gallery.

    Returns:
        {k: recall in [0, 1]}.
    """
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} differ in shape.")
    if not positives.any(dim=1).all():
        raise ValueError("Every query needs at least one positive in the gallery.")
    order = similarity.argsort(dim=1, descending=True, stable=True)
    hits = positives.gather(1, order)  # hits[q, r]: is the r-th ranked item a positive?
    out = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"recall@k needs k >= 1, got {k}.")
        out[k] = hits[:, : min(k, hits.shape[1])].any(dim=1).float().mean().item()
    return out


def caption_positives(captions_per_image: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """The text gallery (unique caption strings) and which images each string describes.

    Args:
        captions_per_image: for each image, its captions.

    Returns:
        (texts, positives) with texts in first-seen order and positives (N_images, N_texts) bool:
        True where the text is one of that image's captions. Identical strings are merged (their
        embeddings are identical too, so keeping them would only repeat gallery items).
    """
    index: dict[str, int] = {}
    for caps in captions_per_image:
        for c in caps:
            index.setdefault(c, len(index))
    positives = torch.zeros(len(captions_per_image), len(index), dtype=torch.bool)
    for i, caps in enumerate(captions_per_image):
        for c in caps:
            positives[i, index[c]] = True
    return list(index), positives
