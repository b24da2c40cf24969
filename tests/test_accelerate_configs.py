"""The launch configs beside the scripts parse as `accelerate launch` parses them and build valid plugins."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from conftest import tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "scripts", "accelerate_configs")


def launch_env(name: str) -> tuple[object, dict[str, str]]:
    """The launcher's arguments and the environment it would give the training processes."""
    path = os.path.join(CONFIGS, f"{name}.yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "scripts/finetune_cot.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


@pytest.fixture
def gpu_for_plugins(monkeypatch):
    # FSDP1's sync_module_states asks accelerate for the current GPU while the plugin is built; nothing
    # runs on it here.
    import accelerate.utils.dataclasses as dataclasses

    monkeypatch.setattr(dataclasses, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_every_config_is_tested():
    names = sorted(f for f in os.listdir(CONFIGS) if f.endswith((".yaml", ".json")))
    assert names == sorted(
        ["multi_gpu.yaml", "fsdp1.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "zero2.json", "zero3.json"]
    )


def test_multi_gpu_is_ddp():
    args, env = launch_env("multi_gpu")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.parametrize("name, version", [("fsdp1", 1), ("fsdp2", 2)])
def test_fsdp_configs_build_their_plugin(monkeypatch, gpu_for_plugins, name, version):
    args, env = launch_env(name)
    assert args.use_fsdp
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's environment, as in training
    assert plugin.fsdp_version == version
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # the final save_model writes one loadable file
    if version == 1:
        assert plugin.use_orig_params  # LoRA freezes the base weights: FSDP1 needs the original parameters


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_configs_name_their_json_and_fill_from_trainer(monkeypatch, tmp_path, name, stage):
    pytest.importorskip("deepspeed")
    args, env = launch_env(name)
    assert args.use_deepspeed
    json_path = os.path.join(REPO, env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert json.load(open(json_path))["zero_optimization"]["stage"] == stage
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)  # the YAML names the JSON relative to the repository root, as launched
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    # Every "auto" is one TrainingArguments fills in.
    from transformers import TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path), deepspeed=json_path, bf16=False, use_cpu=False)
    filled = targs.hf_deepspeed_config
    filled.trainer_config_finalize(targs, model=tiny_llama(), num_training_steps=10)  # sizes from its config
    assert "auto" not in json.dumps(filled.config)
