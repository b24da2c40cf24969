"""A tiny Llama-style base model and byte-level BPE tokenizer, pretrained offline and cached.

The embedded default of `scripts/finetune_cot.py` needs a base model that already "speaks" the
synthetic arithmetic corpus, the way a real pretrained LM speaks English, so that LoRA
fine-tuning has something to adapt. Building one takes 6-7 minutes on one CPU core, so it is
saved under a cache folder keyed by every setting that shapes it; a second run loads it.

Pretraining is a plain PyTorch loop, not `Trainer`: it runs on the main process only (inside
`main_process_first` under DDP), where a `Trainer` would wait forever for the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nso_hf")


@dataclass
class TinyBaseSpec:
    """Everything that determines the cached base model (its hash names the cache folder)."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    # Pretraining corpus: synthetic problems with fewer steps than fine-tuning uses.
    corpus_min_steps: int = 1
    corpus_max_steps: int = 2
    corpus_max_operand: int = 9
    corpus_size: int = 4000
    pretrain_steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (digits split one per token) and wrap it for transformers.

    Args:
        texts: training corpus.
        vocab_size: target vocabulary size including the special tokens.

    Returns:
        A `PreTrainedTokenizerFast` with <pad>, <s> (prepended as BOS) and </s> (EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # One token per digit: arithmetic is learned digit by digit instead of memorised per number.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="right"
    )


def build_model(spec: TinyBaseSpec, tokenizer: Any, seed: int = 0):
    """A randomly initialised `LlamaForCausalLM` sized by `spec`, with eager attention.

    Eager attention because the Hessian measurements need double backward, which SDPA lacks.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretraining_texts(spec: TinyBaseSpec) -> list[str]:
    """The pretraining corpus: synthetic problems in the plain prompt layout, target included."""
    from data_recipes.formatting import build_prompt, build_target
    from data_recipes.synthetic import SyntheticRecipe

    recipe = SyntheticRecipe(
        min_steps=spec.corpus_min_steps,
        max_steps=spec.corpus_max_steps,
        ood_min_steps=spec.corpus_max_steps + 1,
        ood_max_steps=spec.corpus_max_steps + 1,
        max_operand=spec.corpus_max_operand,
        seed=spec.seed + 1000,  # not the fine-tuning seed: a different draw of problems
    )
    examples = recipe.generate("train", spec.corpus_size)
    return [build_prompt(e["question"], None, "plain") + build_target(e["rationale"], e["answer"]) for e in examples]


def pretrain(model: torch.nn.Module, tokenizer: Any, texts: list[str], spec: TinyBaseSpec, log_every: int = 100) -> list[float]:
    """Causal-LM pretraining with AdamW and a cosine schedule; returns the logged losses.

    Args:
        model: the model (trained in place).
        tokenizer: its tokenizer (BOS prepended, EOS appended here).
        texts: the corpus.
        spec: steps, batch size, learning rate, seed.
        log_every: print the loss every this many steps.

    Returns:
        The loss of every `log_every`-th step.
    """
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.pretrain_steps))),
    )
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(spec.pretrain_steps):
        index = torch.randint(len(encoded), (spec.batch_size,), generator=generator).tolist()
        batch = [encoded[i][: spec.max_position_embeddings] for i in index]
        length = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == spec.pretrain_steps - 1:
            losses.append(loss.item())
            print(f"[pretrain] step {step + 1}/{spec.pretrain_steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return losses


def tiny_base_model_path(spec: TinyBaseSpec | None = None, cache_dir: str | None = None) -> str:
    """Path of the pretrained tiny base model, building and caching it on first use.

    Args:
        spec: the model and pretraining settings (default `TinyBaseSpec()`).
        cache_dir: where cached models live (default ~/.cache/nso_hf).

    Returns:
        A folder loadable with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    spec = spec or TinyBaseSpec()
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    path = os.path.join(cache_dir, f"tiny-llama-cot-{spec.key()}")
    if os.path.exists(os.path.join(path, "done.json")):
        print(f"[pretrain] cached base model found: {path}", flush=True)
        return path
    texts = pretraining_texts(spec)
    tokenizer = build_tokenizer(texts, spec.vocab_size)
    model = build_model(spec, tokenizer, seed=spec.seed)
    print(f"[pretrain] building the tiny base model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {spec.pretrain_steps} steps: about {spec.pretrain_steps * 0.2 / 60:.0f} minutes on one CPU core, "
          f"once); cached at {path}", flush=True)
    losses = pretrain(model, tokenizer, texts, spec)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Written last: a folder without it is an interrupted build and is rebuilt.
    with open(os.path.join(path, "done.json"), "w") as handle:
        json.dump({"spec": asdict(spec), "losses": losses}, handle, indent=1)
    return path
