"""`Recipe`: the one contract every dataset recipe follows.

`recipe.load(source)` returns a `datasets.Dataset` with the columns "question", "rationale" and
"answer" (normalised), whatever the source's own layout. Each recipe only says how one raw row
maps to those three fields (`parse_row`); reading files, naming bad rows and counting drops
happen here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from data_recipes.answers import ANSWER_KINDS, extract_answer, guess_answer_kind, is_answer_of_kind, normalize_answer
from data_recipes.sources import is_local_source, iter_rows

COLUMNS = ("question", "rationale", "answer")
BAD_ROW_POLICIES = ("raise", "drop")
# After the first answer of the wrong kind, this many further rows are read to tell a stray bad
# row from a file that needs another recipe (a few milliseconds for a local file).
KIND_SNIFF_ROWS = 1000


class RowError(ValueError):
    """A raw row that cannot become an example; `field` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason


class AnswerKindError(RowError):
    """A gold answer that is present but not of the recipe's kind; `raw` keeps it for the hint."""

    def __init__(self, field: str, reason: str, raw: Any) -> None:
        super().__init__(field, reason)
        self.raw = raw


def recipes_for_kind(kind: str) -> str:
    """Which recipes compare answers of `kind`, as advice: "--recipe strategyqa, or ..."."""
    from data_recipes import RECIPES  # the registry imports this module

    named = sorted(name for name, recipe in RECIPES.items() if recipe.answer_kind == kind and name != "synthetic")
    generic = f"--recipe cot_json or jsonl with --answer_kind {kind}"
    return f"--recipe {' or '.join(named)}, or {generic}" if named else generic


@dataclass
class LoadReport:
    """What `Recipe.load` kept and dropped from one source."""

    source: str
    kept: int = 0
    dropped: int = 0
    drop_reasons: list[str] = field(default_factory=list)


def require_text(row: dict[str, Any], name: str) -> str:
    """The non-empty string in `row[name]`, or a `RowError` naming the field."""
    if name not in row or row[name] is None:
        raise RowError(name, "missing")
    value = row[name]
    if not isinstance(value, str):
        value = str(value)
    if not value.strip():
        raise RowError(name, "empty")
    return value.strip()


class Recipe:
    """Base class: subclasses set `name`, `answer_kind`, `hub_config` and implement `parse_row`.

    Args:
        on_bad_row: "raise" (default) stops at the first bad row with an error naming the file,
            the row number and the field; "drop" skips bad rows and counts them in `last_report`.
    """

    name: ClassVar[str] = ""
    answer_kind: ClassVar[str] = "text"
    hub_config: ClassVar[str | None] = None

    def __init__(self, on_bad_row: str = "raise") -> None:
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}.")
        if self.answer_kind not in ANSWER_KINDS:
            raise ValueError(f"answer_kind must be one of {ANSWER_KINDS}, got {self.answer_kind!r}.")
        self.on_bad_row = on_bad_row
        self.last_report: LoadReport | None = None

    def parse_row(self, row: dict[str, Any]) -> dict[str, str]:
        """Map one raw row to {"question", "rationale", "answer"}; raise `RowError` if it cannot."""
        raise NotImplementedError

    def normalize_answer(self, answer: Any) -> str:
        """The gold answer in the form `extract_answer` produces, so exact match is meaningful."""
        return normalize_answer(answer, self.answer_kind)

    def extract_answer(self, text: str, strict: bool = False) -> str:
        """The normalised final answer of a generated rationale (see `data_recipes.answers`);
        `strict` requires a final-answer marker instead of falling back to the last candidate."""
        return extract_answer(text, self.answer_kind, strict=strict)

    def checked_answer(self, raw: Any, field_name: str) -> str:
        """Normalise `raw`; a `RowError` when it is missing, an `AnswerKindError` when it is not one
        well-formed answer of this recipe's kind (a list, "eighteen" for a number, "maybe" for yes/no)."""
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise RowError(field_name, "no final answer")
        if isinstance(raw, (list, tuple, dict)):
            raise AnswerKindError(
                field_name, f"expected one {self.answer_kind} answer, got a {type(raw).__name__}: {str(raw)[:60]!r}", raw
            )
        answer = self.normalize_answer(raw)
        if not is_answer_of_kind(answer, self.answer_kind):
            raise AnswerKindError(
                field_name, f"{str(raw)[:60]!r} is not an answer of kind {self.answer_kind!r}", raw
            )
        return answer

    def _kind_hint(self, wrong_kind: list[Any], rows_read: int) -> str:
        """" N of M rows ... look like yesno answers: use --recipe strategyqa ..." when most rows read
        miss the kind and fit another one; "" otherwise."""
        if not wrong_kind or len(wrong_kind) * 2 <= rows_read:
            return ""
        guess = guess_answer_kind(wrong_kind)
        if guess is None:  # no kind fits them either: bad rows, not the wrong recipe
            return ""
        return (
            f"; {len(wrong_kind)} of {rows_read} rows read have no {self.answer_kind} answer, so recipe "
            f"{self.name!r} does not fit this file; they look like {guess} answers: use {recipes_for_kind(guess)}"
        )

    def _sniff(self, rows: Any, wrong_kind: list[Any], rows_read: int) -> int:
        """Parse up to KIND_SNIFF_ROWS more rows, adding wrong-kind answers to `wrong_kind`; returns rows read."""
        for _, row in rows:
            if rows_read >= KIND_SNIFF_ROWS:
                break
            rows_read += 1
            try:
                self.parse_row(row)
            except AnswerKindError as error:
                wrong_kind.append(error.raw)
            except RowError:
                pass
        return rows_read

    def load(self, source: str, split: str = "train", max_samples: int | None = None):
        """Read `source` (a local .jsonl/.json/.parquet path or a Hub id) into a `datasets.Dataset`.

        Args:
            source: the file or Hub dataset id.
            split: the Hub split to read (ignored for local files).
            max_samples: keep at most this many good rows (None: all).

        Returns:
            A `datasets.Dataset` with columns "question", "rationale", "answer".
        """
        import datasets

        report = LoadReport(source=str(source))
        columns: dict[str, list[str]] = {name: [] for name in COLUMNS}
        origin = str(source) if is_local_source(str(source)) else f"{source} [{split}]"
        wrong_kind: list[Any] = []  # raw answers that are not of this recipe's kind
        rows = iter_rows(str(source), self.hub_config, split)
        rows_read = 0
        for number, row in rows:
            if max_samples is not None and report.kept >= max_samples:
                break
            rows_read += 1
            try:
                example = self.parse_row(row)
            except RowError as error:
                message = f"{origin}: row {number}: {error}"
                if isinstance(error, AnswerKindError):
                    wrong_kind.append(error.raw)
                if self.on_bad_row == "raise":
                    hint = ""
                    if isinstance(error, AnswerKindError):
                        hint = self._kind_hint(wrong_kind, self._sniff(rows, wrong_kind, rows_read))
                    # Dropping is no fix for a file that needs another recipe: only offer it for stray rows.
                    advice = hint or " (--on_bad_row drop / on_bad_row='drop' skips such rows)"
                    raise ValueError(message + advice) from error
                report.dropped += 1
                report.drop_reasons.append(message)
                continue
            for name in COLUMNS:
                columns[name].append(example[name])
            report.kept += 1
        self.last_report = report
        hint = self._kind_hint(wrong_kind, rows_read)
        if hint:
            # Dropping most of a file is not "a few bad rows": the recipe is the wrong one.
            raise ValueError(f"{origin}: {report.dropped} rows dropped{hint}.")
        if report.kept == 0 and max_samples != 0:
            detail = f"all {report.dropped} rows were bad, e.g. {report.drop_reasons[0]}" if report.dropped else "it has no rows"
            raise ValueError(f"{origin}: no examples to use ({detail}).")
        return datasets.Dataset.from_dict(columns)
