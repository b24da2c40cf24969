"""`extract_answer` on generations as models actually write them."""

import pytest

from data_recipes import get_recipe
from data_recipes.answers import extract_answer, normalize_number


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("She pays 1,234 dollars.\n#### 1,234", "number", "1234"),
        ("48/2 = 24\n48 + 24 = 72\n#### 72", "number", "72"),
        ("The total is 3 + 4 = 7. The answer is 42.", "number", "42"),
        ("So the answer is: 18", "number", "18"),
        ("The temperature drops 5 - 12 = -7 degrees.\n#### -7", "number", "-7"),
        ("Each costs $2.50, so 4 cost $10.00.\n#### $10.00", "number", "10"),
        ("#### 0.75", "number", "0.75"),
        ("She has 5 - 3 = 2 left over", "number", "2"),  # no marker: the last number written
        ("5-3 = 2\n#### 2 apples.", "number", "2"),
        ("I am not sure.", "number", ""),
        ("#### ", "number", ""),
        ("Snails are slow. So the answer is no.", "yesno", "no"),
        ("Penguins breed in Antarctica.\n#### yes", "yesno", "yes"),
        ("True, penguins live there.", "yesno", "yes"),
        ("The answer is (B).", "letter", "B"),
        ("Speed is 60 km/h.\nANSWER: C", "letter", "C"),
        ("A fridge keeps milk cold, so (b) refrigerator.", "letter", "B"),
        ("#### E", "letter", "E"),
        ("A fridge keeps milk cold.", "letter", ""),  # a lone article "A" is no answer
        ("Paris is the capital.\n#### Paris.", "text", "paris"),
    ],
)
def test_extract_answer(text, kind, expected):
    assert extract_answer(text, kind) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1,234", "1234"), ("$1,234.50", "1234.5"), ("-0", "0"), ("007", "7"), ("1 000", "1000"), ("3.", "3"), ("abc", "abc")],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_recipe_extracts_its_own_kind():
    assert get_recipe("gsm8k").extract_answer("... so she pays 1,234 dollars.\n#### 1,234") == "1234"
    assert get_recipe("strategyqa").extract_answer("No snail is that fast.\n#### no") == "no"
    assert get_recipe("commonsense_qa").extract_answer("The answer is (A) scissors.") == "A"


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="Unknown answer kind 'digits'"):
        extract_answer("#### 3", "digits")


@pytest.mark.parametrize(
    ("text", "kind", "strict", "flexible"),
    [
        # A generation cut off by max_new_tokens: the last number is right by chance.
        ("13 -122 books2 books22 books 13", "number", "", "13"),
        ("7 + 6 = 13\n#### 13", "number", "13", "13"),
        ("So the answer is 13 books.", "number", "13", "13"),
        ("Snails are slow, no", "yesno", "", "no"),
        ("A fridge, so (b) refrigerator.", "letter", "", "B"),
        ("The answer is (B).", "letter", "B", "B"),
    ],
)
def test_strict_needs_a_marker_flexible_falls_back(text, kind, strict, flexible):
    assert extract_answer(text, kind, strict=True) == strict
    assert extract_answer(text, kind) == flexible
