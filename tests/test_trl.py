"""NSOMixin on trl's SFTTrainer: the step, the token counter and sigma = 0 equivalence."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, params_of, tiny_llama

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from nso_hf import NSOConfig, NSOMixin  # noqa: E402


class NSOSFTTrainer(NSOMixin, SFTTrainer):
    pass


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def texts(n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, VOCAB, (n, 10), generator=g)
    return Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row.tolist()) for row in rows]})


def run(trainer_cls, tmp_path, **kw):
    model = tiny_llama(dropout=0.1)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=5, max_length=16,
    )  # fmt: skip
    trainer = trainer_cls(model=model, args=args, train_dataset=texts(), processing_class=word_tokenizer(), **kw)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return params_of(model), logs


def test_sft_trainer_with_nso_counts_tokens_once_and_reproduces_sft_at_sigma_zero(tmp_path):
    ref, ref_logs = run(SFTTrainer, tmp_path / "sft")
    got, logs = run(NSOSFTTrainer, tmp_path / "nso", nso_config=NSOConfig(sigma=0.0))
    assert [h["num_tokens"] for h in logs] == [h["num_tokens"] for h in ref_logs]
    assert [h["loss"] for h in logs] == [h["loss"] for h in ref_logs]
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    noisy, _ = run(NSOSFTTrainer, tmp_path / "noisy", nso_config=NSOConfig(sigma=0.1))
    assert any(not torch.equal(ref[n], noisy[n]) for n in ref)
