"""Checks that run before the model loads, so a bad option costs seconds, not a whole run.

Every rank runs them (they are cheap: a config file, a probe file, the data already being read),
so no rank starts loading a model while another has already stopped. Each raises a one-line
`ValueError` that names the option or file and the fix; `nso_hf.cot.finetune.checked_inputs`
turns them into `InputError`.
"""

from __future__ import annotations

import os
import tempfile


class InputError(ValueError):
    """Bad options or data, found before training: the message is the whole story (file, row or
    option, and the fix), so `scripts/finetune_cot.py` prints it as one line without a traceback."""


# The default --max_length when the model allows more: long enough for GSM8K-style rationales,
# short enough that one odd example does not set the memory of a whole batch.
DEFAULT_MAX_LENGTH = 512


def check_output_dir(path: str) -> None:
    """Fail now if `path` is a file or cannot be written.

    Trainer first writes to output_dir at the first save, minutes or hours in. This creates the
    folder (Trainer would create it anyway) and writes and removes one probe file; permission
    bits alone would not do, as root ignores them.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output_dir {path!r} is a file, not a folder: name a folder for checkpoints and results.")
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write_check_", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"--output_dir {path!r} is not writable ({error.strerror}): checkpoints, adapters and results "
            "go there; name a folder you can write to."
        ) from error


def model_position_limit(model_name_or_path: str, gguf_file: str | None = None) -> int | None:
    """`max_position_embeddings` from the model's config alone (no weights are read); None if it has none."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(model_name_or_path, **kwargs)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def resolve_max_length(requested: int | None, limit: int | None, model: str) -> int:
    """The training sequence length: `requested`, checked against the model's position limit.

    Args:
        requested: --max_length, or None for min(DEFAULT_MAX_LENGTH, limit).
        limit: the model's max_position_embeddings (None: unknown, not checked).
        model: the model's name, for the message.

    Returns:
        The length to tokenize to.

    Raises:
        ValueError: `requested` exceeds `limit`. Positions past the limit are not an error in
            every architecture, but past the trained range a rotary model reads positions it
            never saw and a learned-position model fails: the run would be silently worse.
    """
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if requested < 1:
        raise ValueError(f"--max_length must be >= 1, got {requested}.")
    if limit is not None and requested > limit:
        raise ValueError(
            f"--max_length {requested} exceeds the {limit} positions of {model} (max_position_embeddings in its "
            f"config): pass --max_length {limit} or less."
        )
    return requested
