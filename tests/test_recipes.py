"""Each recipe on fixture files in its dataset's own layout, plus formatting and masking."""

import json
import os
import re

import pytest

from data_recipes import RECIPES, format_for_training, get_recipe
from data_recipes.formatting import IGNORE_INDEX, build_prompt, build_target

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "cot")


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def tokenizer():
    from data_recipes.synthetic import SyntheticRecipe
    from nso_hf.cot.tiny_base_model import build_tokenizer

    examples = SyntheticRecipe(num_train=200).generate("train")
    return build_tokenizer([e["question"] + "\n" + e["rationale"] for e in examples], vocab_size=300)


def test_registry_and_unknown_name():
    assert set(RECIPES) == {"gsm8k", "strategyqa", "commonsense_qa", "aqua_rat", "cot_json", "jsonl", "synthetic"}
    with pytest.raises(ValueError, match="Unknown recipe 'gsm8"):
        get_recipe("gsm8")


def test_gsm8k_real_rows():
    ds = get_recipe("gsm8k").load(fixture("gsm8k_train.jsonl"))
    assert ds.column_names == ["question", "rationale", "answer"]
    assert len(ds) == 5
    assert ds[0]["answer"] == "72"
    assert ds[0]["rationale"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert not any("<<" in r for r in ds["rationale"])
    assert ds["answer"] == ["72", "10", "5", "42", "624"]


def test_gsm8k_keeps_calculator_notes_on_request():
    ds = get_recipe("gsm8k", keep_calculator_notes=True).load(fixture("gsm8k_train.jsonl"), max_samples=1)
    assert "<<48/2=24>>24" in ds[0]["rationale"]


def test_gsm8k_normalises_commas_and_names_bad_row():
    recipe = get_recipe("gsm8k")
    with pytest.raises(ValueError, match=r"gsm8k_bad\.jsonl: row 3: field 'answer': no final answer after '####'"):
        recipe.load(fixture("gsm8k_bad.jsonl"))
    recipe = get_recipe("gsm8k", on_bad_row="drop")
    ds = recipe.load(fixture("gsm8k_bad.jsonl"))
    assert ds["answer"] == ["36", "1150"]
    assert ds[1]["rationale"] == "1,200 - 50 = 1,150 dollars."
    assert (recipe.last_report.kept, recipe.last_report.dropped) == (2, 1)
    assert "row 3" in recipe.last_report.drop_reasons[0]


def test_strategyqa_hub_layout():
    ds = get_recipe("strategyqa").load(fixture("strategyqa.json"))
    assert ds["answer"] == ["no", "yes", "yes"]
    assert ds[0]["rationale"] == "Mount Everest is 8,849 metres tall. A garden snail moves about 50 metres per hour."
    assert ds[2]["rationale"] == ""


def test_common_cot_json_layout():
    ds = get_recipe("strategyqa").load(fixture("cot_common.jsonl"))
    assert ds["answer"] == ["yes", "no"]
    assert ds[1]["rationale"] == "Fish have no legs to pedal."
    assert get_recipe("cot_json", answer_kind="yesno").load(fixture("cot_common.jsonl"))["answer"] == ["yes", "no"]


def test_commonsense_qa_puts_choices_into_question():
    recipe = get_recipe("commonsense_qa", on_bad_row="drop")
    ds = recipe.load(fixture("commonsense_qa.jsonl"))
    assert ds["answer"] == ["B", "A"]
    assert ds[0]["question"] == (
        "Where would you keep milk cold?\nAnswer choices: (A) oven (B) refrigerator (C) desk (D) garden (E) attic"
    )
    assert recipe.last_report.dropped == 1
    with pytest.raises(ValueError, match=r"commonsense_qa\.jsonl: row 3: field 'answerKey': no final answer"):
        get_recipe("commonsense_qa").load(fixture("commonsense_qa.jsonl"))


def test_aqua_rat_options_and_rationale():
    ds = get_recipe("aqua_rat").load(fixture("aqua_rat.jsonl"))
    assert ds["answer"] == ["C", "C"]
    assert ds[0]["question"].endswith("Answer choices: (A) 50 (B) 55 (C) 60 (D) 65 (E) 70")
    assert ds[0]["rationale"].startswith("Speed = distance / time = 120 / 2 = 60 km/h.")
    assert get_recipe("aqua_rat").extract_answer(ds[0]["rationale"]) == "C"


def test_jsonl_maps_fields_and_names_empty_question(tmp_path):
    recipe = get_recipe("jsonl", question_field="q", rationale_field="why", answer_field="a", answer_kind="number")
    with pytest.raises(ValueError, match=r"custom_fields\.jsonl: row 2: field 'q': empty"):
        recipe.load(fixture("custom_fields.jsonl"))
    recipe = get_recipe(
        "jsonl", question_field="q", rationale_field="why", answer_field="a", answer_kind="number", on_bad_row="drop"
    )
    ds = recipe.load(fixture("custom_fields.jsonl"))
    assert ds.to_list() == [
        {"question": "What is 2 + 2?", "rationale": "2 + 2 = 4.", "answer": "4"},
        {"question": "What is 10 - 3?", "rationale": "10 - 3 = 7.", "answer": "7"},
    ]
    # The same rows as .json and .parquet read identically.
    rows = [{"q": r["question"], "why": r["rationale"], "a": r["answer"]} for r in ds.to_list()]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert recipe.load(str(tmp_path / "rows.json")).to_list() == ds.to_list()
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    assert recipe.load(str(tmp_path / "rows.parquet")).to_list() == ds.to_list()


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "missing.jsonl"
    path.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl: row 1: field 'answer': missing"):
        get_recipe("gsm8k").load(str(path))


def _check_arithmetic(example):
    value = None
    for line in example["rationale"].split("\n"):
        a, op, b, _, c = line.split()
        a, b, c = int(a), int(b), int(c)
        assert value is None or a == value
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
        value = c
    assert str(value) == example["answer"]
    return example["rationale"].count("\n") + 1


def test_synthetic_is_correct_deterministic_and_split():
    recipe = get_recipe("synthetic", num_train=300, num_test=60, num_ood=40, operations=("add", "sub", "mul"), seed=3)
    train, test, ood = recipe.load("train"), recipe.load("test"), recipe.load("ood")
    assert (len(train), len(test), len(ood)) == (300, 60, 40)
    assert {_check_arithmetic(e) for e in train} == {2, 3}
    assert {_check_arithmetic(e) for e in ood} == {4, 5}
    assert not set(train["question"]) & set(test["question"])
    again = get_recipe("synthetic", num_train=300, num_test=60, num_ood=40, operations=("add", "sub", "mul"), seed=3)
    assert again.load("train").to_list() == train.to_list()
    assert get_recipe("synthetic", num_train=300, seed=4).load("train")["question"] != train["question"]


def test_synthetic_gsm8k_file_round_trip(tmp_path):
    synthetic = get_recipe("synthetic", num_test=20)
    synthetic.write_gsm8k_jsonl(str(tmp_path / "s.jsonl"), "test")
    assert get_recipe("gsm8k").load(str(tmp_path / "s.jsonl")).to_list() == synthetic.load("test").to_list()


def test_synthetic_rejects_ood_not_longer():
    with pytest.raises(ValueError, match="needs more steps than training"):
        get_recipe("synthetic", max_steps=4, ood_min_steps=4)


def test_prompt_is_masked_and_target_matches(tokenizer):
    ds = get_recipe("synthetic", num_test=8).load("test")
    features, report = format_for_training(ds, tokenizer, template="plain")
    assert (report.kept, report.truncated, report.dropped, report.template) == (8, 0, 0, "plain")
    for example, feature in zip(ds, features):
        prompt_ids = tokenizer(build_prompt(example["question"], tokenizer, "plain"))["input_ids"]
        n = len(prompt_ids)
        assert feature["input_ids"][:n] == prompt_ids
        assert feature["labels"][:n] == [IGNORE_INDEX] * n
        assert feature["labels"][n:] == feature["input_ids"][n:]
        assert feature["input_ids"][-1] == tokenizer.eos_token_id
        target = tokenizer.decode(feature["input_ids"][n:], skip_special_tokens=True)
        assert target == build_target(example["rationale"], example["answer"])
        assert re.search(r"#### -?\d+$", target)


def test_overlong_truncate_and_drop_are_counted(tokenizer):
    ds = get_recipe("synthetic", num_test=10).load("test")
    full, _ = format_for_training(ds, tokenizer, template="plain")
    lengths = [len(ids) for ids in full["input_ids"]]
    limit = sorted(lengths)[5]
    n_long = sum(length > limit for length in lengths)
    assert n_long > 0
    cut, report = format_for_training(ds, tokenizer, template="plain", max_length=limit, overlong="truncate")
    assert (report.kept, report.truncated, report.dropped) == (10, n_long, 0)
    assert max(len(ids) for ids in cut["input_ids"]) == limit
    kept, report = format_for_training(ds, tokenizer, template="plain", max_length=limit, overlong="drop")
    assert (report.kept, report.dropped, len(kept)) == (10 - n_long, n_long, 10 - n_long)
    with pytest.raises(ValueError, match="Unknown overlong policy 'cut'"):
        format_for_training(ds, tokenizer, template="plain", overlong="cut")


def test_chat_template_prompt_is_masked(tokenizer):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    ds = get_recipe("synthetic", num_test=2).load("test")
    features, report = format_for_training(ds, tok, template="auto")
    assert report.template == "chat"
    prompt = build_prompt(ds[0]["question"], tok, "chat")
    assert prompt.startswith("<|user|>\n") and prompt.endswith("<|assistant|>\n")
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert features[0]["labels"][:n] == [IGNORE_INDEX] * n
    assert features[0]["labels"][n:] == features[0]["input_ids"][n:]
    with pytest.raises(ValueError, match="has no chat_template"):
        format_for_training(ds, tokenizer, template="chat")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [("eighteen", r"'eighteen' is not an answer of kind 'number'"),
     (["70000"], r"expected one number answer, got a list"),
     (True, r"'True' is not an answer of kind 'number'")],
)
def test_gold_answer_of_the_wrong_kind_is_a_bad_row(tmp_path, answer, reason):
    rows = [{"question": "How many?", "rationale": "2 + 2 = 4", "answer": "4"},
            {"question": "How many more?", "rationale": "9 + 9 = 18", "answer": answer},
            {"question": "And now?", "rationale": "1 + 1 = 2", "answer": "2"}]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError, match=rf"mixed\.jsonl: row 2: field 'answer': {reason}"):
        get_recipe("gsm8k").load(path)
    recipe = get_recipe("gsm8k", on_bad_row="drop")
    assert recipe.load(path)["answer"] == ["4", "2"]
    assert (recipe.last_report.kept, recipe.last_report.dropped) == (2, 1)


def test_file_of_another_answer_kind_names_the_recipe_that_fits(tmp_path):
    yesno = _write_jsonl(tmp_path / "yesno.jsonl", [
        {"question": f"Is {i} even?", "rationale": "Look at the last digit.", "answer": "Yes" if i % 2 == 0 else "No"}
        for i in range(6)
    ])
    advice = r"6 of 6 rows read have no number answer, so recipe 'gsm8k' does not fit this file; .*--recipe strategyqa"
    with pytest.raises(ValueError, match=r"yesno\.jsonl: row 1: field 'answer': 'Yes' is not .*" + advice):
        get_recipe("gsm8k").load(yesno)
    with pytest.raises(ValueError, match=r"yesno\.jsonl: 6 rows dropped; " + advice):
        get_recipe("gsm8k", on_bad_row="drop").load(yesno)
    letters = _write_jsonl(tmp_path / "letters.jsonl", [{"question": "Pick one", "answer": c} for c in "ABCAB"])
    with pytest.raises(ValueError, match=r"look like letter answers: use --recipe aqua_rat or commonsense_qa"):
        get_recipe("jsonl", rationale_field=None, answer_kind="number").load(letters)
    assert get_recipe("strategyqa").load(yesno)["answer"] == ["yes", "no"] * 3


def test_empty_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no examples to use \(it has no rows\)"):
        get_recipe("gsm8k").load(str(empty))
    bad = _write_jsonl(tmp_path / "allbad.jsonl", [{"question": "q?", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"allbad\.jsonl: .*row 1: field 'answer': no final answer after '####'"):
        get_recipe("gsm8k", on_bad_row="drop").load(bad)


@pytest.mark.parametrize(
    ("name", "question", "answer", "expected"),
    [("commonsense_qa", "Where is milk kept cold?\nAnswer choices: (A) oven (B) fridge (C) desk (D) bed (E) car", "B", "B"),
     ("aqua_rat", "3x = 9. x?\nAnswer choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "(c)", "C"),
     ("strategyqa", "Can fish ride bicycles?", "no", "no")],
)
def test_common_layout_without_rationale(tmp_path, name, question, answer, expected):
    path = _write_jsonl(tmp_path / "answer_only.jsonl", [{"question": question, "answer": answer}])
    ds = get_recipe(name).load(path)
    assert ds.to_list() == [{"question": question, "rationale": "", "answer": expected}]
