"""The test kit: tiny models and data built in the test process, a free port, and how tests launch
scripts. Nothing comes from the Hub. `conftest.py` re-exports these names and adds the fixtures.
"""

from __future__ import annotations

import os
import random
import runpy
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback, TrainingArguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")

VOCAB = 64
SEQ = 16


def tiny_llama_config(vocab_size: int = VOCAB, max_positions: int = SEQ, **overrides: Any) -> LlamaConfig:
    """The one tiny Llama shape of the suite: 2 layers, hidden 32 (about 40k parameters at vocab 64)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(
    seed: int = 0, dropout: float = 0.1, dtype: torch.dtype = torch.float32, attention: str = "eager", **config: Any
) -> LlamaForCausalLM:
    """A tiny Llama with attention dropout on; eager attention (dropout applies there) unless asked."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(attention_dropout=dropout, **config)).to(dtype)
    model.config._attn_implementation = attention
    return model


def byte_level_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` in a fraction of a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


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
    """loss(w) = 1/2 w^T A w + (c + b)^T w, w the concatenation of the parameters, b from the batch.

    Gradient A w + c + b and Hessian A at every batch: the known answers of the NSO step (the
    two-point gradient is exact) and of the flatness estimators (trace, eigenvalues, noise stability).

    Args:
        dim: size of w (ignored when `a` is given).
        seed: seeds A (when not given), c and w.
        dtype: of every tensor.
        a: the Hessian; default a random symmetric positive definite matrix.
        sizes: split w into parameters of these sizes (w1, w2, ...); default one parameter `w`.
        linear: include the fixed linear term c (else only the batch's b).
    """

    def __init__(
        self,
        dim: int = 6,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        a: torch.Tensor | None = None,
        sizes: tuple[int, ...] | None = None,
        linear: bool = True,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if a is None:
            m = torch.randn(dim, dim, generator=g, dtype=dtype)
            a = m @ m.T + torch.eye(dim, dtype=dtype)
        dim = a.shape[0]
        self.register_buffer("A", a)
        self.register_buffer("c", torch.randn(dim, generator=g, dtype=dtype) * float(linear))
        sizes = sizes or (dim,)
        self.names = ["w"] if len(sizes) == 1 else [f"w{i + 1}" for i in range(len(sizes))]
        for name, size in zip(self.names, sizes, strict=True):
            self.register_parameter(name, nn.Parameter(torch.randn(size, generator=g, dtype=dtype)))

    def flat(self) -> torch.Tensor:
        return torch.cat([getattr(self, n) for n in self.names])

    def exact_grad(self) -> torch.Tensor:
        return (self.A @ self.flat() + self.c).detach()

    def forward(self, x: torch.Tensor | None = None, b: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        w = self.flat()
        linear = self.c if b is None else self.c + b
        loss = 0.5 * w @ self.A @ w + linear @ w
        if x is not None:  # x only carries the batch through the Trainer
            loss = loss + 0.0 * x.sum()
        return SimpleNamespace(loss=loss) if b is not None else {"loss": loss}


def quadratic_examples(n: int = 8) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.zeros(1, dtype=torch.float64)} for _ in range(n)]




def first_batch(trainer) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


def rng_state() -> tuple:
    """torch's CPU, numpy's and Python's global generator states (tests of the replay)."""
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


def assert_same_rng(got: tuple, ref: tuple) -> None:
    assert torch.equal(got[0], ref[0]), "torch's generator"
    assert got[1][0] == ref[1][0] and np.array_equal(got[1][1], ref[1][1]) and got[1][2:] == ref[1][2:], "numpy's generator"
    assert got[2] == ref[2], "Python's random"


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], exact: bool) -> None:
    """`got` equals `ref` bit for bit (`exact`), or to float rounding (rtol 1e-5, atol 1e-6).

    Without gradient accumulation a zero-strength step is Trainer's bit for bit (a power-of-two pass
    weight scales every gradient exactly); with it the sums associate differently ((a + b/2) + b/2 vs
    a + b): last-bit noise, which Adam can lift to ~1e-4 of one update where a gradient is near 0.
    """
    assert got.keys() == ref.keys()
    for name in ref:
        if exact:
            assert torch.equal(got[name], ref[name]), name
        else:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


class CountAllReduces(TrainerCallback):
    """Registers a DDP communication hook that counts gradient-bucket all-reduces (set `.trainer` first)."""

    def __init__(self):
        self.trainer, self.calls = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(process_group, bucket):
            self.calls += 1
            return default_hooks.allreduce_hook(process_group, bucket)

        self.trainer.model_wrapped.register_comm_hook(None, hook)


NATIVE_ABORT = "terminate called without an active exception"


def launch(command: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run a multi-process launch; once more if a rank died of a native abort outside Python.

    Seen on CI, rarely and never locally: a gloo rank aborting with NATIVE_ABORT and no Python
    traceback. The second launch runs the same deterministic work; any other failure is returned
    as it is, and a second abort fails the test.
    """
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and NATIVE_ABORT in done.stderr and "Traceback (most recent call last)" not in done.stderr.split(NATIVE_ABORT)[0]:
        print(f"relaunching after a native abort: {command[-3:]}", file=sys.stderr)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return done


def finish_worker() -> None:
    """End a launched worker once its results are written: no interpreter teardown.

    Seen on CI: a rank whose work was done aborted at exit with "terminate called without an active
    exception" (a native thread torn down by the interpreter's exit), failing the launch. The
    process group is shut down, the streams flushed, and the process leaves with status 0 at once.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def load_script(name: str) -> dict[str, Any]:
    """A script's top-level names, without running its `__main__` block (the one way tests import scripts)."""
    return runpy.run_path(os.path.join(SCRIPTS, name))
