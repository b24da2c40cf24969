"""Reading raw rows from a local file (.jsonl / .json / .parquet) or a Hugging Face Hub id.

Rows come back with the 1-based row number a person would look up in the file (the line number
for JSON Lines), so a bad row can be named exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_local_source(source: str) -> bool:
    """A path that exists, or that names a file by one of the supported suffixes."""
    return os.path.exists(source) or str(source).endswith(LOCAL_SUFFIXES)


def iter_local_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row number, row) from a .jsonl, .json (a list of objects, or JSON Lines) or .parquet file.

    Args:
        path: the file.

    Returns:
        An iterator of (1-based row number, dict). For .jsonl the row number is the line number.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # a dependency of `datasets`

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, row
        return
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON document: read it as JSON Lines below
        if data is not None:
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"data": [...]} style wrapper
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}.")
            for number, row in enumerate(data, start=1):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}.")
                yield number, row
            return
    elif not path.endswith(".jsonl"):
        raise ValueError(f"Unsupported data file {path!r}: use one of {LOCAL_SUFFIXES}.")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: row {number}: invalid JSON ({error.msg}).") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}.")
            yield number, row


def iter_hub_rows(hub_id: str, config: str | None, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row number, row) of a Hub dataset split through `datasets.load_dataset` (needs network or cache)."""
    import datasets

    dataset = datasets.load_dataset(hub_id, config, split=split)
    yield from enumerate(dataset, start=1)


def iter_rows(source: str, hub_config: str | None, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a local file, or of a Hub dataset when `source` is not a local path."""
    if is_local_source(source):
        return iter_local_rows(source)
    return iter_hub_rows(source, hub_config, split)
