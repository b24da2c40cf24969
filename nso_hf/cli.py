"""Command-line parsing shared by the scripts: `HfArgumentParser` plus `--config file.yaml`.

A YAML file is a mapping of option names to values, exactly the options the command line takes.
Its values are turned into command-line tokens placed before the user's own, so the parser types,
validates and requires them as it does typed options, and a later token (the command line) wins.
A script's own defaults are a YAML file beside it, read by the same code (`base_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import yaml
from transformers import HfArgumentParser

CONFIG_HELP = "A YAML file of option names and values; options given on the command line override it."


def add_config_argument(parser: HfArgumentParser) -> None:
    """List `--config` in `--help` (once). `parse_with_config` reads the file itself, before parsing."""
    try:
        parser.add_argument("--config", metavar="FILE.yaml", default=None, help=CONFIG_HELP)
    except argparse.ArgumentError:  # already added
        pass


def option_names(parser: HfArgumentParser) -> set[str]:
    """The options a config file may set: the init fields of the parser's dataclasses."""
    return {f.name for cls in parser.dataclass_types for f in dataclasses.fields(cls) if f.init}


def read_config(path: str, known: set[str]) -> dict[str, Any]:
    """A YAML config file as a mapping of known option names to values.

    Raises:
        ValueError: not a mapping, unknown keys, or a null value (leave the key out for the default).
    """
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values.")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown options in {path}: {unknown}. Keys are argument names.")
    empty = sorted(k for k, v in values.items() if v is None)
    if empty:
        raise ValueError(f"{path}: {empty} have no value; leave such keys out to keep the default.")
    return values


def as_tokens(values: dict[str, Any]) -> list[str]:
    """Command-line tokens for `values`: lists as several words, mappings as JSON, booleans as true/false."""
    tokens: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            words = ["true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            words = [str(v) for v in value]
        elif isinstance(value, dict):
            words = [json.dumps(value)]
        else:
            words = [str(value)]
        tokens += [f"--{key}", *words]
    return tokens


def parse_with_config(
    parser: HfArgumentParser, argv: list[str], base_config: str | None = None
) -> tuple[tuple, set[str]]:
    """Parse `[--config file.yaml] [--name value ...]`.

    Precedence: dataclass defaults < `base_config` (a script's own YAML) < the user's YAML < the command line.

    Args:
        parser: the script's parser.
        argv: the arguments, without the program name.
        base_config: the script's own defaults, a YAML file in the user's format.

    Returns:
        (the parsed dataclasses, the option names the user gave in their YAML or on the command line).

    Raises:
        ValueError: `--config` without a path, a file that is not a mapping, unknown keys or null values in it.
    """
    add_config_argument(parser)
    known = option_names(parser)
    base = read_config(base_config, known) if base_config else {}
    user: dict[str, Any] = {}
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path.")
        user = read_config(argv[at + 1], known)
        argv = argv[:at] + argv[at + 2 :]
    explicit = set(user) | {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    parsed = parser.parse_args_into_dataclasses(args=as_tokens({**base, **user}) + argv)
    if parsed and isinstance(parsed[-1], argparse.Namespace):  # the --config entry, already applied
        parsed = parsed[:-1]
    return tuple(parsed), explicit


def no_pinning_on_cpu(training_args: Any) -> None:
    """Switch off `dataloader_pin_memory` when training on CPU (both scripts call it after parsing).

    Pinning needs an accelerator: on CPU torch warns at every dataloader Trainer builds (training and
    each evaluation during training) and pins nothing.
    """
    if training_args.dataloader_pin_memory and training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False
