"""`scripts/finetune_cot.py` runs a user can trust: seeded, resumable, never silently wrong, failing fast.

Runs are in-process where possible (a launch costs ~10 s of imports); the 2-process resume goes
through the real launcher, `torchrun` with gloo.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
sys.path.insert(0, SCRIPTS)


def cot_argv(model_dir, output_dir, *extra):
    argv = [
        "--output_dir", str(output_dir), "--method", "nso", "--sigma", "0.05", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--synthetic_num_train", "16",
        "--synthetic_num_eval", "4", "--max_new_tokens", "8", "--save_strategy", "no", "--report_to", "none",
        "--logging_steps", "1", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    return (["--model_name_or_path", str(model_dir)] if model_dir else []) + argv


def run(argv):
    from nso_hf.cot.finetune import run_cot_finetune

    from finetune_cot import parse_arguments

    return run_cot_finetune(*parse_arguments(argv))


def adapters(output_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(str(output_dir), "adapter_model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to build, pretrain or load a model fails the test: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options and data were checked")

    import nso_hf.cot.models as models

    monkeypatch.setattr(models, "load_causal_lm", refuse)
    monkeypatch.setattr(models, "resolve_model_source", refuse)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def gsm8k_file(path, split, n, seed=0):
    from data_recipes import get_recipe

    path.parent.mkdir(parents=True, exist_ok=True)
    get_recipe("synthetic", seed=seed, num_train=n, num_test=n).write_gsm8k_jsonl(str(path), split)
    return str(path)


# 1. Reproducibility -------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_adapters_and_metrics(tiny_model_dir, tmp_path):
    torch.manual_seed(1)  # whatever the global RNG holds before a run must not matter
    first = run(cot_argv(tiny_model_dir, tmp_path / "a"))
    torch.manual_seed(2)
    second = run(cot_argv(tiny_model_dir, tmp_path / "b"))
    assert_same_tensors(adapters(tmp_path / "a"), adapters(tmp_path / "b"))
    assert first["eval"] == second["eval"]
    assert first["train"]["train_loss"] == second["train"]["train_loss"]


def test_cached_base_model_gives_the_numbers_of_the_first_run(tmp_path):
    # The demo's path: the first run pretrains the tiny default (drawing from the RNG), the next loads it.
    cache = tmp_path / "cache"
    extra = ("--base_model_cache_dir", str(cache), "--tiny_pretrain_steps", "2", "--max_steps", "2")
    built = run(cot_argv(None, tmp_path / "first", *extra))
    assert len(os.listdir(cache)) == 1
    cached = run(cot_argv(None, tmp_path / "second", *extra))
    assert_same_tensors(adapters(tmp_path / "first"), adapters(tmp_path / "second"))
    assert built["eval"] == cached["eval"]


# 2. Resume ----------------------------------------------------------------------------------------


def _tree_digest(folder):
    digest = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            digest[name] = hashlib.sha256(handle.read()).hexdigest()
    return digest


@pytest.fixture
def count_steps(monkeypatch):
    """The optimizer steps each run really takes (a resumed run must not start again at step 1)."""
    from transformers import TrainerCallback

    import nso_hf.cot.finetune as finetune

    steps: list[int] = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    make = finetune.make_trainer

    def counting(*args, **kwargs):
        trainer = make(*args, **kwargs)
        trainer.add_callback(Count())
        return trainer

    monkeypatch.setattr(finetune, "make_trainer", counting)
    return steps


def test_resume_path_and_true_end_bit_identical_to_the_uninterrupted_run(tiny_model_dir, tmp_path, count_steps):
    # 16 examples at batch 4: steps 4-6 cross into the second epoch, so the data order must come back too.
    schedule = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3")
    full = run(cot_argv(tiny_model_dir, tmp_path / "full", *schedule))
    assert count_steps == [1, 2, 3, 4, 5, 6]
    checkpoint = tmp_path / "full" / "checkpoint-3"

    # --resume_from_checkpoint PATH, into a fresh output folder.
    del count_steps[:]
    before = _tree_digest(checkpoint)
    resumed = run(cot_argv(tiny_model_dir, tmp_path / "path", *schedule, "--resume_from_checkpoint", str(checkpoint)))
    assert count_steps == [4, 5, 6]
    assert_same_tensors(adapters(tmp_path / "full"), adapters(tmp_path / "path"))
    assert resumed["eval"] == full["eval"]
    assert _tree_digest(checkpoint) == before

    # --resume_from_checkpoint true: the newest complete checkpoint, skipping the folder a kill
    # during a save left empty and one cut short before its weights were written.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(checkpoint, interrupted / "checkpoint-3")
    (interrupted / "checkpoint-6").mkdir()
    shutil.copy(checkpoint / "trainer_state.json", interrupted / "checkpoint-5")  # a file, not a folder: skipped
    (interrupted / "checkpoint-4").mkdir()
    shutil.copy(checkpoint / "trainer_state.json", interrupted / "checkpoint-4")
    del count_steps[:]
    before = _tree_digest(interrupted / "checkpoint-3")
    resumed = run(cot_argv(tiny_model_dir, interrupted, *schedule, "--resume_from_checkpoint", "true"))
    assert count_steps == [4, 5, 6]
    assert resumed["train"]["resumed_from"] == str(interrupted / "checkpoint-3")
    assert (resumed["train"]["resumed_at_step"], resumed["train"]["global_step"]) == (3, 6)
    assert_same_tensors(adapters(tmp_path / "full"), adapters(interrupted))
    assert resumed["eval"] == full["eval"]
    assert _tree_digest(interrupted / "checkpoint-3") == before


def test_resume_checkpoint_errors(tmp_path):
    from nso_hf.cot.resume import newest_complete_checkpoint, resolve_resume_checkpoint

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    assert newest_complete_checkpoint(str(out)) is None
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint true: no complete checkpoint-N folder .* in --output_dir"):
        resolve_resume_checkpoint("true", str(out))
    with pytest.raises(ValueError, match=r"checkpoint-2' is not a complete checkpoint \(it needs trainer_state\.json"):
        resolve_resume_checkpoint(str(out / "checkpoint-2"), str(out))
    with pytest.raises(ValueError, match=r"is not a folder"):
        resolve_resume_checkpoint(str(out / "checkpoint-9"), str(out))
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"")
    assert resolve_resume_checkpoint("True", str(out)) == str(out / "checkpoint-2")
    assert resolve_resume_checkpoint("false", str(out)) is None
    with pytest.raises(ValueError, match=r"is inside the checkpoint .* it resumes from"):
        resolve_resume_checkpoint(str(out / "checkpoint-2"), str(out / "checkpoint-2"))


def _torchrun(model_dir, output_dir, *extra):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(SCRIPTS, "finetune_cot.py"), *cot_argv(model_dir, output_dir, *extra),
        "--use_cpu", "true", "--ddp_backend", "gloo", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.distributed
def test_torchrun_two_processes_resume_true_matches_uninterrupted(tiny_model_dir, tmp_path):
    full_log = _torchrun(tiny_model_dir, tmp_path / "full")
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full" / "checkpoint-3", interrupted / "checkpoint-3")
    (interrupted / "checkpoint-6").mkdir()  # killed while saving
    resumed_log = _torchrun(tiny_model_dir, interrupted, "--resume_from_checkpoint", "true")
    # Trainer prints one loss line per step on the main process: the resumed run took steps 4-6 only.
    assert (full_log.count("'loss'"), resumed_log.count("'loss'")) == (6, 3)
    assert_same_tensors(adapters(tmp_path / "full"), adapters(interrupted))
    full = json.load(open(tmp_path / "full" / "cot_results.json"))
    resumed = json.load(open(interrupted / "cot_results.json"))
    assert resumed["eval"] == full["eval"]


# 4, 5, 11, 12: what a normal run reports -----------------------------------------------------


def test_a_normal_run_warns_nothing(tiny_model_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cot_argv(tiny_model_dir, tmp_path / "out", "--max_steps", "1", "--disable_tqdm", "false"))
    noisy = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, (FutureWarning, UserWarning))]
    assert noisy == []


def test_two_eval_files_with_one_base_name_keep_their_own_results(tiny_model_dir, tmp_path, capfd):
    train = gsm8k_file(tmp_path / "train.jsonl", "train", 16)
    first = gsm8k_file(tmp_path / "a" / "test.jsonl", "test", 3, seed=1)
    second = gsm8k_file(tmp_path / "b" / "test.jsonl", "test", 5, seed=2)
    argv = cot_argv(tiny_model_dir, tmp_path / "out", "--recipe", "gsm8k", "--train_source", train,
                    "--eval_sources", first, second, "--disable_tqdm", "false")  # fmt: skip
    results = run(argv)
    assert set(results["eval"]) == {"a_test", "b_test"}
    assert results["data"]["eval_sources"] == {"a_test": first, "b_test": second}
    assert results["data"]["max_length"] == 256  # the model's max_position_embeddings, below the default 512
    for name, count in (("a_test", 3), ("b_test", 5)):
        metrics = json.load(open(tmp_path / "out" / f"metrics_{name}.json"))
        rows = [json.loads(line) for line in open(tmp_path / "out" / f"predictions_{name}.jsonl")]
        assert results["eval"][name] == metrics and len(rows) == metrics["num_examples"] == count
        assert metrics["exact_match"] == metrics["exact_match_strict"]
        assert metrics["num_correct"] == sum(r["correct"] for r in rows)
        assert metrics["num_correct_flexible"] == sum(r["correct_flexible"] for r in rows)
        assert metrics["exact_match_flexible"] == pytest.approx(metrics["num_correct_flexible"] / count)
        assert metrics["num_truncated"] == sum(r["truncated"] for r in rows)
    err = capfd.readouterr().err
    assert "eval a_test" in err and "exact_match=" in err  # the evaluation progress bar
    assert "/3 [" in err  # Trainer's progress bar over the 3 steps


class _ScriptedLM(torch.nn.Module):
    """A stand-in for a causal LM whose `generate` appends scripted tokens to each prompt."""

    def __init__(self, continuations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = [torch.tensor(c[:max_new_tokens]) for c in self.continuations[: len(input_ids)]]
        self.continuations = self.continuations[len(input_ids):]
        width = max(len(r) for r in rows)
        new = torch.stack([torch.cat([r, torch.full((width - len(r),), kwargs["pad_token_id"])]) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_strict_exact_match_is_the_headline_and_cut_off_generations_are_counted(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from data_recipes import get_recipe
    from nso_hf.cot.evaluation import evaluate_cot

    words = ["<pad>", "</s>", "13", "-122", "books", "####", "7", "+", "6", "=", "Question:", "Answer:", "q"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    ids = {w: i for i, w in enumerate(words)}
    rambling = [ids[w] for w in "13 -122 books 13 -122 books 13".split()]  # no EOS within 6 tokens, no marker
    answered = [ids[w] for w in "7 + 6 = 13 #### 13".split()] + [ids["</s>"]]
    wrong = [ids[w] for w in "#### 7".split()] + [ids["</s>"]]
    model = _ScriptedLM([rambling, answered, wrong])
    dataset = get_recipe("cot_json", answer_kind="number").load(
        write_jsonl(tmp_path / "eval.jsonl", [{"question": "q", "rationale": "", "answer": "13"}] * 3)
    )
    metrics = evaluate_cot(model, tokenizer, dataset, get_recipe("gsm8k"), "plain", "eval", str(tmp_path / "out"),
                           max_new_tokens=8, batch_size=3, progress=False)  # fmt: skip
    assert metrics["num_truncated"] == 1  # the rambling one hit max_new_tokens without EOS
    assert (metrics["num_correct"], metrics["num_correct_flexible"]) == (1, 2)
    assert metrics["exact_match"] == metrics["exact_match_strict"] == pytest.approx(1 / 3)
    assert metrics["exact_match_flexible"] == pytest.approx(2 / 3)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions_eval.jsonl")]
    assert [(r["prediction"], r["prediction_flexible"], r["truncated"]) for r in rows] == [
        ("", "13", True), ("13", "13", False), ("7", "7", False)
    ]


def test_eval_source_names_are_distinct():
    from nso_hf.cot.finetune import eval_source_names

    assert eval_source_names(["data/test.jsonl", "openai/gsm8k"]) == ["test", "gsm8k"]
    assert eval_source_names(["x/a/test.jsonl", "x/b/test.jsonl", "c.jsonl"]) == ["a_test", "b_test", "c"]
    assert eval_source_names(["gsm8k.jsonl", "openai/gsm8k"]) == ["gsm8k", "openai_gsm8k"]
    assert eval_source_names(["a b.jsonl", "a_b.jsonl"]) == ["a_b", "a_b_2"]
    with pytest.raises(ValueError, match=r"--eval_sources names '\./x/t\.jsonl' twice"):
        eval_source_names(["x/t.jsonl", "./x/t.jsonl"])


# 7, 8. Fail fast, before the model loads ---------------------------------------------------------


def _read_only_dir(tmp_path):
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o555)
    if os.access(path, os.W_OK):  # root ignores permission bits; sysfs refuses new files to everyone
        if not os.path.isdir("/sys"):
            pytest.skip("no read-only folder available")
        return "/sys"
    return str(path)


@pytest.mark.parametrize(
    "case",
    ["empty_train", "empty_eval", "wrong_kind", "missing_file", "bad_json", "output_is_file", "output_read_only",
     "max_length", "answer_kind", "resume_missing"],
)
def test_bad_input_fails_before_the_model_loads(tmp_path, no_model_load, case):
    good = gsm8k_file(tmp_path / "good.jsonl", "train", 8)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    yesno = write_jsonl(tmp_path / "yesno.jsonl", [{"question": f"q{i}?", "rationale": "r", "answer": "Yes"} for i in range(4)])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    data = ["--recipe", "gsm8k", "--train_source", good, "--eval_sources", good]
    out = tmp_path / "out"
    cases = {
        "empty_train": (["--recipe", "gsm8k", "--train_source", str(empty)], r"empty\.jsonl: no examples to use"),
        "empty_eval": (data[:4] + ["--eval_sources", str(empty)], r"empty\.jsonl: no examples to use"),
        "wrong_kind": (["--recipe", "gsm8k", "--train_source", yesno], r"yesno\.jsonl: row 1: .*--recipe strategyqa"),
        "missing_file": (["--recipe", "gsm8k", "--train_source", str(tmp_path / "nope.jsonl")], r"nope\.jsonl' does not exist"),
        "bad_json": (["--recipe", "gsm8k", "--train_source", str(bad_json)], r"bad\.jsonl: row 2: invalid JSON"),
        "output_is_file": (data, r"--output_dir .*a_file' is a file"),
        "output_read_only": (data, r"--output_dir .* is not writable"),
        "max_length": (data + ["--max_length", "512"], r"--max_length 512 exceeds the 256 positions of the tiny default"),
        "answer_kind": (data + ["--answer_kind", "yesno"], r"--answer_kind yesno does not apply to --recipe gsm8k"),
        "resume_missing": (data + ["--resume_from_checkpoint", "true"], r"no complete checkpoint-N folder"),
    }
    argv, message = cases[case]
    if case == "output_is_file":
        out = a_file
    if case == "output_read_only":
        out = os.path.join(_read_only_dir(tmp_path), "run")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(cot_argv(None, out, *argv))


# 9. Every script answers --help ------------------------------------------------------------------


@pytest.mark.parametrize(
    "script", ["finetune_cot.py", "pretrain_clip.py", "demo_smollm2.py", "compare_methods.py", "find_sigma.py"]
)
def test_scripts_answer_help_without_running(script, monkeypatch, capsys):
    import nso_hf.cot.demo as demo

    def refuse(*args, **kwargs):
        raise AssertionError("--help ran the demo")

    monkeypatch.setattr(demo, "run_cot_demo", refuse)
    monkeypatch.setattr(demo, "run_methods_once", refuse)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(SCRIPTS, script), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if script == "compare_methods.py":
        assert "--run_config" in out and "--quick" in out
    elif script != "demo_smollm2.py":
        assert "--config FILE.yaml" in out
    if script == "finetune_cot.py":
        assert "--recipe {gsm8k,strategyqa,commonsense_qa,aqua_rat,cot_json,jsonl,synthetic}" in out


def test_unknown_recipe_raises_from_the_api():
    from nso_hf.cot.arguments import CoTDataArguments

    with pytest.raises(ValueError, match=r"--recipe must be one of .*got 'gsm9k'"):
        CoTDataArguments(recipe="gsm9k")


# 11. The demo shows Trainer's progress bar -------------------------------------------------------


def test_demo_shows_trainer_progress():
    from nso_hf.cot.demo import demo_arguments

    training_args = demo_arguments("nso", os.path.join(SCRIPTS, "configs", "cot_demo_tiny.yaml"), "outputs/x", None)[2]
    assert training_args.disable_tqdm is False


@pytest.mark.distributed
def test_torchrun_every_rank_stops_on_bad_data_before_loading(tiny_model_dir, tmp_path):
    wrong = write_jsonl(tmp_path / "yesno.jsonl", [{"question": f"q{i}?", "rationale": "r", "answer": "No"} for i in range(4)])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(SCRIPTS, "finetune_cot.py"), *cot_argv(tiny_model_dir, tmp_path / "out"),
        "--recipe", "gsm8k", "--train_source", wrong, "--use_cpu", "true", "--ddp_backend", "gloo",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    # A rank stops with one line and no traceback of ours (torchrun then ends the other rank and
    # prints its own summary); neither hangs in a collective waiting for the other.
    errors = [line for line in done.stderr.splitlines() if "finetune_cot.py: error: " in line]
    assert errors and all("yesno.jsonl: row 1: field 'answer'" in e and "--recipe strategyqa" in e for e in errors)
    assert "data_recipes/" not in done.stderr and "nso_hf/" not in done.stderr, done.stderr[-3000:]
    assert "[cot] train:" not in done.stdout  # stopped before the tokenizer and model were loaded


def test_script_reports_bad_input_in_one_line(tmp_path, no_model_load, capsys):
    from finetune_cot import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(cot_argv(None, tmp_path / "out", "--recipe", "gsm8k", "--train_source", str(empty)))
    assert exit_info.value.code == f"finetune_cot.py: error: {empty}: no examples to use (it has no rows)."
    with pytest.raises(SystemExit) as exit_info:
        main(cot_argv(None, tmp_path / "out", "--recipe", "gsm8k", "--answer_kind", "yesno"))
    assert exit_info.value.code == 2  # argparse's usage error, like an unknown choice
    assert "error: --answer_kind yesno does not apply to --recipe gsm8k" in capsys.readouterr().err.splitlines()[-1]
