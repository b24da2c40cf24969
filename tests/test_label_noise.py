"""--label_noise: which rows change (seeded, p = 0 changes nothing), CoT's wrong answers with rewritten
rationales, CLIP's captions of another class; evaluation data untouched."""

from __future__ import annotations

import random

import pytest

from data_recipes import get_recipe
from data_recipes.answers import answer_mentions
from data_recipes.label_noise import add_label_noise, check_label_noise, noisy_rows, rewrite_last_mention, wrong_answer


def test_the_same_seed_picks_the_same_rows_and_p_zero_none():
    rows = noisy_rows(1000, 0.2, seed=3)
    assert rows == noisy_rows(1000, 0.2, seed=3) and len(rows) == 200 and rows == sorted(set(rows))
    assert rows != noisy_rows(1000, 0.2, seed=4)
    assert noisy_rows(1000, 0.0, seed=3) == [] and len(noisy_rows(10, 0.25, seed=0)) == 2  # round(2.5) = 2
    assert set(noisy_rows(1000, 0.1, seed=3)) != set(rows[:100])  # a sample of its own, not a prefix
    for bad in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match=r"--label_noise must be a fraction of the training rows in \[0, 1\)"):
            check_label_noise(bad)


def test_cot_rows_get_a_wrong_answer_and_the_rationale_ends_on_it():
    data = get_recipe("synthetic", num_train=40).load("train")
    noisy, report = add_label_noise(data, 0.25, seed=1, kind="number")
    changed = noisy_rows(40, 0.25, seed=1)
    assert (report.rows, report.rows_changed, report.rationales_changed) == (40, 10, 10)
    for i in range(40):
        old, new = data[i], noisy[i]
        assert new["question"] == old["question"]
        if i not in changed:
            assert new == old
            continue
        assert new["answer"] != old["answer"] and 1 <= abs(int(new["answer"]) - int(old["answer"])) <= 3
        assert int(new["answer"]) >= 0
        # "7 + 5 = 12\n12 - 3 = 9" -> "7 + 5 = 12\n12 - 3 = <new>": only the last result changes.
        head, _, last = old["rationale"].rpartition("= ")
        assert last == old["answer"] and new["rationale"] == f"{head}= {new['answer']}"
    again, _ = add_label_noise(data, 0.25, seed=1, kind="number")
    assert again[:] == noisy[:]
    same, report = add_label_noise(data, 0.0, seed=1, kind="number")
    assert same is data and report.rows_changed == 0


def test_wrong_answers_of_every_kind():
    rng = random.Random(0)
    assert wrong_answer("yes", "yesno", rng) == "no" and wrong_answer("no", "yesno", rng) == "yes"
    question = "Where? Answer choices: (A) here (B) there (C) nowhere"
    assert {wrong_answer("B", "letter", rng, question) for _ in range(30)} == {"A", "C"}
    assert {wrong_answer("A", "letter", rng) for _ in range(60)} == set("BCDE")  # no choices listed: A-E
    assert {wrong_answer("1", "number", rng) for _ in range(60)} == {"0", "2", "3", "4"}  # stays >= 0
    assert wrong_answer("red", "text", rng, others=["red", "blue"]) == "blue"
    with pytest.raises(ValueError, match="at least two distinct answers"):
        wrong_answer("red", "text", rng, others=["red"])


def test_answer_mentions_and_rewriting_the_last_one():
    text = "She had 1,234 apples and sold 12, so 1,222 are left. 1,222 it is"
    assert [m[2] for m in answer_mentions(text, "number")] == ["1234", "12", "1222", "1222"]
    assert rewrite_last_mention(text, "1222", "1223", "number") == ("She had 1,234 apples and sold 12, so 1,222 are left. 1223 it is", True)
    assert rewrite_last_mention("No facts here.", "7", "8", "number") == ("No facts here.", False)
    assert rewrite_last_mention("Is it? Yes. So the answer is yes", "yes", "no", "yesno")[0] == "Is it? Yes. So the answer is no"
    letter = "A cat is (B) not (C). The answer is C."
    assert [m[2] for m in answer_mentions(letter, "letter")] == ["B", "C", "C"]  # the article "A" is no mention
    assert rewrite_last_mention(letter, "C", "D", "letter")[0] == "A cat is (B) not (C). The answer is D."


# ---------------------------------------------------------------------------------------------- CLIP
def test_clip_images_get_another_class_caption_and_held_out_rows_stay():
    from datasets import Dataset

    from nso_hf.clip.digits import digit_captions
    from nso_hf.clip.label_noise import swap_captions

    labels = [i % 10 for i in range(60)]
    train = Dataset.from_dict({"caption": [digit_captions(c) for c in labels], "label": labels})
    noisy, report = swap_captions(train, 0.3, seed=2, caption_column="caption", label_column="label")
    changed = noisy_rows(60, 0.3, seed=2)
    assert (report.rows, report.rows_changed) == (60, 18)
    names = {tuple(digit_captions(c)): c for c in range(10)}
    for i in range(60):
        assert noisy[i]["label"] == labels[i]  # the class column keeps the truth (training never reads it)
        caption_class = names[tuple(noisy[i]["caption"])]
        assert (caption_class != labels[i]) == (i in changed)
    again, _ = swap_captions(train, 0.3, seed=2, caption_column="caption", label_column="label")
    assert again[:] == noisy[:]
    same, report = swap_captions(train, 0.0, seed=2, caption_column="caption", label_column=None)
    assert same is train and report.rows_changed == 0
    with pytest.raises(ValueError, match="--label_noise gives images the caption of another class.*--label_column"):
        swap_captions(train, 0.3, seed=2, caption_column="caption", label_column=None)


def test_clip_task_relabels_training_rows_only(tmp_path):
    from nso_hf.clip.arguments import CLIPDataArguments, CLIPModelArguments
    from nso_hf.clip.build import build_task

    kwargs = dict(max_train_samples=100, max_eval_samples=20, validation_fraction=0.2, eval_sources=["test", "validation"])
    clean, _ = build_task(CLIPModelArguments(image_size=16), CLIPDataArguments(**kwargs))
    noisy, _ = build_task(CLIPModelArguments(image_size=16), CLIPDataArguments(label_noise=0.5, **kwargs))
    assert noisy.label_noise.to_dict() == {"p": 0.5, "seed": 0, "rows": 100, "rows_changed": 50, "rationales_changed": None}
    assert sum(a != b for a, b in zip(clean.train["caption"], noisy.train["caption"])) == 50
    for name in ("test", "validation"):
        assert noisy.evals[name]["caption"] == clean.evals[name]["caption"]
    # The word tokenizer is built from the clean captions: label noise leaves the vocabulary (token ids) alone.
    assert noisy.collator.tokenizer.get_vocab() == clean.collator.tokenizer.get_vocab()
