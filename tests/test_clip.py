"""CLIP pretraining with the NSO step: data, tokenizer pooling, the step itself, evaluation, the script.

Everything is built in the test process from configs and scikit-learn's digits: nothing loads from the Hub.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import CLIPModel, Trainer, TrainingArguments

from nso_hf import NSOConfig, NSOTrainer
from nso_hf.clip.augment import Augment
from nso_hf.clip.collator import CLIPCollator
from nso_hf.clip.digits import (
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    digit_captions,
    load_digits_splits,
)
from nso_hf.clip.evaluation import evaluate_clip
from nso_hf.clip.gather import (
    contrastive_loss,
    gathered_contrastive_loss,
    require_shared_noise,
)
from nso_hf.clip.logit_scale import LogitScaleClampCallback, clamp_logit_scale
from nso_hf.clip.metrics import (
    caption_positives,
    class_embeddings,
    recall_at_k,
    zero_shot_accuracy,
)
from nso_hf.clip.preprocessing import image_processor_for_size, preprocess_images
from nso_hf.clip.presets import clip_config_from_preset
from nso_hf.clip.tokenizer import build_word_tokenizer
from nso_hf.clip.trainers import (
    GatheredLossNSOTrainer,
    GatheredLossTrainer,
    trainer_class,
)

from conftest import load_script, params_of, training_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "pretrain_clip.py")
SIDE = 16  # 2 x 2 patches of 8: the smallest image the tiny preset tiles
MAX_LEN = 12


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def digits():
    """(train, eval) digits preprocessed at 16 px, a tokenizer trained on their captions, the processor."""
    train, held_out = load_digits_splits(eval_fraction=0.2, seed=0)
    processor = image_processor_for_size(SIDE)
    tokenizer = build_word_tokenizer((c for caps in train["caption"] for c in caps), MAX_LEN)
    train_px = preprocess_images(train.select(range(128)), processor, "image")
    eval_px = preprocess_images(held_out.select(range(60)), processor, "image")
    return dict(raw_train=train, train=train_px, eval=eval_px, processor=processor, tokenizer=tokenizer)


def tiny_clip(tokenizer, seed: int = 0) -> CLIPModel:
    config = clip_config_from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        max_length=MAX_LEN,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        image_size=SIDE,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def collator_for(d, augment: bool = True) -> CLIPCollator:
    p = d["processor"]
    aug = Augment(tuple(p.image_mean), tuple(p.image_std)) if augment else None
    return CLIPCollator(d["tokenizer"], p, caption_column="caption", max_length=MAX_LEN, augment=aug)


def clip_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(per_device_train_batch_size=16, learning_rate=2e-3, max_steps=3, seed=7, remove_unused_columns=False)
    return training_args(tmp_path, **{**settings, **overrides})


# ------------------------------------------------------------------------ preprocessing and collator
def test_collator_gives_the_shapes_clipmodel_takes(digits):
    collator = collator_for(digits)
    rows = [digits["train"][i] for i in range(8)]
    batch = collator(rows)
    assert batch["pixel_values"].shape == (8, 3, SIDE, SIDE) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 8
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["input_ids"].shape[1] <= MAX_LEN
    out = tiny_clip(digits["tokenizer"])(**batch)
    assert out.logits_per_image.shape == (8, 8)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_raw_images_and_preprocessed_rows_give_the_same_pixels(digits):
    collator = collator_for(digits, augment=False)
    raw = [digits["raw_train"][i] for i in range(4)]
    done = [digits["train"][i] for i in range(4)]
    torch.testing.assert_close(collator.pixels(raw), collator.pixels(done))


def test_identity_augmentation_returns_the_input_and_default_one_changes_it(digits):
    p = digits["processor"]
    pixels = collator_for(digits, augment=False).pixels([digits["train"][i] for i in range(4)])
    identity = Augment(tuple(p.image_mean), tuple(p.image_std), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), brightness=0.0, contrast=0.0)
    torch.testing.assert_close(identity(pixels), pixels, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    changed = Augment(tuple(p.image_mean), tuple(p.image_std))(pixels)
    assert changed.shape == pixels.shape and not torch.allclose(changed, pixels, atol=1e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(crop_scale=(0.0, 1.0)), "crop_scale"), (dict(crop_ratio=(2.0, 1.0)), "crop_ratio"), (dict(brightness=1.5), "brightness")],
)
def test_augment_rejects_bad_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Augment((0.5,) * 3, (0.5,) * 3, **kwargs)


def test_a_list_of_captions_gives_one_of_them_and_eval_takes_the_first(digits):
    collator = collator_for(digits, augment=False)
    row = digits["train"][0]
    ids = collator([row] * 32)["input_ids"]
    decoded = {digits["tokenizer"].decode(r, skip_special_tokens=True) for r in ids.tolist()}
    assert decoded <= set(row["caption"]) and len(decoded) > 1
    first = replace(collator, random_caption=False)([row])["input_ids"][0]
    assert digits["tokenizer"].decode(first, skip_special_tokens=True) == row["caption"][0]


# ------------------------------------------------------------------------------ tokenizer and presets
def test_text_tower_pools_at_the_tokenizers_eos(digits):
    tok = digits["tokenizer"]
    model = tiny_clip(tok).eval()
    assert model.config.text_config.eos_token_id == tok.eos_token_id == model.text_model.eos_token_id
    enc = tok(["a handwritten digit seven", "the number 7 written by hand"], padding=True, return_tensors="pt")
    eos_pos = (enc["input_ids"] == tok.eos_token_id).int().argmax(dim=1)
    assert eos_pos.tolist() == [5, 7]  # <bos> + words, then <eos>; the shorter one is padded after it
    with torch.no_grad():
        out = model.text_model(**enc)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_pos])
    assert not torch.allclose(out.pooler_output, out.last_hidden_state[:, 0])


@pytest.mark.parametrize(
    "preset, eos, image_size, match",
    [("huge", 4, None, "Unknown CLIP preset"), ("tiny", 2, None, "legacy"), ("tiny", None, None, "no eos"), ("tiny", 4, 20, "multiple")],
)
def test_presets_refuse_what_would_break(preset, eos, image_size, match):
    with pytest.raises(ValueError, match=match):
        clip_config_from_preset(preset, 50, 16, 0, 3, eos, image_size=image_size)


# --------------------------------------------------------------------------------------- the NSO step
def test_nso_training_step_restores_weights_bit_exactly(digits, tmp_path):
    model = tiny_clip(digits["tokenizer"])
    trainer = NSOTrainer(
        model=model, args=clip_args(tmp_path), train_dataset=digits["train"], data_collator=collator_for(digits),
        nso_config=NSOConfig(sigma=0.05),
    )
    before = params_of(model)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test bypasses
    loss = trainer.training_step(model, batch)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    assert all(p.grad is not None for p in model.parameters())
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_nso_steps_change_weights_and_log_a_finite_loss(digits, tmp_path):
    model = tiny_clip(digits["tokenizer"])
    before = params_of(model)
    trainer = NSOTrainer(
        model=model, args=clip_args(tmp_path), train_dataset=digits["train"], data_collator=collator_for(digits),
        nso_config=NSOConfig(sigma=0.01), callbacks=[LogitScaleClampCallback()],
    )
    trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_sigma_zero_reproduces_trainer(digits, tmp_path):
    """Same seed, same data, same augmentation draws: the parameters after 3 steps match."""
    results = []
    for cls, extra in ((Trainer, {}), (NSOTrainer, {"nso_config": NSOConfig(sigma=0.0)})):
        model = tiny_clip(digits["tokenizer"])
        trainer = cls(
            model=model, args=clip_args(tmp_path / cls.__name__), train_dataset=digits["train"],
            data_collator=collator_for(digits), callbacks=[LogitScaleClampCallback()], **extra,
        )
        trainer.train()
        results.append(params_of(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_clamp_keeps_the_logit_scale_at_most_log_100(digits, tmp_path):
    model = tiny_clip(digits["tokenizer"])
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
    trainer = Trainer(
        model=model, args=clip_args(tmp_path, max_steps=1), train_dataset=digits["train"],
        data_collator=collator_for(digits), callbacks=[LogitScaleClampCallback(max_value=5.0)],
    )
    trainer.train()
    assert model.logit_scale.item() == 5.0
    with pytest.raises(ValueError, match="no 'logit_scale'"):
        clamp_logit_scale(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------- gathering across ranks
def test_gathered_loss_on_one_process_is_clips_loss(digits):
    model = tiny_clip(digits["tokenizer"])
    batch = collator_for(digits)([digits["train"][i] for i in range(8)])
    out = model(**batch)
    torch.testing.assert_close(gathered_contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale), out.loss)
    torch.testing.assert_close(contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale), out.loss)


@pytest.mark.parametrize(
    "method, gather, expected",
    [("none", False, Trainer), ("nso", False, NSOTrainer), ("rwp", True, GatheredLossNSOTrainer), ("none", True, GatheredLossTrainer)],
)
def test_trainer_class_per_method(method, gather, expected):
    assert trainer_class(method, gather) is expected


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="Unknown method 'sgd'"):
        trainer_class("sgd", False)
    assert trainer_class("sam", False) is NSOTrainer


def test_gathering_sets_shared_noise_or_refuses_an_explicit_false():
    cfg = require_shared_noise(NSOConfig(), explicitly_set=False)
    assert cfg.sync_noise_across_ranks is True
    with pytest.raises(ValueError, match="gather_features=True needs sync_noise_across_ranks=True"):
        require_shared_noise(NSOConfig(sync_noise_across_ranks=False), explicitly_set=True)
    assert require_shared_noise(NSOConfig(sync_noise_across_ranks=True), explicitly_set=True).sync_noise_across_ranks


# ---------------------------------------------------------------------------------------- evaluation
def test_recall_at_k_against_hand_ranking():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.1, 0.7]])
    pos = torch.tensor([[False, False, True], [True, False, False], [False, False, True]])
    # query 0 ranks (0, 2, 1): first positive at rank 2; query 1 (1, 0, 2): rank 2; query 2 (2, 1, 0): rank 1.
    assert recall_at_k(sim, pos, ks=(1, 2, 3, 10)) == {1: pytest.approx(1 / 3), 2: 1.0, 3: 1.0, 10: 1.0}
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(sim, torch.zeros(3, 3, dtype=torch.bool))


def test_caption_positives_merge_identical_strings():
    texts, pos = caption_positives([["a cat"], ["a dog", "a cat"], ["a bird"]])
    assert texts == ["a cat", "a dog", "a bird"]
    assert pos.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


def test_class_embeddings_average_normalised_prompts():
    prompts = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [0.0, -5.0]])  # class 0: two prompts, class 1: two
    expected = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(class_embeddings(prompts, 2), expected)


class HandBuiltCLIP(torch.nn.Module):
    """Known embeddings: an image is its first two pixel values, a text is the vector of its first word."""

    def __init__(self, word_vectors: dict[int, list[float]]):
        super().__init__()
        self.table = torch.nn.Embedding(max(word_vectors) + 1, 2)
        with torch.no_grad():
            self.table.weight.zero_()
            for i, v in word_vectors.items():
                self.table.weight[i] = torch.tensor(v)

    def get_image_features(self, pixel_values):
        return pixel_values[:, 0, 0, :2]

    def get_text_features(self, input_ids, attention_mask=None):
        return self.table(input_ids[:, 1])  # position 0 is <bos>


def test_zero_shot_accuracy_and_recall_of_a_hand_built_model():
    tok = build_word_tokenizer(["red", "blue", "green"], max_length=4)
    vec = {tok.convert_tokens_to_ids("red"): [1.0, 0.0], tok.convert_tokens_to_ids("blue"): [0.0, 1.0],
           tok.convert_tokens_to_ids("green"): [-1.0, 0.0]}
    images = [([0.9, 0.1], 0, "red"), ([0.2, 0.8], 0, "red"), ([-1.0, 0.1], 2, "green"), ([0.1, 1.0], 1, "blue")]
    rows = []
    for (x, y), label, caption in images:
        px = torch.zeros(3, 2, 2)
        px[0, 0, 0], px[0, 0, 1] = x, y
        rows.append({"pixel_values": px.numpy(), "label": label, "caption": caption})
    collator = CLIPCollator(tok, image_processor=None, caption_column="caption", max_length=4, random_caption=False)
    model = HandBuiltCLIP(vec)
    metrics = evaluate_clip(model, rows, collator, class_names=["red", "blue", "green"], templates=["{}"])
    # By hand: cosines pick red, blue, green, blue -> the second image (a red one) is wrong: 3/4.
    assert metrics["zero_shot_accuracy"] == pytest.approx(0.75)
    # Texts: red, green, blue. Image->text top-1 is the same as zero-shot: 3/4. Text->image: "red" ranks
    # image 0 (cos 0.994) first -> hit; "green" -> image 2 -> hit; "blue" -> image 3 (0.995 > 0.970) -> hit.
    assert metrics["i2t_recall@1"] == pytest.approx(0.75)
    assert metrics["t2i_recall@1"] == pytest.approx(1.0)
    assert metrics["num_texts"] == 3.0
    direct = zero_shot_accuracy(torch.tensor([i[0] for i in images]), torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0]]),
                                torch.tensor([i[1] for i in images]))
    assert direct == pytest.approx(0.75)


def test_digits_captions_and_split():
    assert digit_captions(7)[:2] == ["a handwritten digit seven", "the number 7 written by hand"]
    assert len(digit_captions(3)) == len(CAPTION_TEMPLATES)
    train, held_out = load_digits_splits(eval_fraction=0.2, seed=0)
    assert len(train) + len(held_out) == 1797
    assert set(held_out["label"]) == set(range(len(CLASS_NAMES)))


# --------------------------------------------------------------------------------------- the script
def _load_script():
    return SimpleNamespace(**load_script("pretrain_clip.py"))


def test_script_parsing_yaml_command_line_and_explicit_names(tmp_path):
    script = _load_script()
    cfg = tmp_path / "clip.yaml"
    cfg.write_text(yaml.safe_dump({"sigma": 0.02, "learning_rate": 1e-3, "method": "rwp"}))
    (m, d, r, t, n), explicit = script.parse(["--config", str(cfg), "--learning_rate", "5e-4", "--output_dir", str(tmp_path)])
    assert (n.sigma, t.learning_rate, r.methods, t.remove_unused_columns) == (0.02, 5e-4, ["rwp"], False)
    assert {"sigma", "learning_rate", "method", "output_dir"} <= explicit and "sync_noise_across_ranks" not in explicit
    cfg.write_text(yaml.safe_dump({"sigmaa": 0.02}))
    with pytest.raises(ValueError, match="Unknown options in .*clip.yaml: \\['sigmaa'\\]"):
        script.parse(["--config", str(cfg)])
    (m, d, r, t, n), explicit = script.parse(["--gather_features", "--sync_noise_across_ranks", "False", "--method", "nso"])
    with pytest.raises(ValueError, match="needs sync_noise_across_ranks=True"):
        script.main(m, d, r, t, n, explicit)
    (m, d, r, t, n), explicit = script.parse(["--method", "nso", "--two_point", "False"])
    with pytest.raises(ValueError, match="drop --two_point"):
        script.main(m, d, r, t, n, explicit)


@pytest.mark.distributed
def test_script_end_to_end_on_the_digits_writes_its_json(tmp_path):
    cfg = tmp_path / "clip.yaml"
    cfg.write_text(yaml.safe_dump({"max_steps": 3, "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 16}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, SCRIPT, "--config", str(cfg), "--max_train_samples", "256", "--image_size", "16",
         "--compare_methods", "none", "rwp"],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "clip_results.json").read_text())
    assert list(results) == ["none", "rwp"]
    for method, m in results.items():
        assert m["steps"] == 3 and m["method"] == method
        assert m["micro_batches"] == m["forward_backward_passes"] == 3  # one pass per micro-batch for both
        for key in ("zero_shot_accuracy", "i2t_recall@1", "i2t_recall@5"):  # per image (t2i: per caption class)
            hits = m[key] * m["num_images"]  # a share of the evaluated images: a whole number of them
            assert abs(hits - round(hits)) < 1e-4 and 0 <= round(hits) <= m["num_images"], (key, m[key])  # float32
        assert m["i2t_recall@5"] >= m["i2t_recall@1"] and m["t2i_recall@5"] >= m["t2i_recall@1"]
        assert math.isfinite(m["train_loss"]) and m["seconds_per_step"] > 0
        assert m["num_images"] == 359.0
        per_method = json.loads((tmp_path / "out" / method / "eval_results.json").read_text())
        assert per_method == m
    assert "| Trainer |" in done.stdout and "| NSOTrainer (RWP) |" in done.stdout


@pytest.mark.distributed
def test_gathered_loss_across_two_ranks_matches_one_process_on_the_whole_batch(tmp_path):
    """torchrun, 2 gloo ranks with 4 and 2 rows: same loss as one process; local gradients are its rows."""
    worker = os.path.join(REPO, "tests", "clip_gather_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, str(tmp_path)],
        check=False, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-12)
        torch.testing.assert_close(torch.tensor(r["grad_img"]), torch.tensor(r["ref_grad_img"]))
        torch.testing.assert_close(torch.tensor(r["grad_txt"]), torch.tensor(r["ref_grad_txt"]))
        assert r["grad_scale"] == pytest.approx(r["ref_grad_scale"], rel=1e-12)


def test_image_folder_with_metadata_builds_a_task(tmp_path):
    import numpy as np
    from PIL import Image

    from nso_hf.clip.arguments import CLIPDataArguments, CLIPModelArguments
    from nso_hf.clip.build import build_task

    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        lines.append(json.dumps({"file_name": f"im{i}.png", "text": f"a picture of an {'even' if i % 2 == 0 else 'odd'} thing", "label": i % 2}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    data = CLIPDataArguments(image_folder=str(folder), caption_column="text", label_column="label", class_names=["even", "odd"], eval_fraction=0.25)
    task, make_model = build_task(CLIPModelArguments(image_size=16), data)
    assert (len(task.train), len(task.evals["test"])) == (9, 3)
    batch = task.collator([task.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    model = make_model()
    assert model.config.text_config.eos_token_id == task.collator.tokenizer.eos_token_id
    metrics = evaluate_clip(model, task.evals["test"], replace(task.collator, augment=None), task.class_names, ["an {} thing"])
    hits = metrics["zero_shot_accuracy"] * 3  # a share of the 3 images: a whole number of them
    assert metrics["num_images"] == 3.0 and abs(hits - round(hits)) < 1e-5
    with pytest.raises(ValueError, match="not a ClassLabel"):
        build_task(CLIPModelArguments(image_size=16), replace(data, class_names=None))
    with pytest.raises(ValueError, match="Columns \\['caption'\\] not found"):
        build_task(CLIPModelArguments(image_size=16), replace(data, caption_column="caption"))


def test_rotation_moves_pixels_where_the_angle_says_and_fills_with_the_background():
    import numpy as np
    from PIL import Image

    from nso_hf.clip.shift import rotate_image

    pixels = np.full((8, 8), 255, dtype=np.uint8)
    pixels[0:2, 3:5] = 0  # a dark bar at the top centre, on white
    image = Image.fromarray(pixels, mode="L")
    same = np.asarray(rotate_image(image, 0.0).convert("L"), dtype=float)
    assert same.shape == (32, 32)  # upsampled 4x before rotating
    turned = np.asarray(rotate_image(image, 90.0).convert("L"), dtype=float)  # counter-clockwise: top -> left
    assert same[:8, 12:20].mean() < 100 and turned[:8, 12:20].mean() > 200
    assert turned[12:20, :8].mean() < 100 and turned.max() == 255  # the bar is on the left; the corners are white


def test_validation_and_rotated_splits_are_disjoint_from_test_and_from_training(tmp_path):
    import numpy as np

    from nso_hf.clip.arguments import CLIPDataArguments, CLIPModelArguments
    from nso_hf.clip.build import build_task

    data = CLIPDataArguments(validation_fraction=0.25, eval_sources=["test", "validation", "ood", "ood_validation"], ood_rotation=30.0)
    task, _ = build_task(CLIPModelArguments(image_size=16), data)
    assert list(task.evals) == ["test", "validation", "ood", "ood_validation"]
    test, validation = task.evals["test"], task.evals["validation"]
    assert (len(test), len(validation), len(task.train)) == (359, 360, 1078)  # 1,797 digits: 20% test, then 25% of the rest

    def keys(split):
        return {np.asarray(split[i]["pixel_values"]).tobytes() for i in range(len(split))}

    train_keys, test_keys, validation_keys = keys(task.train), keys(test), keys(validation)
    assert not train_keys & validation_keys and not validation_keys & test_keys and not train_keys & test_keys
    assert len(task.evals["ood"]) == len(test) and not keys(task.evals["ood"]) & test_keys  # same images, rotated
    assert task.evals["ood"]["label"] == test["label"] and task.evals["ood_validation"]["label"] == validation["label"]
    with pytest.raises(ValueError, match="needs a validation split"):
        CLIPDataArguments(eval_sources=["validation"])
    with pytest.raises(ValueError, match="eval_sources must name distinct splits"):
        CLIPDataArguments(eval_sources=["test", "heldout"])


@pytest.mark.distributed
@pytest.mark.slow
def test_script_under_torchrun_with_gathered_features_and_nso(tmp_path):
    """Two gloo ranks, NSO on the all-rank loss: the script sets shared noise, trains, writes its JSON."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
         "--method", "nso", "--gather_features", "--max_steps", "2", "--per_device_train_batch_size", "8",
         "--max_train_samples", "64", "--image_size", "16", "--use_cpu", "--ddp_backend", "gloo",
         "--output_dir", str(tmp_path)],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "setting sync_noise_across_ranks=True" in done.stderr
    results = json.loads((tmp_path / "clip_results.json").read_text())
    assert results["nso"]["steps"] == 2 and math.isfinite(results["nso"]["train_loss"])


def test_split_train_eval_uses_a_named_split_or_holds_out_a_share():
    from datasets import Dataset, DatasetDict

    from nso_hf.clip.sources import split_train_eval

    data = DatasetDict({"train": Dataset.from_dict({"x": list(range(10))}), "test": Dataset.from_dict({"x": [10, 11]})})
    train, held_out = split_train_eval(data, "train", "test", 0.2, seed=0)
    assert (list(train["x"]), list(held_out["x"])) == (list(range(10)), [10, 11])
    train, held_out = split_train_eval(data, "train", None, 0.2, seed=0)
    assert len(held_out) == 2 and sorted(list(train["x"]) + list(held_out["x"])) == list(range(10))
    with pytest.raises(ValueError, match="No split 'validation'"):
        split_train_eval(data, "train", "validation", 0.2, seed=0)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        split_train_eval(data, "train", None, 1.5, seed=0)


def test_a_saved_clip_folder_loads_as_a_pretrained_model(digits, tmp_path):
    """--model_name_or_path: model, tokenizer and image processor come from the folder."""
    from nso_hf.clip.arguments import CLIPDataArguments, CLIPModelArguments
    from nso_hf.clip.build import build_task

    saved = tiny_clip(digits["tokenizer"], seed=3)
    saved.save_pretrained(tmp_path)
    digits["tokenizer"].save_pretrained(tmp_path)
    digits["processor"].save_pretrained(tmp_path)
    task, make_model = build_task(
        CLIPModelArguments(model_name_or_path=str(tmp_path), max_caption_length=MAX_LEN),
        CLIPDataArguments(max_train_samples=32, max_eval_samples=16),
    )
    model = make_model()
    for name, p in saved.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, msg=name)
    batch = task.collator([task.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, SIDE, SIDE)
    assert task.collator.tokenizer.eos_token_id == digits["tokenizer"].eos_token_id
    assert torch.isfinite(model(**batch).loss)
