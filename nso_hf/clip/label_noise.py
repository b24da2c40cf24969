"""Label noise for CLIP: a seeded fraction of the training images gets the caption of another class.

The rows are `data_recipes.label_noise.noisy_rows` (round(p * n), seeded by the label-noise seed alone).
Each chosen image takes the caption (a string or a list of captions, as the row holds it) of a row of
another class: the class drawn uniformly among the other classes present, then a row of that class. The
label column keeps the true class (training never reads it); the evaluation splits are never touched.
"""

from __future__ import annotations

import random
from typing import Any

from data_recipes.label_noise import LabelNoiseReport, noisy_rows


def swap_captions(train: Any, p: float, seed: int, caption_column: str, label_column: str | None) -> tuple[Any, LabelNoiseReport]:
    """The training split with `noisy_rows` captioned as another class.

    Args:
        train: a `datasets.Dataset` with a caption column and an integer class column.
        p: fraction of rows to change, in [0, 1).
        seed: the label-noise seed.
        caption_column: the caption column.
        label_column: the class column (required when p > 0).

    Returns:
        (the split, unchanged when p = 0; the report).

    Raises:
        ValueError: p > 0 without a class column, or with fewer than two classes.
    """
    rows = noisy_rows(len(train), p, seed)
    report = LabelNoiseReport(p=p, seed=seed, rows=len(train), rows_changed=len(rows))
    if not rows:
        return train, report
    if label_column is None or label_column not in train.column_names:
        raise ValueError(
            f"--label_noise gives images the caption of another class, so it needs a class column: pass --label_column "
            f"(the data have {train.column_names}), or drop --label_noise."
        )
    labels = [int(v) for v in train[label_column]]
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    if len(by_class) < 2:
        raise ValueError(f"--label_noise needs at least two classes in --label_column {label_column!r}, found {sorted(by_class)}.")
    rng = random.Random(f"label-noise-captions-{seed}")
    captions = list(train[caption_column])
    donors = {}
    for i in rows:
        other = rng.choice([c for c in sorted(by_class) if c != labels[i]])
        donors[i] = rng.choice(by_class[other])
    new = {i: captions[j] for i, j in donors.items()}  # read before any write: a donor may itself be a noisy row

    def relabel(caption: Any, index: int) -> dict:
        return {caption_column: new.get(index, caption)}

    # input_columns: only the captions are read, so the images are not decoded and re-encoded.
    return train.map(relabel, with_indices=True, input_columns=[caption_column]), report
