"""Final-answer extraction and normalisation for chain-of-thought outputs.

A generation is scored by the answer it commits to, not by its rationale. The answer is looked
for, in order: after the last `####` (the GSM8K convention our training targets use), after the
last "answer is" / "answer:" phrase, and finally (numbers and yes/no only) as the last candidate
anywhere in the text. That last fallback is what lm-evaluation-harness calls "flexible" matching
for GSM8K: it also credits a rambling or cut-off generation whose last number happens to be
right, so `strict=True` (a final-answer marker required) is the headline score and the
fallback is reported beside it. Every function here is pure.
"""

from __future__ import annotations

import re

ANSWER_KINDS = ("number", "yesno", "letter", "text")

# A number: optional sign (not when glued to a preceding word/digit, so "5-3" is not "-3"),
# optional currency sign, digits with thousands separators, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])-?\$?\d[\d,]*(?:\.\d+)?|\d[\d,]*(?:\.\d+)?")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:)\s*", re.IGNORECASE)
_YESNO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
# A choice letter: "(B)", "B)", "B." or a lone capital B; lower-case only inside parentheses.
_LETTER = re.compile(r"\(([A-Ea-e])\)|\b([A-E])\b(?:\)|\.|,|:)?")


def normalize_number(text: str) -> str:
    """Canonical spelling of a number: no `$`, commas or spaces; no trailing decimal zeros.

    Args:
        text: a number as written, e.g. "$1,234.50", "-3", "1 000".

    Returns:
        "1234.5", "-3", "1000". Text that is not a number is returned stripped but unchanged.
    """
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "")
    cleaned = cleaned.rstrip(".")
    if not re.fullmatch(r"[-+]?\d+(?:\.\d+)?", cleaned):
        return text.strip()
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    if "." in cleaned:
        cleaned = cleaned.rstrip("0").rstrip(".")
    negative = cleaned.startswith("-")
    digits = cleaned.lstrip("-").lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    if digits == "0":
        return "0"
    return ("-" if negative else "") + digits


def normalize_yesno(text: str) -> str:
    """Map yes/no/true/false (any case, also Python bools) to "yes" or "no"; anything else -> ""."""
    if isinstance(text, bool):
        return "yes" if text else "no"
    word = str(text).strip().strip(".").lower()
    if word in ("yes", "true"):
        return "yes"
    if word in ("no", "false"):
        return "no"
    return ""


def normalize_letter(text: str) -> str:
    """"(b)", "B)", " b " -> "B"; anything that is not a single choice letter -> ""."""
    word = str(text).strip().strip("().:").strip().upper()
    return word if re.fullmatch(r"[A-Z]", word) else ""


def normalize_text(text: str) -> str:
    """Lower-case, collapse spaces, drop a trailing period: the exact-match form of free text."""
    return " ".join(str(text).split()).rstrip(".").lower()


def normalize_answer(text: str, kind: str) -> str:
    """Normalise a gold answer of the given kind ("number", "yesno", "letter" or "text")."""
    if kind == "number":
        return normalize_number(str(text))
    if kind == "yesno":
        return normalize_yesno(text)
    if kind == "letter":
        return normalize_letter(text)
    if kind == "text":
        return normalize_text(text)
    raise ValueError(f"Unknown answer kind {kind!r}; use one of {ANSWER_KINDS}.")


def _answer_region(text: str) -> tuple[str, bool]:
    """The part of `text` that states the final answer, and whether a marker was found."""
    if "####" in text:
        return text.rsplit("####", 1)[1], True
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        return text[phrases[-1].end():], True
    return text, False


def extract_answer(text: str, kind: str = "number", strict: bool = False) -> str:
    """The final answer a chain-of-thought generation commits to, normalised.

    Args:
        text: the generated rationale + answer, e.g. "12 + 5 = 17\\n#### 17" or "... The answer is (B).".
        kind: "number" (GSM8K, arithmetic), "yesno" (StrategyQA), "letter" (CommonsenseQA, AQuA)
            or "text" (free form: the first line after the marker).
        strict: only an answer after a marker (`####`, "answer is", "answer:") counts; without one
            the result is "". False adds the fallback to the last candidate in the text.

    Returns:
        The normalised answer ("17", "yes", "B", ...), or "" when the text commits to none.
    """
    if kind not in ANSWER_KINDS:
        raise ValueError(f"Unknown answer kind {kind!r}; use one of {ANSWER_KINDS}.")
    region, marked = _answer_region(text)
    if strict and not marked:
        return ""
    if kind == "number":
        # After a marker the first number is the answer; without one, the last number written.
        found = _NUMBER.findall(region)
        if not found:
            return ""
        return normalize_number(found[0] if marked else found[-1])
    if kind == "yesno":
        found = _YESNO.findall(region)
        if not found:
            return ""
        return normalize_yesno(found[0] if marked else found[-1])
    if kind == "letter":
        if not marked:
            # Without a marker only an explicit "(X)" counts: a lone "A" is too often the article.
            found = re.findall(r"\(([A-Ea-e])\)", region)
            return normalize_letter(found[-1]) if found else ""
        match = _LETTER.search(region)
        if not match:
            return ""
        return normalize_letter(match.group(1) or match.group(2))
    # kind == "text"
    if not marked:
        return ""
    first_line = region.strip().split("\n", 1)[0]
    return normalize_text(first_line)


def answer_mentions(text: str, kind: str) -> list[tuple[int, int, str]]:
    """Where `text` states a candidate answer of `kind`: (start, end, normalised answer), in text order.

    Numbers: every number; yes/no: every yes/no/true/false word; letters: every "(X)", and the first
    letter after the last answer marker; text: the first line after the last marker. Label noise
    (`data_recipes.label_noise`) rewrites the last mention of the gold answer in a rationale.

    Args:
        text: a rationale or a generation.
        kind: one of `ANSWER_KINDS`.

    Returns:
        The spans, each covering the answer itself (not the parentheses around a letter).
    """
    if kind not in ANSWER_KINDS:
        raise ValueError(f"Unknown answer kind {kind!r}; use one of {ANSWER_KINDS}.")
    if kind == "number":
        return [(m.start(), m.end(), normalize_number(m.group())) for m in _NUMBER.finditer(text)]
    if kind == "yesno":
        return [(m.start(), m.end(), normalize_yesno(m.group())) for m in _YESNO.finditer(text)]
    region, marked = _answer_region(text)
    offset = len(text) - len(region)
    if kind == "letter":
        spans = [(m.start(1), m.end(1), m.group(1).upper()) for m in re.finditer(r"\(([A-Ea-e])\)", text)]
        after = _LETTER.search(region) if marked else None
        if after is not None:
            group = 1 if after.group(1) else 2
            start = offset + after.start(group)
            if all(s != start for s, _, _ in spans):
                spans.append((start, offset + after.end(group), after.group(group).upper()))
        return sorted(spans)
    if not marked:  # kind == "text"
        return []
    line = region.split("\n", 1)[0]
    start = offset + len(line) - len(line.lstrip())
    return [(start, offset + len(line.rstrip()), normalize_text(line))] if line.strip() else []


_CANONICAL = {
    "number": re.compile(r"-?\d+(?:\.\d+)?"),
    "yesno": re.compile(r"yes|no"),
    "letter": re.compile(r"[A-Z]"),
    "text": re.compile(r".+", re.DOTALL),
}


def is_answer_of_kind(answer: str, kind: str) -> bool:
    """Whether a normalised answer is a well-formed answer of `kind`.

    `normalize_number("eighteen")` returns "eighteen" unchanged (it is not a number), and a list
    `["70000"]` turns into the string "['70000']": as a reference either would silently score
    every prediction wrong, so gold answers are checked with this before they are accepted.
    """
    if kind not in ANSWER_KINDS:
        raise ValueError(f"Unknown answer kind {kind!r}; use one of {ANSWER_KINDS}.")
    return bool(_CANONICAL[kind].fullmatch(answer))


def guess_answer_kind(values: list) -> str | None:
    """The answer kind (other than "text") that more than half of raw gold `values` parse as, or None.

    Used to say which recipe fits a file whose answers do not fit the chosen one. yes/no and
    letters are tried before numbers, none of them overlap.
    """
    if not values:
        return None
    for kind in ("yesno", "letter", "number"):
        fits = sum(
            not isinstance(v, (list, tuple, dict)) and is_answer_of_kind(normalize_answer(v, kind), kind) for v in values
        )
        if fits * 2 > len(values):
            return kind
    return None
