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
        ({"method": "SAM"}, r"NSOConfig.method must be one of \('none', 'nso', 'rwp', 'sam', 'asam', 'flat_lora', "
         r"'nso_merged'\), got 'SAM'. Use 'nso'"),
        ({"method": "sam", "rho": -0.05}, r"NSOConfig.rho must be a finite float >= 0, got -0.05. Use SAM's 0.05"),
        ({"method": "sam", "rho": float("nan")}, r"NSOConfig.rho must be a finite float >= 0, got nan"),
        ({"method": "asam", "rho": float("inf")}, r"NSOConfig.rho must be a finite float >= 0, got inf"),
        ({"method": "flat_lora", "sigma": -1.0}, r"NSOConfig.sigma must be a finite float >= 0, got -1.0"),
        ({"noise_ramp": "linear"}, r"NSOConfig.noise_ramp must be one of \('none', 'cosine'\), got 'linear'"),
        ({"method": "sam", "two_point": False}, r"NSOConfig.two_point applies to the noise methods .* not method='sam'"),
        ({"method": "rwp", "two_point": True}, r"NSOConfig.two_point=True contradicts method='rwp'"),
        ({"perturb_start": 1.0}, r"NSOConfig.perturb_start must be a float in \[0, 1\), got 1.0. Use 0 to perturb from the first"),
        ({"perturb_start": -0.25}, r"NSOConfig.perturb_start must be a float in \[0, 1\), got -0.25"),
        ({"perturb_start": True}, r"NSOConfig.perturb_start must be a float in \[0, 1\), got True"),
        ({"perturb_start": "0.5"}, r"NSOConfig.perturb_start must be a float in \[0, 1\), got '0.5'"),
        ({"perturb_every": 0}, r"NSOConfig.perturb_every must be an int >= 1, got 0. Use 1 to perturb every step"),
        ({"perturb_every": 2.0}, r"NSOConfig.perturb_every must be an int >= 1, got 2.0"),
        ({"perturb_every": True}, r"NSOConfig.perturb_every must be an int >= 1, got True"),
    ],
)
def test_bad_values_name_field_value_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSOConfig(**kwargs)


def test_defaults_are_the_papers_setting():
    cfg = NSOConfig()
    assert (cfg.method, cfg.sigma, cfg.num_perturbations, cfg.is_two_point, cfg.unperturbed_weight) == ("nso", 0.01, 1, True, 0.0)
    assert not cfg.relative_noise and cfg.noise_seed is None and not cfg.sync_noise_across_ranks
    assert cfg.passes_per_micro_batch == 2 and cfg.noise_ramp == "none"
    assert cfg.to_dict()["two_point"] is True and cfg.to_dict()["noise_scale"] == "absolute"


@pytest.mark.parametrize(
    "method, two_point, relative, passes",
    [("none", False, False, 1), ("nso", True, False, 2), ("rwp", False, False, 1), ("sam", False, False, 2),
     ("asam", False, False, 2), ("flat_lora", False, True, 1), ("nso_merged", True, True, 2)],
)  # fmt: skip
def test_method_defaults(method, two_point, relative, passes):
    cfg = NSOConfig(method=method)
    assert (cfg.is_two_point, cfg.relative_noise, cfg.passes_per_micro_batch) == (two_point, relative, passes)
    # An explicit noise_scale wins over the method's default.
    assert not NSOConfig(method=method, noise_scale="absolute").relative_noise


def test_two_point_is_the_older_spelling_of_the_method():
    assert NSOConfig(two_point=False) == NSOConfig(method="rwp")
    assert NSOConfig(method="nso_merged", two_point=False) == NSOConfig(method="flat_lora")
    assert NSOConfig(two_point=True) == NSOConfig()
    # Normalised, so that replacing the method is safe.
    from dataclasses import replace

    assert replace(NSOConfig(two_point=False), method="nso").method == "nso"


def test_single_pattern_string_becomes_a_list():
    assert NSOConfig(perturb_exclude="norm").perturb_exclude == ["norm"]


def test_parsed_from_command_line_beside_training_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, NSOConfig))
    args, nso = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--seed", "3",
            "--method", "rwp", "--sigma", "0.02", "--num_perturbations", "2",
            "--unperturbed_weight", "0.25", "--noise_scale", "relative",
            "--perturb_exclude", "norm", "bias", "--noise_seed", "9", "--sync_noise_across_ranks", "true",
            "--nonfinite_loss", "skip",
        ]
    )  # fmt: skip
    assert args.seed == 3
    assert nso == NSOConfig(
        method="rwp", sigma=0.02, num_perturbations=2, unperturbed_weight=0.25, noise_scale="relative",
        perturb_exclude=["norm", "bias"], noise_seed=9, sync_noise_across_ranks=True, nonfinite_loss="skip",
    )  # fmt: skip


def test_method_and_rho_parsed_from_command_line(tmp_path):
    parser = HfArgumentParser((TrainingArguments, NSOConfig))
    _, cfg = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--method", "asam", "--rho", "0.5", "--noise_ramp", "cosine"]
    )
    assert (cfg.method, cfg.rho, cfg.noise_ramp) == ("asam", 0.5, "cosine")
    _, cfg = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--method", "flat_lora", "--sigma", "0.05"])
    assert cfg.relative_noise and cfg.noise_scale is None
    _, cfg = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--two_point", "false"])
    assert cfg.method == "rwp"
    _, cfg = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--perturb_start", "0.75", "--perturb_every", "2"]
    )
    assert (cfg.perturb_start, cfg.perturb_every, cfg.scheduled) == (0.75, 2, True)
    assert not NSOConfig().scheduled


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
