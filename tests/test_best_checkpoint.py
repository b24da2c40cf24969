"""Evaluation during training and the best checkpoint, in both scripts, with Trainer's own options.

The known answer: a run whose validation accuracy peaks at an earlier checkpoint ends holding exactly that
checkpoint's weights. The scripted accuracies come from the real evaluation with its number replaced, so
everything else (which rows are scored, when, by which process) is the scripts' own.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, load_script

sys.path.insert(0, os.path.join(REPO, "scripts"))

SCRIPTED = [0.25, 0.75, 0.5, 0.5]  # validation accuracy at steps 1-4: the best is step 2
SELECT = ["--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
          "--load_best_model_at_end", "true"]


def weights_file(folder) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            return load_file(os.path.join(folder, name))
    raise AssertionError(f"no weights in {folder}")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- CoT
def cot_argv(model_dir, output_dir, method, *extra):
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--method", method, "--sigma", "0.05",
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--synthetic_num_train", "16",
        "--synthetic_num_eval", "4", "--max_new_tokens", "8", "--report_to", "none", "--logging_steps", "1",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def run_cot(argv):
    from nso_hf.cot.finetune import run_cot_finetune

    from finetune_cot import parse_arguments

    return run_cot_finetune(*parse_arguments(argv))


@pytest.fixture
def scripted_cot(monkeypatch):
    """The validation source scores SCRIPTED in turn; every evaluation call is recorded (name, questions)."""
    import nso_hf.cot.evaluation as evaluation

    real, values, calls = evaluation.evaluate_cot, iter(SCRIPTED), []

    def evaluate_cot(model, tokenizer, dataset, recipe, template, name, *args, **kwargs):
        calls.append((name, list(dataset["question"])))
        metrics = real(model, tokenizer, dataset, recipe, template, name, *args, **kwargs)
        if name == "validation":
            value = next(values)
            metrics = {**metrics, "exact_match": value, "exact_match_strict": value}
        return metrics

    monkeypatch.setattr(evaluation, "evaluate_cot", evaluate_cot)
    return calls


@pytest.mark.parametrize("method, full", [("none", False), ("nso", True)])
def test_cot_ends_on_the_checkpoint_its_validation_accuracy_chose(tiny_model_dir, tmp_path, scripted_cot, method, full, one_thread):
    from data_recipes import get_recipe

    out = tmp_path / "best"
    extra = [*SELECT, "--metric_for_best_model", "exact_match", "--validation_source", "validation",
             "--validation_samples", "3", "--full_finetune", str(full).lower()]
    results = run_cot(cot_argv(tiny_model_dir, out, method, *extra))
    selection = results["selection"]
    assert [(p["step"], p["exact_match"]) for p in selection["curve"]] == list(zip([1, 2, 3, 4], SCRIPTED))
    assert (selection["best_step"], selection["final_weights_step"], results["train"]["final_weights_step"]) == (2, 2, 2)
    assert selection["metric"] == "exact_match" and selection["validation_examples"] == 3
    # The final weights (saved at the end) are checkpoint-2's, bit for bit, and not the last step's.
    final = weights_file(out)
    assert_same(final, weights_file(out / "checkpoint-2"))
    assert any(not torch.equal(final[k], v) for k, v in weights_file(out / "checkpoint-4").items())
    # Only the first 3 validation rows were scored during training; the test sources only after it.
    validation = get_recipe("synthetic").load("validation")["question"][:3]
    assert scripted_cot[:4] == [("validation", validation)] * 4
    assert [name for name, _ in scripted_cot[4:]] == ["test", "ood"]
    train = results["train"]
    assert train["eval_seconds"] > 0 and train["checkpoint_seconds"] > 0 and selection["evaluations"] == 4
    assert train["train_seconds"] == pytest.approx(train["train_wall_seconds"] - train["eval_seconds"] - train["checkpoint_seconds"])
    assert json.loads((out / "cot_results.json").read_text())["selection"] == selection
    if method == "nso":  # evaluating and saving change nothing in training: the last step equals a plain run's
        plain = run_cot(cot_argv(tiny_model_dir, tmp_path / "plain", method, "--full_finetune", "true"))
        assert plain["selection"] is None and plain["train"]["final_weights_step"] == 4
        assert_same(weights_file(tmp_path / "plain"), weights_file(out / "checkpoint-4"))


def test_cot_label_noise_is_recorded(tiny_model_dir, tmp_path, one_thread):
    results = run_cot(cot_argv(tiny_model_dir, tmp_path / "noisy", "none", "--max_steps", "1", "--label_noise", "0.25",
                               "--save_final_model", "false"))
    assert results["data"]["label_noise"] == {"p": 0.25, "seed": 0, "rows": 16, "rows_changed": 4, "rationales_changed": 4}


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to build a trainer fails the test: the refusal must come before training."""
    import nso_hf.cot.finetune as finetune

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the options were refused")

    monkeypatch.setattr(finetune, "make_trainer", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval_strategy", "steps"], r"--eval_strategy steps scores a validation source during training, but none was given"),
        ([*SELECT, "--metric_for_best_model", "exact_match"],
         r"--load_best_model_at_end scores a validation source during training, but none was given: pass --validation_source"),
        # Trainer's own check: without an evaluation strategy, the save strategy must be 'no' or 'best'.
        (["--load_best_model_at_end", "true"], r"--load_best_model_at_end requires the save and eval strategy to match"),
        (["--load_best_model_at_end", "true", "--save_strategy", "no", "--validation_source", "validation"],
         r"--load_best_model_at_end has no evaluations to choose from with --eval_strategy no: pass --eval_strategy steps"),
        ([*SELECT, "--validation_source", "validation"],
         r"--metric_for_best_model loss \(Trainer's default .*\) is not a metric this run produces.*--metric_for_best_model exact_match"),
        ([*SELECT, "--validation_source", "validation", "--metric_for_best_model", "eval_accuracy"], r"eval_accuracy is not a metric"),
        ([*SELECT, "--validation_source", "test", "--metric_for_best_model", "exact_match"],
         r"--validation_source test is also one of --eval_sources: a test source must never choose"),
    ],
)
def test_cot_refuses_selection_it_cannot_do_before_the_model_loads(tmp_path, monkeypatch, no_training, extra, message):
    import nso_hf.cot.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_causal_lm", refuse)
    monkeypatch.setattr(models, "resolve_model_source", refuse)
    with pytest.raises(ValueError, match=message):
        run_cot(cot_argv(tmp_path / "no_model", tmp_path / "out", "nso", *extra)[2:])  # the tiny default: never built


def test_cot_refuses_bad_label_noise_and_a_model_robustness_cannot_quantize(tmp_path, no_training, one_thread):
    from nso_hf.cot.tiny_base_model import TinyBaseSpec, build_model, build_tokenizer, pretraining_texts

    with pytest.raises(ValueError, match=r"--label_noise must be a fraction of the training rows in \[0, 1\), got 1.0"):
        run_cot(cot_argv(tmp_path, tmp_path / "out", "nso", "--label_noise", "1.0"))
    # Hidden 24, MLP 40: no Linear input size is a multiple of 32.
    spec = TinyBaseSpec(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, corpus_size=50)
    tokenizer = build_tokenizer(pretraining_texts(spec), vocab_size=300)
    build_model(spec, tokenizer, seed=0).save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"--robustness: none of the model's \d+ Linear weights has an input size divisible"):
        run_cot(cot_argv(tmp_path / "odd", tmp_path / "out", "nso", "--robustness", "true"))


# --------------------------------------------------------------------------------------------- CLIP
def clip_argv(output_dir, method, *extra):
    return [
        "--method", method, "--output_dir", str(output_dir), "--max_steps", "4", "--max_train_samples", "64",
        "--max_eval_samples", "16", "--image_size", "16", "--per_device_train_batch_size", "16", "--logging_steps", "1",
        "--validation_fraction", "0.2", "--validation_samples", "8", *extra,
    ]  # fmt: skip


def run_clip(argv):
    script = load_script("pretrain_clip.py")
    (model_args, data_args, run_args, training_args, nso_config), explicit = script["parse"](argv)
    (results,) = script["main"](model_args, data_args, run_args, training_args, nso_config, explicit).values()
    return results


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. pin_memory on CPU, at every evaluation dataloader
@pytest.mark.parametrize("method", ["none", "nso"])
def test_clip_ends_on_the_checkpoint_its_validation_accuracy_chose(tmp_path, monkeypatch, method, one_thread):
    import nso_hf.clip.pipeline as pipeline

    real, values, sizes = pipeline.evaluate_clip, iter(SCRIPTED), []

    def evaluate_clip(model, dataset, *args, **kwargs):
        sizes.append(len(dataset))
        metrics = real(model, dataset, *args, **kwargs)
        return {**metrics, "zero_shot_accuracy": next(values)} if len(dataset) == 8 else metrics  # 8: the validation rows

    monkeypatch.setattr(pipeline, "evaluate_clip", evaluate_clip)
    out = tmp_path / method
    results = run_clip(clip_argv(out, method, *SELECT, "--metric_for_best_model", "zero_shot_accuracy",
                                 "--validation_source", "validation", "--save_final_model", "true", "--robustness", "true"))
    selection = results["selection"]
    assert [(p["step"], p["zero_shot_accuracy"]) for p in selection["curve"]] == list(zip([1, 2, 3, 4], SCRIPTED))
    assert (selection["final_weights_step"], results["final_weights_step"]) == (2, 2)
    # Four validation scores during training, the test split after it: clean, then Q8_0, Q4_0 and one noise draw.
    assert sizes == [8, 8, 8, 8, 16, 16, 16, 16]
    row = results["robustness"]["sources"]["test"]
    assert row["clean"] == results["eval"]["test"]["zero_shot_accuracy"] and row["q8_0_drop"] == row["clean"] - row["q8_0"]
    # The model is saved after the robustness passes: still checkpoint-2's weights, bit for bit.
    final = weights_file(out)
    assert_same(final, weights_file(out / "checkpoint-2"))
    assert any(not torch.equal(final[k], v) for k, v in weights_file(out / "checkpoint-4").items())
    assert results["train_seconds"] < results["train_wall_seconds"]


def test_clip_logs_the_zero_shot_accuracy_of_the_weights_it_keeps(tmp_path, one_thread):
    from dataclasses import replace

    from transformers import CLIPModel

    from nso_hf.clip.arguments import CLIPDataArguments, CLIPModelArguments
    from nso_hf.clip.build import build_task
    from nso_hf.clip.evaluation import evaluate_clip

    out = tmp_path / "real"
    results = run_clip(clip_argv(out, "nso", *SELECT, "--metric_for_best_model", "zero_shot_accuracy", "--validation_source",
                                 "validation", "--save_final_model", "true", "--learning_rate", "0.01", "--label_noise", "0.25"))
    selection = results["selection"]
    scores = [p["zero_shot_accuracy"] for p in selection["curve"]]
    best = scores.index(max(scores))  # Trainer keeps the first of equal scores
    assert selection["final_weights_step"] == selection["curve"][best]["step"] and selection["best_metric"] == max(scores)
    assert results["label_noise"]["rows_changed"] == 16
    # The kept model, scored again on the same 8 validation images, gives the logged number exactly.
    task, _ = build_task(CLIPModelArguments(image_size=16), CLIPDataArguments(
        max_train_samples=64, max_eval_samples=16, validation_fraction=0.2, validation_samples=8, validation_source="validation"))
    model = CLIPModel.from_pretrained(out)
    metrics = evaluate_clip(model, task.validation, replace(task.collator, augment=None, random_caption=False),
                            task.class_names, task.templates, task.label_column, batch_size=32)
    assert metrics["zero_shot_accuracy"] == max(scores)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--label_noise", "1"], r"--label_noise must be a fraction"),
        (["--validation_fraction", "0", "--validation_source", "validation"], r"--validation_source validation needs validation rows"),
        (["--eval_strategy", "steps"], r"--eval_strategy steps scores a validation source during training, but none was given"),
        ([*SELECT, "--validation_source", "validation"], r"--metric_for_best_model loss .* pass --metric_for_best_model zero_shot_accuracy"),
    ],
)
def test_clip_refuses_selection_it_cannot_do_before_any_data_loads(tmp_path, monkeypatch, extra, message):
    import nso_hf.clip.build as build

    monkeypatch.setattr(build, "build_task", lambda *a, **k: pytest.fail("data loaded before the options were checked"))
    with pytest.raises(ValueError, match=message):
        run_clip(clip_argv(tmp_path / "out", "nso", *extra))


def test_clip_refuses_robustness_on_a_model_with_nothing_to_quantize_before_training(tmp_path, monkeypatch, one_thread):
    import nso_hf.clip.pipeline as pipeline
    import nso_hf.clip.presets as presets

    odd = presets.TowerSize(24, 40, 1, 2)  # no Linear input size is a multiple of 32
    monkeypatch.setitem(presets._PRESET_SHAPES, "tiny", dict(text=odd, vision=odd, projection_dim=24, image_size=16, patch_size=8))
    monkeypatch.setattr(pipeline, "trainer_class", lambda *a: pytest.fail("training started before --robustness was refused"))
    with pytest.raises(ValueError, match=r"--robustness: none of the model's \d+ Linear weights .*drop --robustness"):
        run_clip(clip_argv(tmp_path / "out", "nso", "--robustness", "true"))


def test_validation_curves_are_found_in_either_results_file_and_plotted(tmp_path):
    from plot_validation_curve import main

    from nso_hf.best_checkpoint import selection_sections

    curve = [{"step": s, "epoch": s / 4, "exact_match": a, "seconds": 0.1} for s, a in zip([1, 2, 3, 4], SCRIPTED)]
    selection = {"metric": "exact_match", "curve": curve, "final_weights_step": 2, "validation_source": "validation",
                 "validation_examples": 3}
    assert selection_sections({"method": "nso", "selection": selection}) == {"nso": selection}  # cot_results.json
    assert selection_sections({"method": "nso", "selection": None}) == {}
    clip = {"none": {"selection": selection}, "nso": {"selection": None}}  # clip_results.json: one entry per method
    assert selection_sections(clip) == {"none": selection}
    (tmp_path / "r.json").write_text(json.dumps({"method": "nso", "selection": selection}))
    main([str(tmp_path / "r.json"), str(tmp_path / "curve.png")])
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "plain.json").write_text(json.dumps({"method": "nso", "selection": None}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "plain.json"), str(tmp_path / "none.png")])


def test_several_results_files_plot_as_one_figure_named_by_label(tmp_path, monkeypatch):
    import plot_validation_curve

    curve = [{"step": s, "exact_match": a, "seconds": 0.1} for s, a in zip([1, 2, 3, 4], SCRIPTED)]
    selection = {"metric": "exact_match", "curve": curve, "final_weights_step": 2, "validation_source": "validation"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cot_results.json").write_text(json.dumps({"method": "none", "selection": selection}))
    files = [str(tmp_path / "a" / "cot_results.json"), str(tmp_path / "b" / "cot_results.json")]
    plotted = {}
    monkeypatch.setattr(plot_validation_curve, "plot_selection_curves", lambda sections, png: plotted.update(sections))
    plot_validation_curve.main([*files, str(tmp_path / "x.png")])
    assert plotted == {"a: none": selection, "b: none": selection}  # default label: the file's folder
    plotted.clear()
    plot_validation_curve.main([*files, str(tmp_path / "x.png"), "--labels", "n=300", "n=100"])
    assert list(plotted) == ["n=300: none", "n=100: none"]
    with pytest.raises(SystemExit):
        plot_validation_curve.main([*files, str(tmp_path / "x.png"), "--labels", "only one"])
