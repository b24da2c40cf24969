"""NSOConfig: validation messages, and parsing beside TrainingArguments."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from nso_hf import NSOConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": -0.1}, r"NSOConfig.sigma must be a finite float >= 0, got -0.1"),
        ({"sigma": float("nan")}, r"NSOConfig.sigma must be a finite float >= 0, got nan"),
        ({"sigma": float("inf")}, r"NSOConfig.sigma must be a finite float >= 0, got inf"),
        ({"sigma": "0.01"}, r"NSOConfig.sigma must be a finite float >= 0, got '0.01'"),
        ({"num_perturbations": 0}, r"NSOConfig.num_perturbations must be an int >= 1, got 0"),
        ({"num_perturbations": 1.5}, r"NSOConfig.num_perturbations must be an int >= 1, got 1.5"),
        ({"two_point": "yes"}, r"NSOConfig.two_point must be True or False, got 'yes'"),
        ({"unperturbed_weight": 1.5}, r"NSOConfig.unperturbed_weight must be a float in \[0, 1\], got 1.5"),
        ({"unperturbed_weight": -0.5}, r"NSOConfig.unperturbed_weight must be a float in \[0, 1\], got -0.5"),
        ({"noise_scale": "Relative"}, r"NSOConfig.noise_scale must be one of \('absolute', 'relative'\), got 'Relative'"),
        ({"nonfinite_loss": "ignore"}, r"NSOConfig.nonfinite_loss must be one of \('raise', 'skip'\), got 'ignore'"),
        ({"perturb_exclude": [1]}, r"NSOConfig.perturb_exclude must be a list of regular expressions, got \[1\]"),
        ({"noise_seed": "7"}, r"NSOConfig.noise_seed must be an int or None, got '7'"),
    ],
)
def test_bad_values_name_field_value_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSOConfig(**kwargs)


def test_defaults_are_the_papers_setting():
    cfg = NSOConfig()
    assert (cfg.sigma, cfg.num_perturbations, cfg.two_point, cfg.unperturbed_weight) == (0.01, 1, True, 0.0)
    assert cfg.noise_scale == "absolute" and cfg.noise_seed is None and not cfg.sync_noise_across_ranks
    assert cfg.passes_per_micro_batch == 2


def test_single_pattern_string_becomes_a_list():
    assert NSOConfig(perturb_exclude="norm").perturb_exclude == ["norm"]


def test_parsed_from_command_line_beside_training_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, NSOConfig))
    args, nso = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--seed", "3",
            "--sigma", "0.02", "--num_perturbations", "2", "--two_point", "false",
            "--unperturbed_weight", "0.25", "--noise_scale", "relative",
            "--perturb_exclude", "norm", "bias", "--noise_seed", "9", "--sync_noise_across_ranks", "true",
            "--nonfinite_loss", "skip",
        ]
    )  # fmt: skip
    assert args.seed == 3
    assert nso == NSOConfig(
        sigma=0.02, num_perturbations=2, two_point=False, unperturbed_weight=0.25, noise_scale="relative",
        perturb_exclude=["norm", "bias"], noise_seed=9, sync_noise_across_ranks=True, nonfinite_loss="skip",
    )  # fmt: skip


def test_command_line_rejects_unknown_choice(tmp_path, capsys):
    parser = HfArgumentParser((TrainingArguments, NSOConfig))
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--noise_scale", "relativ"])
    assert "invalid choice: 'relativ'" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_parsed_from_a_file(tmp_path, fmt):
    values = {"output_dir": str(tmp_path), "sigma": 0.005, "num_perturbations": 3, "perturb_include": ["lora_"]}
    path = tmp_path / f"cfg.{fmt}"
    parser = HfArgumentParser((TrainingArguments, NSOConfig))
    if fmt == "yaml":
        import yaml

        path.write_text(yaml.safe_dump(values))
        _, nso = parser.parse_yaml_file(str(path))
    else:
        path.write_text(json.dumps(values))
        _, nso = parser.parse_json_file(str(path))
    assert (nso.sigma, nso.num_perturbations, nso.perturb_include) == (0.005, 3, ["lora_"])


def test_file_values_are_validated(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "sigma": -1}))
    with pytest.raises(ValueError, match="NSOConfig.sigma must be a finite float >= 0, got -1"):
        HfArgumentParser((TrainingArguments, NSOConfig)).parse_json_file(str(path))
