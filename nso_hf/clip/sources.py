"""Image-caption data from the Hub or from a local folder, split into train and held-out rows.

- Hub: `load_dataset(name, config)` with the image and caption columns named by the caller
  (captions may be strings or lists of strings, e.g. COCO-style).
- Local folder: `load_dataset("imagefolder", data_dir=...)`: images with a `metadata.jsonl` or
  `metadata.csv` beside them whose `file_name` column names the image and whose other columns
  hold the caption (and, optionally, a label). Images in class subfolders without metadata get a
  `label` column from the folder names.
The held-out split is the named eval split when there is one, else a seeded share of the train rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset


def split_train_eval(
    data: DatasetDict | Dataset,
    train_split: str,
    eval_split: str | None,
    eval_fraction: float,
    seed: int,
) -> tuple[Dataset, Dataset]:
    """Pick (train, eval) from loaded data.

    Args:
        data: a `DatasetDict` (or a single `Dataset`, treated as the train split).
        train_split: name of the train split.
        eval_split: name of the held-out split; None or absent -> hold out `eval_fraction` of train.
        eval_fraction: share held out when there is no eval split.
        seed: fixes that hold-out.

    Returns:
        (train, eval) datasets.
    """
    if isinstance(data, Dataset):
        data = DatasetDict({train_split: data})
    if train_split not in data:
        raise ValueError(f"No split {train_split!r}; the data has {list(data)}.")
    if eval_split is not None and eval_split in data:
        return data[train_split], data[eval_split]
    if eval_split is not None:
        raise ValueError(f"No split {eval_split!r}; the data has {list(data)}. Leave eval_split unset to hold out rows.")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}.")
    parts = data[train_split].train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def load_hub_splits(
    name: str,
    config_name: str | None,
    train_split: str,
    eval_split: str | None,
    eval_fraction: float,
    seed: int,
    columns: Sequence[str],
) -> tuple[Dataset, Dataset]:
    """Load a Hub dataset (or a local path `load_dataset` understands) and split it.

    Args:
        name, config_name: passed to `load_dataset`.
        train_split, eval_split, eval_fraction, seed: see `split_train_eval`.
        columns: columns that must be present (image, caption, and label when used).

    Returns:
        (train, eval).
    """
    data = load_dataset(name, config_name)
    train, held_out = split_train_eval(data, train_split, eval_split, eval_fraction, seed)
    check_columns(train, columns)
    return train, held_out


def load_image_folder_splits(
    folder: str, train_split: str, eval_split: str | None, eval_fraction: float, seed: int, columns: Sequence[str]
) -> tuple[Dataset, Dataset]:
    """Load images with a `metadata.jsonl`/`.csv` from `folder` (the `imagefolder` builder) and split them."""
    if not os.path.isdir(folder):
        raise ValueError(f"image_folder {folder!r} is not a directory.")
    data = load_dataset("imagefolder", data_dir=folder)
    train, held_out = split_train_eval(data, train_split, eval_split, eval_fraction, seed)
    check_columns(train, columns)
    return train, held_out


def check_columns(data: Dataset, columns: Sequence[str]) -> None:
    """Raise ValueError naming the missing columns and the ones present."""
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise ValueError(f"Columns {missing} not found; the data has {data.column_names}. Name them with the column arguments.")


def class_names_of(data: Dataset, label_column: str) -> list[str] | None:
    """Args: data, label_column. Returns: the names of a `ClassLabel` column, else None."""
    feature = data.features.get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None
