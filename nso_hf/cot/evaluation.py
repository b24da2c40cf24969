"""Generation-based evaluation of chain-of-thought models: greedy decode, extract, exact match.

Each question is put in the training prompt (`data_recipes.formatting.build_prompt`), prompts are
left-padded into batches (decoder-only models continue from the last position, so padding must
sit on the left) and decoded greedily. The recipe extracts the final answer of every generation;
accuracy is exact match through the `evaluate` metric shipped in `data_recipes/metrics`.

Under several processes each one decodes a contiguous shard and the records are gathered back in
order; every process returns the same metrics, and only the main process writes files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from data_recipes.formatting import encode_prompt


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (input_ids, attention_mask) with the padding on the left.

    Args:
        sequences: token ids per prompt.
        pad_id: the padding id.

    Returns:
        Two LongTensors of shape (len(sequences), longest); the mask is 0 on padding.
    """
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, length - len(ids):] = 1
    return input_ids, mask


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: list[str],
    template: str,
    max_new_tokens: int = 128,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions of the prompts of `questions`, special tokens removed.

    Args:
        model: a causal LM (a peft model works too).
        tokenizer: its tokenizer (EOS ends a completion).
        questions: the questions, in order.
        template: "plain" or "chat", as used for training.
        max_new_tokens: the longest completion.
        batch_size: prompts per `generate` call.

    Returns:
        One decoded completion per question, in order.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            prompts = [encode_prompt(q, tokenizer, template) for q in questions[start:start + batch_size]]
            input_ids, mask = left_pad(prompts, pad_id)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, input_ids.shape[1]:]
            completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return completions


def exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match through the repository's `evaluate` metric module (works offline)."""
    import evaluate

    from data_recipes.metrics import EXACT_MATCH_METRIC

    return evaluate.load(EXACT_MATCH_METRIC).compute(predictions=predictions, references=references)


def _gather_in_order(records: list[dict]) -> list[dict]:
    from accelerate.utils import gather_object

    return gather_object(records)


def evaluate_cot(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    recipe: Any,
    template: str,
    name: str,
    output_dir: Optional[str] = None,
    max_new_tokens: int = 128,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy of `model` on a recipe's dataset, with predictions written as JSONL.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer.
        dataset: a recipe's `datasets.Dataset` ("question", "rationale", "answer").
        recipe: the recipe (its `extract_answer` reads the generations).
        template: "plain" or "chat".
        name: the evaluation's name, used in file names and metric keys.
        output_dir: where `predictions_{name}.jsonl` and `metrics_{name}.json` go (main process
            only; None: write nothing).
        max_new_tokens: the longest generation.
        batch_size: prompts per generate call (per process).

    Returns:
        {"exact_match", "num_correct", "num_examples", "num_answered"}: the same on every process.
    """
    from accelerate import PartialState

    state = PartialState()
    indices = list(range(len(dataset)))
    with state.split_between_processes(indices) as shard:
        questions = [dataset[i]["question"] for i in shard]
        generations = generate_completions(model, tokenizer, questions, template, max_new_tokens, batch_size) if shard else []
        records = [
            {"index": i, "question": q, "reference": dataset[i]["answer"], "generation": g,
             "prediction": recipe.extract_answer(g)}
            for i, q, g in zip(shard, questions, generations)
        ]
    if state.num_processes > 1:
        records = _gather_in_order(records)
    # split_between_processes pads nothing for lists, but be exact: one record per example, in order.
    records = sorted({r["index"]: r for r in records}.values(), key=lambda r: r["index"])
    if len(records) != len(dataset):
        raise RuntimeError(f"Evaluation {name!r} gathered {len(records)} records for {len(dataset)} examples.")
    for record in records:
        record["correct"] = record["prediction"] == record["reference"]
    metrics = exact_match([r["prediction"] for r in records], [r["reference"] for r in records])
    metrics["num_answered"] = sum(bool(r["prediction"]) for r in records)
    if output_dir is not None and state.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, f"predictions_{name}.jsonl"), "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        with open(os.path.join(output_dir, f"metrics_{name}.json"), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
    state.wait_for_everyone()
    return metrics
