"""Tiny models of the architecture matrix (tests/test_architectures.py), built offline from configs.

Each entry gives a model builder (seeded, in train mode, with its randomness switched on: dropout,
LayerDrop, SpecAugment, router jitter), a few examples, the parent trainer class and what its arguments
need. Shapes are the smallest that exercise each model's own code paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from helpers import tiny_llama

VOCAB = 32
SEQ = 8
N = 12  # examples: three steps of batch 4


@dataclass(frozen=True)
class Architecture:
    """One row of the matrix."""

    name: str
    build: Callable[[], nn.Module]
    examples: Callable[[], list[dict[str, Any]]]
    parent: type = Trainer
    arguments: type = TrainingArguments
    collator: Callable | None = None
    note: str = ""  # what the row exercises
    extra_args: dict[str, Any] = field(default_factory=dict)


def _ids(seed: int, n: int = N, seq: int = SEQ, low: int = 3) -> torch.Tensor:
    return torch.randint(low, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _pixels(seed: int, n: int = N, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _labels(seed: int, classes: int, n: int = N) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def causal_lm_examples() -> list[dict[str, Any]]:
    ids = _ids(1)
    return [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in ids]


def llama() -> nn.Module:
    return tiny_llama(seed=0, dropout=0.2, vocab_size=VOCAB, max_positions=SEQ)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def classification_examples() -> list[dict[str, Any]]:
    ids, labels = _ids(2), _labels(3, 3)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": y} for r, y in zip(ids, labels)]


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def seq2seq_examples() -> list[dict[str, Any]]:
    src, tgt = _ids(4), _ids(5, seq=4)
    return [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": t} for s, t in zip(src, tgt)]


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(config)


def resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config)


def image_examples() -> list[dict[str, Any]]:
    return [{"pixel_values": x, "labels": y} for x, y in zip(_pixels(6), _labels(7, 3))]


def wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, mask_time_prob=0.3, mask_time_length=2, mask_feature_prob=0.2,
        mask_feature_length=2, layerdrop=0.3, hidden_dropout=0.1, pad_token_id=0, ctc_zero_infinity=True,
        ctc_loss_reduction="mean",
    )  # fmt: skip
    return Wav2Vec2ForCTC(config)


def speech_examples() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(8)
    audio = torch.randn(N, 400, generator=g)
    return [{"input_values": a, "labels": t} for a, t in zip(audio, _ids(9, seq=5))]


def clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2, attention_dropout=0.2,
    )  # fmt: skip
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, attention_dropout=0.2)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


def clip_examples() -> list[dict[str, Any]]:
    ids = _ids(10)
    ids[:, -1] = 2  # the text tower pools at the end-of-text token
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "pixel_values": x} for r, x in zip(ids, _pixels(11))]


def clip_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {k: torch.stack([f[k] for f in features]) for k in features[0]}
    return {**batch, "return_loss": True}


def mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ,
        output_router_logits=True, router_aux_loss_coef=0.05, router_jitter_noise=0.1, attention_dropout=0.2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = MixtralForCausalLM(config)
    model.config._attn_implementation = "eager"  # attention dropout applies there
    return model


ARCHITECTURES: list[Architecture] = [
    Architecture("llama", llama, causal_lm_examples, note="causal LM, attention dropout"),
    Architecture("gpt2", gpt2, causal_lm_examples, note="causal LM, dropout"),
    Architecture("bert", bert, classification_examples, note="sequence classification, dropout"),
    Architecture(
        "t5", t5, seq2seq_examples, parent=Seq2SeqTrainer, arguments=Seq2SeqTrainingArguments,
        note="encoder-decoder through NSOMixin on Seq2SeqTrainer",
    ),  # fmt: skip
    Architecture("vit", vit, image_examples, note="image classification, dropout"),
    Architecture("resnet", resnet, image_examples, note="image classification, BatchNorm running statistics"),
    Architecture("wav2vec2", wav2vec2, speech_examples, note="CTC, SpecAugment (numpy), LayerDrop (torch)"),
    Architecture("clip", clip, clip_examples, collator=clip_collator, note="contrastive, return_loss"),
    Architecture("mixtral", mixtral, causal_lm_examples, note="mixture of experts, router aux loss, router jitter"),
]
