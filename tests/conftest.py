"""Tiny models, data and arguments built in the test process: nothing comes from the Hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

VOCAB = 64
SEQ = 16


def tiny_llama(seed: int = 0, dropout: float = 0.1, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer Llama (about 40k parameters) with attention dropout on, eager attention."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        attention_dropout=dropout,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = "eager"  # dropout applied in eager attention
    return model


def lm_examples(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token sequences with labels equal to the inputs (a list works as a Trainer dataset)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=123,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class Quadratic(nn.Module):
    """loss(w) = 1/2 w^T A w + c^T w: gradient A w + c, the same at every batch."""

    def __init__(self, dim: int = 6, seed: int = 0, dtype: torch.dtype = torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(dim, dim, generator=g, dtype=dtype)
        self.register_buffer("A", m @ m.T + torch.eye(dim, dtype=dtype))
        self.register_buffer("c", torch.randn(dim, generator=g, dtype=dtype))
        self.w = nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))

    def exact_grad(self) -> torch.Tensor:
        return (self.A @ self.w + self.c).detach()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        # x only carries the batch through the Trainer; the loss does not depend on it.
        return {"loss": 0.5 * self.w @ self.A @ self.w + self.c @ self.w + 0.0 * x.sum()}


def quadratic_examples(n: int = 8) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.zeros(1, dtype=torch.float64)} for _ in range(n)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronisation, which stalls on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def args_factory(tmp_path):
    return lambda **kw: training_args(tmp_path, **kw)


def first_batch(trainer) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
