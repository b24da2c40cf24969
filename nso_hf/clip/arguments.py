"""Command-line arguments of `scripts/pretrain_clip.py`, parsed by `HfArgumentParser` beside
`TrainingArguments` and `NSOConfig` (no field name is shared with those two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data_recipes.label_noise import check_label_noise
from nso_hf.clip.presets import PRESETS
from nso_hf.clip.trainers import METHODS
from nso_hf.flatness.final import FlatnessArguments
from nso_hf.robustness import RobustnessArguments

# The held-out splits a run can be evaluated on (`--eval_sources`); the ood ones are rotated copies.
EVAL_SOURCES = ("test", "validation", "ood", "ood_validation")
# The splits that may be scored during training (`--validation_source`): carved from the train rows, never test.
VALIDATION_SOURCES = ("validation", "ood_validation")


@dataclass
class CLIPModelArguments:
    model_preset: str = field(
        default="tiny",
        metadata={"help": "Size of a CLIP built from a config: tiny (CPU), small, base (ViT-B/32 shapes).", "choices": list(PRESETS)},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A pretrained CLIP id or folder; overrides model_preset and brings its own tokenizer and image processor."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Image side for a preset model (default: the preset's; tiny 32)."}
    )
    max_caption_length: int = field(
        default=16,
        metadata={"help": "Longest tokenized caption, bos and eos included; longer ones are cut (eos kept)."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "An existing tokenizer for a preset model; default: a word-level one trained on the train captions."},
    )
    min_word_frequency: int = field(
        default=1, metadata={"help": "Words seen fewer times in the train captions map to <unk>."}
    )

    def __post_init__(self) -> None:
        if self.model_preset not in PRESETS:
            raise ValueError(f"model_preset must be one of {PRESETS}, got {self.model_preset!r}.")
        if self.max_caption_length < 3:
            raise ValueError(f"max_caption_length must be >= 3 (bos, a word, eos), got {self.max_caption_length}.")


@dataclass
class CLIPDataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset with image and caption columns. Unset (and no image_folder): the embedded digits."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    image_folder: str | None = field(
        default=None,
        metadata={"help": "A local folder of images with metadata.jsonl or metadata.csv (file_name + caption columns)."},
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    caption_column: str = field(
        default="caption", metadata={"help": "Column holding a caption, or a list of captions (one is drawn per visit)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Integer class column for zero-shot accuracy (the digits default uses 'label')."}
    )
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Class names for zero-shot accuracy (default: the label column's ClassLabel names)."}
    )
    zero_shot_templates: list[str] | None = field(
        default=None, metadata={"help": "Zero-shot prompts with one '{}' for the class name (default: 'a photo of a {}')."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Held-out split; unset: hold out eval_fraction of the train split."}
    )
    eval_fraction: float = field(default=0.2, metadata={"help": "Share of the train split held out when there is no eval_split."})
    split_seed: int = field(
        default=0, metadata={"help": "Seed of that hold-out (kept apart from the training seed, so seeds share one test set)."}
    )
    validation_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the train rows held out as a validation split (seeded by split_seed; 0: none). "
                  "Needed to evaluate on validation or ood_validation, e.g. to choose a strength without the test split."},
    )
    eval_sources: list[str] = field(
        default_factory=lambda: ["test"],
        metadata={"help": f"Splits evaluated after training, any of {list(EVAL_SOURCES)}: test (the held-out split), "
                  "validation, and their out-of-distribution copies ood / ood_validation (every image rotated by "
                  "+-ood_rotation degrees, alternately). The first one's metrics are also the results' top-level keys."},
    )
    ood_rotation: float = field(
        default=30.0, metadata={"help": "Rotation in degrees of the out-of-distribution splits (training never rotates)."}
    )
    validation_source: str | None = field(
        default=None,
        metadata={"help": "Split scored during training (--eval_strategy steps|epoch) by zero-shot accuracy, logged as "
                  "eval_zero_shot_accuracy; with --load_best_model_at_end --metric_for_best_model zero_shot_accuracy it "
                  "chooses the final checkpoint. Needs --validation_fraction > 0.", "choices": list(VALIDATION_SOURCES)},
    )
    validation_samples: int | None = field(
        default=None,
        metadata={"help": "Validation images scored per evaluation during training (the first N; default all). The "
                  "--eval_sources are always scored in full at the end."},
    )
    label_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction p in [0, 1) of training images given the caption of another class (needs a class "
                  "column); the held-out splits are never changed."},
    )
    label_noise_seed: int = field(
        default=0, metadata={"help": "Seed of which rows --label_noise changes (apart from --seed: every run shares them)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many train rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many held-out rows."})
    preprocess_images: bool = field(
        default=False,
        metadata={"help": "Run the image processor once over the data before training (always on for the digits)."},
    )
    augment: bool = field(default=True, metadata={"help": "Random resized crop and brightness/contrast jitter (torch ops)."})
    crop_scale_min: float = field(default=0.7, metadata={"help": "Smallest share of the image area a random crop keeps."})
    hflip: bool = field(default=False, metadata={"help": "Also mirror images at random (off: mirrored digits are other symbols)."})

    def __post_init__(self) -> None:
        if self.dataset_name is not None and self.image_folder is not None:
            raise ValueError("Give dataset_name or image_folder, not both.")
        unknown = [s for s in self.eval_sources if s not in EVAL_SOURCES]
        if unknown or not self.eval_sources or len(set(self.eval_sources)) != len(self.eval_sources):
            raise ValueError(f"eval_sources must name distinct splits among {list(EVAL_SOURCES)}, got {self.eval_sources}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}.")
        if self.validation_fraction == 0.0 and {"validation", "ood_validation"} & set(self.eval_sources):
            raise ValueError("Evaluating on validation / ood_validation needs a validation split: set validation_fraction > 0.")
        if not math.isfinite(self.ood_rotation):
            raise ValueError(f"ood_rotation must be a finite number of degrees, got {self.ood_rotation!r}.")
        check_label_noise(self.label_noise)
        if self.validation_source is not None:
            if self.validation_source not in VALIDATION_SOURCES:
                raise ValueError(
                    f"--validation_source must be one of {list(VALIDATION_SOURCES)} (rows carved from the train split), "
                    f"got {self.validation_source!r}: the test split never chooses a checkpoint."
                )
            if self.validation_fraction == 0.0:
                raise ValueError(
                    f"--validation_source {self.validation_source} needs validation rows: set --validation_fraction > 0 "
                    "(e.g. 0.2)."
                )
        if self.validation_samples is not None and self.validation_samples < 1:
            raise ValueError(
                f"--validation_samples must be >= 1, got {self.validation_samples}: leave it unset to score the whole "
                "validation split."
            )


@dataclass
class CLIPRunArguments(FlatnessArguments, RobustnessArguments):
    # The method is NSOConfig's `--method` (one vocabulary for every script); `parse` in
    # scripts/pretrain_clip.py copies it here when it was given, else compare_methods are trained.
    # Not an argument of its own (init=False): HfArgumentParser would reject the clash with NSOConfig.
    method: str | None = field(default=None, init=False)
    compare_methods: list[str] = field(
        default_factory=lambda: ["none", "nso"],
        metadata={"help": f"Methods trained one after the other when --method is not given; any of {list(METHODS)}."},
    )
    gather_features: bool = field(
        default=False,
        metadata={
            "help": "Contrastive loss over the features of all ranks (more negatives). Needs the same NSO noise on every "
            "rank, so sync_noise_across_ranks is set to True (an explicit False is an error)."
        },
    )
    max_logit_scale: float = field(
        default=math.log(100.0), metadata={"help": "Upper bound of CLIP's log temperature, clamped after each optimizer step."}
    )
    save_final_model: bool = field(
        default=False, metadata={"help": "Save model, tokenizer and image processor to output_dir after training."}
    )

    def __post_init__(self) -> None:
        FlatnessArguments.__post_init__(self)
        RobustnessArguments.__post_init__(self)
        bad = [m for m in self.compare_methods if m not in METHODS]
        if bad:
            raise ValueError(f"compare_methods may hold {METHODS} only, got {bad}.")
        if len(set(self.compare_methods)) != len(self.compare_methods):
            raise ValueError(f"compare_methods repeats a method: {self.compare_methods}.")

    @property
    def methods(self) -> list[str]:
        return [self.method] if self.method is not None else list(self.compare_methods)
