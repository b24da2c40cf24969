"""The out-of-distribution copy of a held-out split: every image rotated, alternately by +angle and -angle.

Training never rotates (the augmentation crops and jitters brightness and contrast), so a rotated
split measures how a model carries over to a shift it was not trained for, with the same classes
and captions. Small images are first upsampled (bicubic) so the rotation does not merely shuffle a
few pixels; the corners the rotation uncovers take the colour of the image's top-left pixel (the
background, for scans and digits).
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

MIN_SIDE = 32  # smaller images are upsampled by a whole factor to at least this side before rotating


def rotate_image(image: Any, degrees: float) -> Image.Image:
    """Args: image: a PIL image; degrees: counter-clockwise angle. Returns: the rotated RGB image."""
    image = image.convert("RGB")
    factor = math.ceil(MIN_SIDE / min(image.size))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.BICUBIC)
    return image.rotate(degrees, resample=Image.BILINEAR, fillcolor=image.getpixel((0, 0)))


def rotated_split(dataset: Any, image_column: str, degrees: float) -> Any:
    """`dataset` (a `datasets.Dataset` of raw images) with row i's image rotated by +degrees (i even) or -degrees."""
    if image_column not in dataset.column_names:
        raise ValueError(f"Image column {image_column!r} not in the dataset columns {dataset.column_names}.")

    def rotate(row: dict, index: int) -> dict:
        return {image_column: rotate_image(row[image_column], degrees if index % 2 == 0 else -degrees)}

    return dataset.map(rotate, with_indices=True)
