"""Light image augmentation in plain torch ops (no torchvision), applied to a processed batch.

A random resized crop (scale and aspect ratio, drawn per image) done as one batched affine
`grid_sample`, then brightness/contrast jitter. It works on the processor's normalised output: the
batch is mapped back to [0, 1] with the processor's mean/std, changed, clamped and renormalised.
No flips by default: a mirrored digit or letter is another symbol. Random numbers come from the
global torch generator, so Trainer's `seed` fixes them and a run repeats exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Parameters of the augmentation; `__call__` applies it to `pixel_values` (B, C, H, W)."""

    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    crop_scale: tuple[float, float] = (0.7, 1.0)  # share of the image area kept
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the kept box
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # factor drawn from [1 - c, 1 + c], around each image's mean
    hflip: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale!r}.")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio!r}.")
        for name in ("brightness", "contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_mean, dtype=pixel_values.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, dtype=pixel_values.dtype).view(1, -1, 1, 1)
        images = pixel_values * std + mean  # back to [0, 1]
        images = random_resized_crop(images, self.crop_scale, self.crop_ratio, hflip=self.hflip)
        images = color_jitter(images, self.brightness, self.contrast)
        return (images.clamp(0.0, 1.0) - mean) / std


def random_resized_crop(
    images: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], hflip: bool = False
) -> torch.Tensor:
    """Crop a random box from each image and resize it back to the full size (bilinear).

    Args:
        images: (B, C, H, W).
        scale: range of the box area as a share of the image.
        ratio: range of the box aspect ratio (width / height), drawn log-uniformly.
        hflip: also mirror each image with probability 1/2.

    Returns:
        (B, C, H, W). A box is clipped to the image when its drawn side exceeds it.
    """
    b = images.shape[0]
    area = torch.empty(b).uniform_(*scale)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    # Box sides as fractions of the image side (affine_grid works in [-1, 1] coordinates).
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    # Centre anywhere that keeps the box inside the image.
    cx = (torch.rand(b) * 2 - 1) * (1 - w)
    cy = (torch.rand(b) * 2 - 1) * (1 - h)
    sx = w
    if hflip:
        sx = torch.where(torch.rand(b) < 0.5, -w, w)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(images: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    """Scale brightness, then contrast around each image's mean, by factors drawn per image.

    Args:
        images: (B, C, H, W) in [0, 1].
        brightness: factor range half-width (0 leaves brightness alone).
        contrast: factor range half-width (0 leaves contrast alone).

    Returns:
        (B, C, H, W), not clamped.
    """
    b = images.shape[0]
    shape = (b, 1, 1, 1)
    fb = torch.empty(shape).uniform_(1 - brightness, 1 + brightness).to(images)
    fc = torch.empty(shape).uniform_(1 - contrast, 1 + contrast).to(images)
    images = images * fb
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * fc + mean
