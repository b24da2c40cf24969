"""Contrastive loss over the features of every data-parallel rank (more negatives per step).

Each rank gathers the image and text embeddings of all ranks and computes CLIP's symmetric loss
on the global (N x N) similarity matrix. The gathered copies carry no gradient; the rank's own
block is put back as the live tensor, so the gradient flows through the local part only (no
backward communication; open_clip's default `gather_with_grad=False`). Every rank then holds the
same loss L; rank r back-propagates dL/d(its features), and DDP's average of these gives the
encoders (1/world_size) * dL/dtheta and the logit scale dL/ds. Adam-type optimizers normalise
each parameter's gradient, so the factor matters little there (it does move where gradient
clipping bites).

Why NSO noise must then be the same on every rank: the global loss mixes all ranks' features. With
per-rank noise, rank r's loss would combine its features at W + U_r with the others' at W + U_s:
the loss of no single perturbed model, and the +U/-U pairing that cancels the first-order term
would pair different draws. With one shared draw every rank evaluates the global loss at the same
W + U, and the summed gradient is that loss's gradient.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:  # only torch at import time: the multi-process test loads this file alone
    from nso_hf.config import NSOConfig

logger = logging.getLogger(__name__)


def gather_with_local_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate `features` (B_r, D) of all ranks in rank order; only the local block keeps its gradient.

    Args:
        features: this rank's (B_r, D) tensor; ranks may hold different B_r (uneven last batches).

    Returns:
        (sum_r B_r, D). Without an initialised process group (or with one process): `features` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([features.shape[0]], device=features.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_int = [int(s.item()) for s in sizes]
    longest = max(sizes_int)
    padded = features.detach().new_zeros((longest, *features.shape[1:]))
    padded[: features.shape[0]] = features.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    blocks = [p[:n] for p, n in zip(parts, sizes_int)]
    blocks[rank] = features  # the live tensor: gradient reaches this rank's encoders
    return torch.cat(blocks)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss; pair i is (image i, text i).

    Args:
        image_embeds: (N, D), L2-normalised.
        text_embeds: (N, D), L2-normalised.
        logit_scale: scalar log-temperature (the loss uses exp of it).

    Returns:
        (CE(text->image) + CE(image->text)) / 2, the same value as `CLIPModel(..., return_loss=True).loss`.
    """
    logits_per_text = logit_scale.exp() * text_embeds @ image_embeds.T
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.T, labels)) / 2


def gathered_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """`contrastive_loss` over the embeddings of all ranks (see `gather_with_local_grad`)."""
    return contrastive_loss(gather_with_local_grad(image_embeds), gather_with_local_grad(text_embeds), logit_scale)


def require_shared_noise(nso_config: NSOConfig, explicitly_set: bool) -> NSOConfig:
    """Gathered features need one noise draw on every rank: set `sync_noise_across_ranks`, or refuse.

    Args:
        nso_config: the run's NSO settings (changed in place and returned).
        explicitly_set: whether the user gave `sync_noise_across_ranks` themselves.

    Returns:
        `nso_config` with `sync_noise_across_ranks=True`.

    Raises:
        ValueError: the user explicitly asked for per-rank noise.
    """
    if nso_config.sync_noise_across_ranks:
        return nso_config
    if explicitly_set:
        raise ValueError(
            "gather_features=True needs sync_noise_across_ranks=True: the gathered loss mixes every rank's "
            "features, so with per-rank noise it is the loss of no single perturbed model and the +U/-U "
            "pairing breaks. Drop --sync_noise_across_ranks False, or set gather_features False."
        )
    logger.warning(
        "gather_features=True: setting sync_noise_across_ranks=True. The contrastive loss uses the features "
        "of all ranks, so all ranks must evaluate it at the same perturbed weights W +/- U."
    )
    nso_config.sync_noise_across_ranks = True
    return nso_config
