"""NSOMixin on trl's trainers: SFT, DPO and reward modelling; the counters, the metrics, the reference model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import VOCAB, params_of, tiny_llama

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast  # noqa: E402
from trl import (  # noqa: E402
    DPOConfig,
    DPOTrainer,
    GRPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)

from nso_hf import NSOConfig, NSOMixin  # noqa: E402
from nso_hf.compat import count_once, per_micro_batch, snapshot_counters  # noqa: E402

from helpers import tiny_llama_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


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


# DPO and reward modelling: the same step, trl's metrics one entry per micro-batch.
def words(n: int, k: int, seed: int, lead: str = "") -> list[str]:
    rows = torch.randint(3, VOCAB, (n, k), generator=torch.Generator().manual_seed(seed))
    return [lead + " ".join(f"w{i}" for i in row.tolist()) for row in rows]


def preferences(n: int = 8) -> Dataset:
    # Completions start with a space: the word tokenizer then splits prompt + completion at the boundary.
    return Dataset.from_dict({"prompt": words(n, 4, 1), "chosen": words(n, 4, 2, " "), "rejected": words(n, 4, 3, " ")})


def common(tmp_path, **kw) -> dict:
    return dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=5, max_length=16, **kw,
    )  # fmt: skip


class MetricLengths:
    """Placed first in the MRO: the number of entries of each per-call metric when a log averages them."""

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            counts = {k: len(v) for k, v in self._metrics["train"].items() if k != "num_tokens"}
            self.lengths = [*getattr(self, "lengths", []), counts]
        super().log(logs, *args, **kwargs)


def training_logs(trainer) -> list[dict]:
    """The training logs without NSO's own keys (nso/...), which the parent trainer does not log."""
    return [{k: v for k, v in h.items() if not k.startswith("nso/")} for h in trainer.state.log_history if "loss" in h]


def train_dpo(trainer_cls, tmp_path, model=None, grad_accum: int = 1, **kw):
    model = model if model is not None else tiny_llama(dropout=0.1)
    args = DPOConfig(**common(tmp_path, gradient_accumulation_steps=grad_accum))
    ref = kw.pop("ref_model", None)
    trainer = trainer_cls(
        model=model, ref_model=ref, args=args, train_dataset=preferences(), processing_class=word_tokenizer(), **kw
    )
    trainer.train()
    return model, trainer, training_logs(trainer)


def metric_trainer(parent: type, nso: bool) -> type:
    bases = (MetricLengths, NSOMixin, parent) if nso else (MetricLengths, parent)
    return type(f"Spy{parent.__name__}", bases, {})


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_dpo_with_nso_reproduces_dpo_at_sigma_zero_and_counts_metrics_once(tmp_path, grad_accum):
    ref, ref_trainer, ref_logs = train_dpo(
        metric_trainer(DPOTrainer, nso=False), tmp_path / "dpo", ref_model=tiny_llama(dropout=0.1), grad_accum=grad_accum
    )
    got, trainer, logs = train_dpo(
        metric_trainer(DPOTrainer, nso=True), tmp_path / "nso", ref_model=tiny_llama(dropout=0.1), grad_accum=grad_accum,
        nso_config=NSOConfig(sigma=0.0, num_perturbations=2),
    )  # fmt: skip
    # One entry per micro-batch in every per-call metric (4 passes ran per micro-batch).
    assert trainer.lengths == ref_trainer.lengths and all(set(c.values()) == {grad_accum} for c in trainer.lengths)
    if grad_accum == 1:  # with accumulation the weights (and later metrics) agree up to summation order
        assert logs == ref_logs and len(logs) == 2 and "rewards/margins" in logs[0]
        for name, value in params_of(ref).items():
            assert torch.equal(params_of(got)[name], value), name
    else:
        # The first step's metrics, before any update; the gradient norm sums in another order.
        assert {k: v for k, v in logs[0].items() if k != "grad_norm"} == {k: v for k, v in ref_logs[0].items() if k != "grad_norm"}
        assert [h["num_tokens"] for h in logs] == [h["num_tokens"] for h in ref_logs]


class RecordsCalls(DPOTrainer):
    """Between NSOMixin and DPOTrainer: the value each call of compute_loss (one per pass) appended."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.appended = [*getattr(self, "appended", []), self._metrics["train"]["rewards/chosen"][-1]]
        return out


class NSODPORecordsCalls(MetricLengths, NSOMixin, RecordsCalls):
    pass


def test_dpo_metrics_are_the_mean_over_the_perturbed_passes_and_the_reference_is_never_perturbed(tmp_path):
    reference = tiny_llama(dropout=0.1)
    before = params_of(reference)
    seen = []  # the reference model's log-probabilities, one entry per call (one per pass)
    reference.register_forward_hook(lambda m, a, out: seen.append(out.log_probs.detach().clone()))
    _, trainer, logs = train_dpo(NSODPORecordsCalls, tmp_path, ref_model=reference, nso_config=NSOConfig(sigma=0.3))
    appended = trainer.appended
    assert len(appended) == 4  # two steps, two passes each
    assert appended[0] != appended[1]  # the passes saw different weights...
    for step, h in enumerate(logs):  # ...and the logged value is their mean, once per micro-batch
        assert h["rewards/chosen"] == pytest.approx((appended[2 * step] + appended[2 * step + 1]) / 2, rel=1e-12)
    assert len(seen) == 4 and torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    for name, value in params_of(reference).items():
        assert torch.equal(value, before[name]), name


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


@pytest.mark.parametrize("how", ["peft model", "peft_config"])
def test_dpo_with_a_peft_reference_keeps_the_base_weights_clean_or_refuses_merged_noise(tmp_path, how):
    # No ref_model with peft: DPO's reference is this model with a frozen copy of the adapter ("ref", when
    # given a peft model) or with the adapters disabled (when it applies peft_config itself). Either way the
    # reference reads the base weights, and only the trainable adapter is perturbed.
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model, kw = (lora(tiny_llama(dropout=0.0)), {}) if how == "peft model" else (tiny_llama(dropout=0.0), {"peft_config": peft_config})
    trainer = type("NSODPO", (NSOMixin, DPOTrainer), {})(
        model=model, args=DPOConfig(**common(tmp_path)), train_dataset=preferences(), processing_class=word_tokenizer(),
        nso_config=NSOConfig(sigma=0.3), **kw,
    )  # fmt: skip
    peft_model = trainer.model
    calls = []  # (reference forward?, log-probabilities) of each forward

    def record(module, args, out):
        disabled = any(getattr(m, "disable_adapters", False) for m in peft_model.modules() if hasattr(m, "lora_A"))
        calls.append((disabled or peft_model.active_adapter == "ref", out.log_probs.detach().clone()))

    peft_model.register_forward_hook(record)
    trainer.train()
    reference = [lp for is_reference, lp in calls if is_reference]
    policy = [lp for is_reference, lp in calls if not is_reference]
    assert len(reference) == len(policy) == 4
    assert not torch.equal(policy[0], policy[1])  # W + U and W - U on the adapter
    assert torch.equal(reference[0], reference[1]) and torch.equal(reference[2], reference[3])

    for method in ("flat_lora", "nso_merged"):  # noise on the base weights would reach that reference
        model, kw = (lora(tiny_llama()), {}) if how == "peft model" else (tiny_llama(), {"peft_config": peft_config})
        with pytest.raises(ValueError, match=rf"method='{method}' writes its noise into the base weights.*precompute_ref_log_probs=True"):
            type("NSODPO", (NSOMixin, DPOTrainer), {})(
                model=model, args=DPOConfig(**common(tmp_path / method)), train_dataset=preferences(),
                processing_class=word_tokenizer(), nso_config=NSOConfig(method=method, sigma=0.3), **kw,
            )  # fmt: skip


def test_reward_trainer_with_nso_reproduces_it_at_sigma_zero_and_counts_metrics_once(tmp_path):
    def build():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(tiny_llama_config(num_labels=1, attention_dropout=0.1))

    data = Dataset.from_dict({"chosen": words(8, 6, 4), "rejected": words(8, 6, 5)})
    runs = {}
    for name, nso in (("reward", False), ("nso", True)):
        model = build()
        kw = {"nso_config": NSOConfig(sigma=0.0)} if nso else {}
        trainer = metric_trainer(RewardTrainer, nso)(
            model=model, args=RewardConfig(**common(tmp_path / name)), train_dataset=data,
            processing_class=word_tokenizer(), **kw,
        )  # fmt: skip
        trainer.train()
        runs[name] = (model, trainer, training_logs(trainer))
    (ref, ref_trainer, ref_logs), (got, trainer, logs) = runs["reward"], runs["nso"]
    assert logs == ref_logs and len(logs) == 2 and {"accuracy", "margin", "num_tokens"} <= logs[0].keys()
    assert trainer.lengths == ref_trainer.lengths and all(set(c.values()) == {1} for c in trainer.lengths)
    for name, value in params_of(ref).items():
        assert torch.equal(params_of(got)[name], value), name


def test_per_micro_batch_metrics_by_hand():
    # Two calls' entries per pass (m = 2), passes: clean (not kept), +U, -U.
    assert per_micro_batch([1.0, 10.0, 2.0, 20.0, 4.0, 40.0], [False, True, True]) == [3.0, 30.0]
    assert per_micro_batch([0.1, 0.1, 0.1, 0.1], [True] * 4) == [0.1]  # equal values: the value itself
    assert per_micro_batch([1.0, 2.0, 6.0], [True, True]) == [3.0]  # not m per pass: the mean of all
    assert per_micro_batch([1.0, 3.0], [False, False]) == [2.0]  # none kept: every pass
    # Older trl kept its metrics in `_stored_metrics` (store_metrics): the same rule applies there.
    trainer = SimpleNamespace(_stored_metrics={"train": {"rewards/chosen": [5.0]}, "eval": {"x": [1.0]}})
    before = snapshot_counters(trainer)
    trainer._stored_metrics["train"]["rewards/chosen"] += [1.0, 2.0]
    trainer._stored_metrics["eval"]["x"] += [7.0, 8.0]
    count_once(trainer, before, [True, True])
    assert trainer._stored_metrics == {"train": {"rewards/chosen": [5.0, 1.5]}, "eval": {"x": [1.0, 7.0, 8.0]}}


# Trainers that generate their own batches: refused at construction, before they build anything.
@pytest.mark.parametrize("parent", [GRPOTrainer, RLOOTrainer, "OnlineDPOTrainer"])
def test_online_trainers_are_refused_at_construction(parent):
    if parent == "OnlineDPOTrainer":
        from trl.experimental.online_dpo import OnlineDPOTrainer as parent
    cls = type("NSOOnline", (NSOMixin, parent), {})
    with pytest.raises(ValueError, match=rf"cannot wrap {parent.__name__}: its input preparation is stateful"):
        cls(model="never-loaded", args=None)
