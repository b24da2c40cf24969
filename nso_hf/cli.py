"""Command-line parsing shared by the scripts: `HfArgumentParser` plus `--config file.yaml`."""

from __future__ import annotations

import argparse
from typing import Any

import yaml
from transformers import HfArgumentParser

CONFIG_HELP = "A YAML file of option names and values; options given on the command line override it."


def add_config_argument(parser: HfArgumentParser) -> None:
    """List `--config` in `--help` (once). `parse_with_config` reads the file itself, before parsing."""
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument("--config", metavar="FILE.yaml", default=None, help=CONFIG_HELP)


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
    add_config_argument(parser)
    # Keys of the YAML file: every option but the two that are not run settings.
    known = {action.dest for action in parser._actions} - {"config", "help"}
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
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Unknown options in {path}: {unknown}. Keys are argument names.")
        argv = argv[:at] + argv[at + 2 :]
    values = {**(defaults or {}), **overrides}
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:  # e.g. output_dir: required on the command line only when nothing gives it
            action.required = False
    explicit = set(overrides) | {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    parsed = parser.parse_args_into_dataclasses(args=argv)
    if parsed and isinstance(parsed[-1], argparse.Namespace):  # the --config entry, already applied
        parsed = parsed[:-1]
    return tuple(parsed), explicit
