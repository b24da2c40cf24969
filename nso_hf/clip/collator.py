"""The collator: image-caption rows in, the keyword arguments of `CLIPModel.forward` out.

Rows hold either preprocessed `pixel_values` (see `preprocessing.preprocess_images`) or a raw image
under `image_column`, and a caption under `caption_column`: a string, or a list of strings of which
training draws one at random per visit (more text per image) and evaluation takes the first. The
batch carries `return_loss=True`, so a plain `transformers.Trainer` trains on CLIP's symmetric
contrastive loss; Trainer must keep the raw columns (`remove_unused_columns=False`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from nso_hf.clip.augment import Augment


@dataclass
class CLIPCollator:
    """Tokenise captions, stack or process images, optionally augment.

    Attributes:
        tokenizer: pads to the longest caption and truncates at `max_length` (eos kept).
        image_processor: used for rows without `pixel_values`.
        image_column: key of the raw image in a row.
        caption_column: key of the caption (str or list[str]).
        max_length: longest tokenized caption.
        augment: applied to the whole batch when set (training only).
        random_caption: draw one caption per row from a list (False: the first one).
    """

    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    image_column: str = "image"
    caption_column: str = "caption"
    max_length: int = 32
    augment: Augment | None = None
    random_caption: bool = True

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [self._caption(row) for row in rows]
        text = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pixel_values = self.pixels(rows)
        if self.augment is not None:
            pixel_values = self.augment(pixel_values)
        return {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "pixel_values": pixel_values,
            "return_loss": True,
        }

    def pixels(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        """Args: rows: dataset rows. Returns: (B, 3, H, W) float32 pixel values, processed if need be."""
        if "pixel_values" in rows[0]:
            return torch.stack([torch.as_tensor(np.asarray(r["pixel_values"]), dtype=torch.float32) for r in rows])
        if self.image_column not in rows[0]:
            raise KeyError(
                f"Rows have neither 'pixel_values' nor the image column {self.image_column!r}; "
                f"their keys are {sorted(rows[0])}. Set image_column, and remove_unused_columns=False."
            )
        images = [r[self.image_column] for r in rows]
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()

    def _caption(self, row: dict[str, Any]) -> str:
        if self.caption_column not in row:
            raise KeyError(
                f"Caption column {self.caption_column!r} not in the row keys {sorted(row)}; "
                "set caption_column, and remove_unused_columns=False."
            )
        value = row[self.caption_column]
        if isinstance(value, str):
            return value
        options = list(value)
        if not options:
            raise ValueError("A row has an empty caption list.")
        if not self.random_caption:
            return str(options[0])
        # The global generator, like the augmentation: Trainer's seed fixes the draw.
        return str(options[int(torch.randint(len(options), ()).item())])
