"""The embedded default data: scikit-learn's handwritten digits as an image-caption set.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 grey-level scans (values 0..16) of the digits
0-9 with the library, so the default needs no network. Each image becomes an RGB PIL image
(upsampled later by the CLIP image processor) with several captions written from templates; the
collator draws one caption per image each time it is seen. The held-out split is stratified by
class and fixed by a seed.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from PIL import Image

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Training captions; {name} is the word, {digit} the numeral. Several phrasings so the text tower
# must learn that "seven" and "7" go with the same images.
CAPTION_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a photo of the digit {name}",
    "a small blurry scan of a {name}",
    "a scanned handwritten {digit}",
    "a picture of the number {name}",
    "the digit {digit} in grey ink",
)

# Zero-shot prompts over class names ("{}" is the class name), CLIP-style prompt ensembling.
ZERO_SHOT_TEMPLATES = ("a handwritten digit {}", "a photo of the digit {}", "a picture of the number {}")


def digit_captions(label: int) -> list[str]:
    """Args: label: the digit 0-9. Returns: its captions, one per template."""
    return [t.format(name=CLASS_NAMES[label], digit=label) for t in CAPTION_TEMPLATES]


def digits_image(pixels: np.ndarray) -> Image.Image:
    """Args: pixels: an 8x8 array with values 0..16 (ink is high). Returns: an 8x8 RGB image, black ink on white."""
    grey = (255 - np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0)).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def load_digits_splits(eval_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The digits as (train, eval) datasets with columns `image` (PIL), `caption` (list[str]), `label` (int).

    Args:
        eval_fraction: share of each class held out for evaluation.
        seed: fixes the split.

    Returns:
        Two `datasets.Dataset`; every class appears in both.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}.")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    train_idx, eval_idx = [], []
    for c in range(len(CLASS_NAMES)):
        idx = rng.permutation(np.flatnonzero(bunch.target == c))
        n_eval = max(1, round(eval_fraction * len(idx)))
        eval_idx.extend(idx[:n_eval].tolist())
        train_idx.extend(idx[n_eval:].tolist())

    def build(indices: list[int]) -> Dataset:
        indices = sorted(indices)
        return Dataset.from_dict(
            {
                "image": [digits_image(bunch.images[i]) for i in indices],
                "caption": [digit_captions(int(bunch.target[i])) for i in indices],
                "label": [int(bunch.target[i]) for i in indices],
            }
        )

    return build(train_idx), build(eval_idx)
