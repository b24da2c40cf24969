"""Which checkpoint `--resume_from_checkpoint` means: a path, or `true` for the newest complete one.

`Trainer.train(resume_from_checkpoint=True)` takes the highest-numbered `checkpoint-N` folder in
output_dir even when a kill during its save left it empty or half written, and then fails to
load it. Here a checkpoint is complete, as `Trainer._load_from_checkpoint` needs it, when it has
`trainer_state.json` and the model or adapter weights; `true` skips incomplete ones.
"""

from __future__ import annotations

import os
import re

TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete_checkpoint(path: str) -> bool:
    """True when `path` has trainer_state.json and model or adapter weights (an FSDP folder counts)."""
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return False
    names = os.listdir(path)
    return any(name in WEIGHT_FILES for name in names) or any(name.startswith("pytorch_model_fsdp") for name in names)


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The complete `checkpoint-N` folder of `output_dir` with the highest N, or None."""
    if not os.path.isdir(output_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and is_complete_checkpoint(path):
            return path
    return None


def resolve_resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, or None to start afresh.

    Args:
        value: --resume_from_checkpoint: None / "false" (start afresh), "true" (the newest complete
            checkpoint in `output_dir`) or a checkpoint folder.
        output_dir: the run's output folder.

    Raises:
        ValueError: no complete checkpoint where one was asked for, or an output_dir inside the
            checkpoint (the run would write over the state it resumes from).
    """
    if value is None or str(value).strip().lower() in ("", "false"):
        return None
    if str(value).strip().lower() == "true":
        path = newest_complete_checkpoint(output_dir)
        if path is None:
            raise ValueError(
                f"--resume_from_checkpoint true: no complete checkpoint-N folder (with {TRAINER_STATE} and weights) "
                f"in --output_dir {output_dir!r}; pass a checkpoint folder instead."
            )
        return path
    path = str(value)
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {path!r} is not a folder: pass a checkpoint-N folder or 'true'.")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is not a complete checkpoint (it needs {TRAINER_STATE} and the model "
            "or adapter weights; a save cut short leaves it partial): pass an earlier checkpoint or 'true'."
        )
    checkpoint, out = os.path.realpath(path), os.path.realpath(output_dir)
    if out == checkpoint or out.startswith(checkpoint + os.sep):
        raise ValueError(
            f"--output_dir {output_dir!r} is inside the checkpoint {path!r} it resumes from: the run would overwrite "
            "it; use the run's own output folder."
        )
    return path
