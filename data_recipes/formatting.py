"""Turning {"question", "rationale", "answer"} examples into causal-LM training features.

The prompt is either a plain template ("Question: ...\\nAnswer:\\n") or the tokenizer's chat
template (one user turn, generation prompt added). The target is "rationale\\n#### answer" plus
EOS. Prompt and target are tokenized separately and concatenated, so the boundary is exact:
labels are -100 on every prompt token and equal the input ids on the target, and the loss covers
rationale + answer + EOS only. Generation at evaluation uses `build_prompt`, the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEMPLATES = ("auto", "plain", "chat")
OVERLONG_POLICIES = ("truncate", "drop")
PLAIN_PROMPT = "Question: {question}\nAnswer:\n"
IGNORE_INDEX = -100


@dataclass
class FormatReport:
    """Counts from `format_for_training`: kept examples, of which truncated, and dropped ones."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    template: str = "plain"

    def summary(self) -> str:
        return (
            f"{self.kept} examples kept ({self.truncated} truncated), {self.dropped} dropped as over-long; "
            f"template={self.template}"
        )


def resolve_template(tokenizer: Any, template: str) -> str:
    """"auto" -> "chat" when the tokenizer has a chat template, else "plain"; unknown names raise."""
    if template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; use one of {TEMPLATES}.")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' but the tokenizer has no chat_template; use template='plain'.")
    return template


def build_prompt(question: str, tokenizer: Any, template: str) -> str:
    """The prompt text for `question` ("plain" or "chat"; resolve "auto" first)."""
    if template == "plain":
        return PLAIN_PROMPT.format(question=question)
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"build_prompt needs template 'plain' or 'chat', got {template!r}.")


def build_target(rationale: str, answer: str) -> str:
    """"rationale\\n#### answer" (just "#### answer" without a rationale)."""
    return f"{rationale}\n#### {answer}" if rationale else f"#### {answer}"


def encode_prompt(question: str, tokenizer: Any, template: str) -> list[int]:
    """Token ids of the prompt. The plain template gets the tokenizer's own special tokens (BOS);
    a chat template already spells them out, so none are added."""
    text = build_prompt(question, tokenizer, template)
    return tokenizer(text, add_special_tokens=(template == "plain"))["input_ids"]


def tokenize_example(
    question: str,
    rationale: str,
    answer: str,
    tokenizer: Any,
    template: str,
    max_length: int | None = None,
    overlong: str = "truncate",
) -> tuple[dict[str, list[int]] | None, str]:
    """Features of one example and what happened to it.

    Args:
        question, rationale, answer: the example.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        template: "plain" or "chat" (resolved).
        max_length: longest sequence in tokens (None: no limit).
        overlong: "truncate" cuts the target's tail; "drop" discards the example. An example whose
            prompt alone fills max_length has no target left and is always dropped.

    Returns:
        ({"input_ids", "attention_mask", "labels"} or None, status) with status one of
        "kept", "truncated", "dropped".
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"Unknown overlong policy {overlong!r}; use one of {OVERLONG_POLICIES}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token: the model could not learn to stop.")
    prompt_ids = encode_prompt(question, tokenizer, template)
    target_ids = tokenizer(build_target(rationale, answer), add_special_tokens=False)["input_ids"]
    target_ids = target_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
    status = "kept"
    if max_length is not None and len(input_ids) > max_length:
        if overlong == "drop" or len(prompt_ids) >= max_length:
            return None, "dropped"
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}, status


def format_for_training(
    dataset: Any,
    tokenizer: Any,
    template: str = "auto",
    max_length: int | None = None,
    overlong: str = "truncate",
):
    """Tokenize a recipe's dataset for causal-LM fine-tuning with the prompt masked.

    Args:
        dataset: a `datasets.Dataset` with "question", "rationale", "answer".
        tokenizer: the model's tokenizer.
        template: "auto", "plain" or "chat".
        max_length: longest sequence in tokens (None: no limit).
        overlong: "truncate" or "drop".

    Returns:
        (a `datasets.Dataset` with "input_ids", "attention_mask", "labels", a `FormatReport`).
    """
    import datasets

    resolved = resolve_template(tokenizer, template)
    report = FormatReport(template=resolved)
    features: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in dataset:
        encoded, status = tokenize_example(
            example["question"], example["rationale"], example["answer"], tokenizer, resolved, max_length, overlong
        )
        if encoded is None:
            report.dropped += 1
            continue
        report.kept += 1
        report.truncated += status == "truncated"
        for key in features:
            features[key].append(encoded[key])
    return datasets.Dataset.from_dict(features), report
