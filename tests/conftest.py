"""Tiny models, data and arguments built in the test process: nothing comes from the Hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from helpers import (  # noqa: F401  (re-exported: tests import these from conftest)
    REPO,
    SCRIPTS,
    SEQ,
    VOCAB,
    Quadratic,
    assert_same_weights,
    byte_level_tokenizer,
    first_batch,
    launch,
    lm_examples,
    load_script,
    params_of,
    quadratic_examples,
    tiny_llama,
    tiny_llama_config,
    training_args,
)


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama (256 positions) and its BPE tokenizer, saved like any local model."""
    from nso_hf.cot.tiny_base_model import TinyBaseSpec, build_model, build_tokenizer, pretraining_texts

    spec = TinyBaseSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, corpus_size=300)
    tokenizer = build_tokenizer(pretraining_texts(spec), vocab_size=300)
    model = build_model(spec, tokenizer, seed=0)
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
