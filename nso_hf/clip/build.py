"""From parsed arguments to a `CLIPTask` and a model factory: data source, tokenizer, processor, model.

Three data sources (Hub dataset, local image folder, the embedded digits) and two model sources
(a preset built from a config, sized to a tokenizer trained on the train captions; or a pretrained
CLIP with its own tokenizer and image processor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from transformers import AutoTokenizer, CLIPModel

from nso_hf.clip.arguments import CLIPDataArguments, CLIPModelArguments
from nso_hf.clip.augment import Augment
from nso_hf.clip.collator import CLIPCollator
from nso_hf.clip.digits import CLASS_NAMES, ZERO_SHOT_TEMPLATES, load_digits_splits
from nso_hf.clip.label_noise import swap_captions
from nso_hf.clip.pipeline import CLIPTask
from nso_hf.clip.preprocessing import (
    image_processor_for_size,
    load_image_processor,
    preprocess_images,
)
from nso_hf.clip.presets import check_eos_id, clip_config_from_preset, preset_image_size
from nso_hf.clip.shift import rotated_split
from nso_hf.clip.sources import (
    class_names_of,
    load_hub_splits,
    load_image_folder_splits,
)
from nso_hf.clip.tokenizer import build_word_tokenizer

logger = logging.getLogger(__name__)


def build_task(model_args: CLIPModelArguments, data_args: CLIPDataArguments) -> tuple[CLIPTask, Callable[[], CLIPModel]]:
    """Load the data, build tokenizer, image processor and collator, and say how to make the model.

    The evaluation splits are those `data_args.eval_sources` names: the held-out split (`test`), the
    validation rows carved from the train split (`validation`), and rotated copies of either (`ood`,
    `ood_validation`; see `nso_hf.clip.shift`). `--validation_source` names the split scored during
    training (its first `--validation_samples` rows), and `--label_noise` relabels training rows
    (`nso_hf.clip.label_noise`) once every held-out split has been carved.

    Args:
        model_args, data_args: parsed arguments (`data_args.split_seed` fixes a carved-out held-out split).

    Returns:
        (task, make_model): `make_model()` returns a fresh model each call (random init for a preset).
    """
    d = data_args
    is_digits = d.dataset_name is None and d.image_folder is None
    label_column = d.label_column
    templates = tuple(d.zero_shot_templates or ("a photo of a {}",))
    if is_digits:
        train, held_out = load_digits_splits(d.eval_fraction, d.split_seed)
        label_column = label_column or "label"
        class_names: list[str] | None = list(d.class_names or CLASS_NAMES)
        templates = tuple(d.zero_shot_templates or ZERO_SHOT_TEMPLATES)
        if d.caption_column != "caption" or d.image_column != "image":
            raise ValueError("The embedded digits have columns 'image' and 'caption'; leave image_column/caption_column unset.")
    else:
        columns = [d.image_column, d.caption_column] + ([label_column] if label_column else [])
        if d.dataset_name is not None:
            train, held_out = load_hub_splits(
                d.dataset_name, d.dataset_config_name, d.train_split, d.eval_split, d.eval_fraction, d.split_seed, columns
            )
        else:
            train, held_out = load_image_folder_splits(d.image_folder, d.train_split, d.eval_split, d.eval_fraction, d.split_seed, columns)
        class_names = d.class_names or (class_names_of(train, label_column) if label_column else None)
        if label_column and class_names is None:
            raise ValueError(f"label_column={label_column!r} is not a ClassLabel: give the class names with --class_names.")
    validation = None
    if d.validation_fraction > 0:  # carved from the train rows, so no test row is ever used to choose anything
        parts = train.train_test_split(test_size=d.validation_fraction, seed=d.split_seed)
        train, validation = parts["train"], parts["test"]
    if d.max_train_samples is not None:
        train = train.select(range(min(d.max_train_samples, len(train))))
    # After every split is carved: only training rows are relabelled, evaluation data never. The tokenizer is
    # built from the clean captions: label noise must not change the vocabulary (runs at every p share it).
    clean_captions = train[d.caption_column]
    train, label_noise = swap_captions(train, d.label_noise, d.label_noise_seed, d.caption_column, label_column)
    if d.max_eval_samples is not None:
        held_out = held_out.select(range(min(d.max_eval_samples, len(held_out))))
        if validation is not None:
            validation = validation.select(range(min(d.max_eval_samples, len(validation))))
    evals = {}
    for source in d.eval_sources:  # CLIPDataArguments checked the names, and validation_fraction for the validation ones
        split = held_out if source in ("test", "ood") else validation
        evals[source] = rotated_split(split, d.image_column, d.ood_rotation) if source.startswith("ood") else split
    scored = None  # the rows scored during training: the first validation_samples of the validation source
    if d.validation_source is not None:
        scored = validation.select(range(min(d.validation_samples or len(validation), len(validation))))
        if d.validation_source == "ood_validation":
            scored = rotated_split(scored, d.image_column, d.ood_rotation)

    m = model_args
    if m.model_name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name or m.model_name_or_path)
        image_processor = load_image_processor(m.model_name_or_path)
        path = m.model_name_or_path

        def make_model() -> CLIPModel:
            return CLIPModel.from_pretrained(path)

    else:
        if m.tokenizer_name is not None:
            tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name)
        else:
            tokenizer = build_word_tokenizer(_captions(clean_captions), m.max_caption_length, m.min_word_frequency)
        check_eos_id(tokenizer.eos_token_id)
        side = m.image_size or preset_image_size(m.model_preset)
        image_processor = image_processor_for_size(side)
        config = clip_config_from_preset(
            m.model_preset,
            vocab_size=len(tokenizer),
            max_length=m.max_caption_length,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            image_size=side,
        )

        def make_model() -> CLIPModel:
            return CLIPModel(config)

    if is_digits or d.preprocess_images:
        # Once up front: the PIL processor costs about as much per batch as a tiny model's step.
        train = preprocess_images(train, image_processor, d.image_column)
        evals = {name: preprocess_images(split, image_processor, d.image_column) for name, split in evals.items()}
        if scored is not None:
            scored = preprocess_images(scored, image_processor, d.image_column)
    augment = (
        Augment(tuple(image_processor.image_mean), tuple(image_processor.image_std), crop_scale=(d.crop_scale_min, 1.0), hflip=d.hflip)
        if d.augment
        else None
    )
    collator = CLIPCollator(
        tokenizer=tokenizer,
        image_processor=image_processor,
        image_column=d.image_column,
        caption_column=d.caption_column,
        max_length=m.max_caption_length,
        augment=augment,
    )
    task = CLIPTask(
        train=train,
        evals=evals,
        collator=collator,
        class_names=class_names,
        templates=templates,
        label_column=label_column,
        extra_processors=[image_processor],
        validation=scored,
        validation_source=d.validation_source,
        label_noise=label_noise,
    )
    return task, make_model


def _captions(column: Iterable) -> Iterable[str]:
    for value in column:
        if isinstance(value, str):
            yield value
        else:
            yield from value
