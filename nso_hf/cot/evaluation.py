"""Generation-based evaluation of chain-of-thought models: greedy decode, extract, exact match.

Each question is put in the training prompt (`data_recipes.formatting.build_prompt`), prompts are
left-padded into batches (decoder-only models continue from the last position, so padding must
sit on the left) and decoded greedily. The recipe extracts the final answer of every generation
twice, as lm-evaluation-harness does for GSM8K: strictly (a final-answer marker such as `####`
is required) and flexibly (else the last number / yes-no / "(X)" in the text). The flexible
fallback credits rambling generations cut off by `max_new_tokens` whose last number happens to be
right, so `exact_match` is the strict score; the flexible one and the number of generations that
hit `max_new_tokens` without an EOS are reported beside it. Accuracy is exact match through the
`evaluate` metric shipped in `data_recipes/metrics`.

Under several processes each one decodes a contiguous shard and the records are gathered back in
order; every process returns the same metrics, and only the main process writes files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

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
    return [text for text, _ in generate(model, tokenizer, questions, template, max_new_tokens, batch_size)]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: list[str],
    template: str,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    on_batch: Callable[[list[tuple[str, bool]]], None] | None = None,
) -> list[tuple[str, bool]]:
    """Greedy completions of the prompts of `questions`, and whether each was cut off.

    Args:
        model, tokenizer, questions, template, max_new_tokens, batch_size: as `generate_completions`.
        on_batch: called with each batch's results as they come (progress reporting).

    Returns:
        (completion without special tokens, truncated) per question, in order; truncated means the
        completion reached `max_new_tokens` without an EOS token.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[tuple[str, bool]] = []
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
            # A row that stopped early holds EOS (then padding); one that never emitted EOS was cut off.
            stopped = (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()
            batch = list(zip(tokenizer.batch_decode(new_tokens, skip_special_tokens=True), [not s for s in stopped]))
            completions.extend(batch)
            if on_batch is not None:
                on_batch(batch)
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
    output_dir: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    progress: bool = True,
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
        progress: show a progress bar with the running strict accuracy (main process only; under
            several processes it counts the main process's shard).

    Returns:
        The same on every process: "exact_match" (= "exact_match_strict", the headline),
        "exact_match_flexible", "num_correct" (strict), "num_correct_flexible", "num_examples",
        "num_answered" (a strict answer was found), "num_truncated" (hit max_new_tokens).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    indices = list(range(len(dataset)))
    with state.split_between_processes(indices) as shard:
        questions = [dataset[i]["question"] for i in shard]
        references = [dataset[i]["answer"] for i in shard]
        bar = tqdm(total=len(shard), desc=f"eval {name}", disable=not (progress and state.is_main_process))
        tally = {"done": 0, "correct": 0}  # of this process's shard, for the progress bar only

        def advance(batch: list[tuple[str, bool]]) -> None:
            done = tally["done"]
            tally["correct"] += sum(
                recipe.extract_answer(text, strict=True) == ref
                for (text, _), ref in zip(batch, references[done:done + len(batch)])
            )
            tally["done"] += len(batch)
            bar.update(len(batch))
            bar.set_postfix(exact_match=f"{tally['correct'] / tally['done']:.3f}", refresh=False)

        generations = (
            generate(model, tokenizer, questions, template, max_new_tokens, batch_size, on_batch=advance) if shard else []
        )
        bar.close()
        records = [
            {"index": i, "question": q, "reference": ref, "generation": g, "truncated": cut,
             "prediction": recipe.extract_answer(g, strict=True),
             "prediction_flexible": recipe.extract_answer(g)}
            for i, q, ref, (g, cut) in zip(shard, questions, references, generations)
        ]
    if state.num_processes > 1:
        records = _gather_in_order(records)
    # split_between_processes pads nothing for lists, but be exact: one record per example, in order.
    records = sorted({r["index"]: r for r in records}.values(), key=lambda r: r["index"])
    if len(records) != len(dataset):
        raise RuntimeError(f"Evaluation {name!r} gathered {len(records)} records for {len(dataset)} examples.")
    for record in records:
        record["correct"] = record["prediction"] == record["reference"]
        record["correct_flexible"] = record["prediction_flexible"] == record["reference"]
    references = [r["reference"] for r in records]
    strict = exact_match([r["prediction"] for r in records], references)
    flexible = exact_match([r["prediction_flexible"] for r in records], references)
    metrics = {
        "exact_match": strict["exact_match"],
        "exact_match_strict": strict["exact_match"],
        "exact_match_flexible": flexible["exact_match"],
        "num_correct": strict["num_correct"],
        "num_correct_flexible": flexible["num_correct"],
        "num_examples": strict["num_examples"],
        "num_answered": sum(bool(r["prediction"]) for r in records),
        "num_truncated": sum(r["truncated"] for r in records),
    }
    if output_dir is not None and state.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, f"predictions_{name}.jsonl"), "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        with open(os.path.join(output_dir, f"metrics_{name}.json"), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
    state.wait_for_everyone()
    return metrics
