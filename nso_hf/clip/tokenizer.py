"""A word-level caption tokenizer trained in milliseconds with the `tokenizers` library.

Lower-cased, split on whitespace and punctuation, wrapped as `<bos> words <eos>`. Ids:
`<pad>`=0, `<unk>`=1, `<bos>`=3, `<eos>`=4 and words from 5: eos is kept off id 2 because
`CLIPTextModel` treats `eos_token_id == 2` as a legacy config and pools at the largest id instead.
Id 2 holds `<mask>`, unused in training.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<bos>", "<eos>")


def build_word_tokenizer(captions: Iterable[str], max_length: int, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on captions.

    Args:
        captions: training captions (the vocabulary is every word seen `min_frequency` times).
        max_length: captions are truncated to this many tokens, bos and eos included (eos is kept).
        min_frequency: rarer words map to `<unk>`.

    Returns:
        A `PreTrainedTokenizerFast` that pads with `<pad>` and adds `<bos>`/`<eos>` to every caption.
    """
    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    trainer = WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency)
    tok.train_from_iterator(captions, trainer=trainer)
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )
