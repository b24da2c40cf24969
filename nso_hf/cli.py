"""Command-line parsing shared by the scripts: `HfArgumentParser` plus `--config file.yaml`."""

from __future__ import annotations

from typing import Any

import yaml
from transformers import HfArgumentParser


def parse_with_config(
    parser: HfArgumentParser, argv: list[str], defaults: dict[str, Any] | None = None
) -> tuple[tuple, set[str]]:
    """Parse `[--config file.yaml] [--name value ...]`.

    Precedence: dataclass defaults < `defaults` (a script's own) < the YAML file < the command line.

    Args:
        parser: the script's parser.
        argv: the arguments, without the program name.
        defaults: the script's defaults for fields of other dataclasses (e.g. TrainingArguments).

    Returns:
        (the parsed dataclasses, the option names the user gave in the YAML or on the command line).

    Raises:
        ValueError: `--config` without a path, a file that is not a mapping, or unknown keys in it.
    """
    overrides: dict[str, Any] = {}
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path.")
        path = argv[at + 1]
        with open(path, encoding="utf-8") as handle:
            overrides = yaml.safe_load(handle) or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{path}: expected a mapping of option names to values.")
        unknown = sorted(set(overrides) - {action.dest for action in parser._actions})
        if unknown:
            raise ValueError(f"Unknown options in {path}: {unknown}. Keys are argument names.")
        argv = argv[:at] + argv[at + 2 :]
    values = {**(defaults or {}), **overrides}
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:  # e.g. output_dir: required on the command line only when nothing gives it
            action.required = False
    explicit = set(overrides) | {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return parser.parse_args_into_dataclasses(args=argv), explicit
