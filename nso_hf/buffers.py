"""Registered buffers a forward changes, replayed across the passes of a micro-batch.

A training forward may write buffers: BatchNorm's `running_mean`, `running_var` and
`num_batches_tracked`, an EMA codebook, a cache it replaces. Trainer runs one forward per micro-batch,
the step runs several, so each pass starts from the buffers as they were before the micro-batch, and
the micro-batch ends with exactly one update:

- **A pass at W in the plan** (SAM's/ASAM's ascent pass, or the clean pass when unperturbed_weight > 0):
  that pass's update, which is the update plain training makes (davda54/sam switches BatchNorm's
  statistics off in its second pass for the same reason).
- **Otherwise** the gradient-weighted mean of the counted passes' results,
  B_1 + sum_{i>1} w_i (B_i - B_1) / sum_i w_i, formed in float32 (float64 stays float64) and rounded
  once into the buffer's dtype, and B_1 itself wherever every pass agrees: so at sigma = 0 it is
  Trainer's update bit for bit, whatever the number of passes. For two-point NSO it differs from the
  update at W by O(sigma^2): the first-order terms of W + U and W - U cancel, as in the gradient.
  (The paper's code instead freezes BatchNorm's statistics in its perturbed passes; it always runs a
  clean pass, whose update it keeps.)
- **Non-floating buffers** (counters such as `num_batches_tracked`): the value the kept pass leaves
  (at W, else the first counted pass), i.e. the value one plain pass leaves.
- **A buffer the forward replaces or registers** (a cache): the object the kept pass left.

Passes dropped as non-finite (`nonfinite_loss='skip'`) do not count; when none counts and no pass is
at W, the buffers stay as they were before the micro-batch (the micro-batch is dropped).

Which buffers change is learned on the first micro-batch, which copies every buffer once and compares
values after its first pass (a version counter alone is not enough: torch 2.13's CPU BatchNorm kernel
updates `running_mean`/`running_var` in place without bumping their `_version`). From then on only the
learned buffers are copied, plus torch's BatchNorm/InstanceNorm running statistics, always (a layer
that LayerDrop skipped in the first micro-batch still updates them later); a buffer outside the set
that a later forward changes is noticed through its version counter or a replaced object, warned once,
and copied from the next micro-batch on (in that micro-batch its passes were not replayed). A buffer a
native kernel changes in place without a version bump, outside torch's norm layers and not changed in
the first micro-batch, would go unnoticed.

Cost per micro-batch (several passes; none for a one-pass plan such as method 'none'): one copy of the
changed buffers (the state each pass starts from) and one of the kept pass's result, each a flat tensor
per dtype and device, so every copy is one multi-tensor op; a weighted mean over two or more counted
passes adds a float32 running sum and, per pass, a temporary gather. Nothing for a model whose forward
changes no buffer (after the first micro-batch). Per pass, one look at every module's buffer table and
every buffer's version counter (Python, no device work). Measured for transformers' ResNet-50
(`ResNetConfig()`: 23.5M weights, 159 buffers, 53,120 running-statistic floats = 0.2 MiB), one thread
on the 2-core CPU: 3.0-5.6 ms of bookkeeping per two-pass micro-batch, against 142-158 ms for one
forward without gradient at batch 8 x 3 x 64 x 64 (three runs; docs/methods.md, "Buffers and generators").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from nso_hf.compat import natively_updated_buffers

logger = logging.getLogger(__name__)


def accumulate_difference(
    total: torch.Tensor | None, result: torch.Tensor, reference: torch.Tensor, weight: float
) -> torch.Tensor:
    """total + weight * (result - reference), in float32 at least: one term of the weighted mean.

    Args:
        total: the running sum (None before the first term).
        result: B_i, a pass's buffer value.
        reference: B_1, the first counted pass's value.
        weight: w_i, the pass's gradient weight.

    Returns:
        The running sum, float32 (float64 when the buffer is float64).
    """
    wide = torch.promote_types(result.dtype, torch.float32)
    term = (result.to(wide) - reference.to(wide)) * weight
    return term if total is None else total.add_(term)


def weighted_mean(reference: torch.Tensor, total: torch.Tensor | None, weight_sum: float) -> torch.Tensor:
    """B_1 + total / weight_sum rounded once into B_1's dtype; exactly B_1 wherever `total` is 0.

    Args:
        reference: B_1, the first counted pass's value (floating point).
        total: sum_{i>1} w_i (B_i - B_1) from `accumulate_difference` (None: one pass counted).
        weight_sum: sum_i w_i over the counted passes, B_1's included.

    Returns:
        A new tensor shaped and typed like `reference`. Where every pass agreed (total 0, e.g. sigma = 0)
        it holds B_1's bits, so a zero-strength step reproduces Trainer's update exactly.
    """
    if total is None:
        return reference.clone()
    mean = (reference.to(total.dtype) + total / weight_sum).to(reference.dtype)
    return torch.where(total == 0, reference, mean)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version  # inference tensors have no version counter (nor in-place writes)


def _same_table(table: dict[str, torch.Tensor | None], saved: dict[str, torch.Tensor | None]) -> bool:
    return table.keys() == saved.keys() and all(table[k] is v for k, v in saved.items())


class _Group:
    """Buffers of one dtype and device, copied to and from flat tensors: each copy is one multi-tensor op.

    (A model has many small buffers, e.g. ResNet-50 has 159: one op per buffer per copy would be
    thousands of kernel launches per micro-batch.)
    """

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        self.sizes = [t.numel() for t in tensors]
        self.reshape = [(i, t.shape) for i, t in enumerate(tensors) if t.dim() != 1]  # 1-D pieces need no view
        self.floating = tensors[0].is_floating_point()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        pieces = list(flat.split(self.sizes))
        for i, shape in self.reshape:
            pieces[i] = pieces[i].view(shape)
        return pieces

    def gather(self, values: list[torch.Tensor] | None = None) -> torch.Tensor:
        """A new flat tensor holding the buffers' current values (or `values`, shaped like them)."""
        t = self.tensors[0]
        flat = torch.empty(sum(self.sizes), dtype=t.dtype, device=t.device)
        torch._foreach_copy_(self.views(flat), self.tensors if values is None else values)
        return flat

    def scatter(self, flat: torch.Tensor) -> None:
        """Write `flat` back into the buffers, in place (their objects, and so DDP's references, stay)."""
        torch._foreach_copy_(self.tensors, self.views(flat))


def _groups(tensors: list[torch.Tensor]) -> list[_Group]:
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    return [_Group(ts) for ts in by_kind.values()]


class BufferTracker:
    """Which buffers (module, name) a training forward changes, learned on the first micro-batch of a model.

    Held by the trainer across micro-batches; `replay` starts the bookkeeping of one micro-batch.
    """

    def __init__(self) -> None:
        self.model_id: int | None = None
        self.changing: set[tuple[int, str]] | None = None  # None: not learned yet for this model
        self.warned: set[tuple[int, str]] = set()

    def replay(self, model: nn.Module, at_w: Sequence[bool], weights: Sequence[float]) -> BufferReplay:
        """Start one micro-batch: snapshot the buffers (call before its first pass, after any buffer broadcast).

        Args:
            model: the module the passes run (wrappers such as DDP included).
            at_w: per pass, whether it runs at W (its update is then the one kept).
            weights: per pass, its gradient weight (the weights of the mean).
        """
        if self.model_id != id(model):
            self.model_id, self.changing, self.warned = id(model), None, set()
        return BufferReplay(model, self, at_w, weights)


class BufferReplay:
    """The buffers of one micro-batch: each pass starts from them, and they end with one documented update.

    Call `after_pass(i, counted)` after every pass, `finish()` after the last, or `abort()` if a pass
    raised (the buffers go back to the state before the micro-batch).
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, tracker: BufferTracker, at_w: Sequence[bool], weights: Sequence[float]):
        self.tracker = tracker
        self.keep = next((i for i, a in enumerate(at_w) if a), None)  # the pass at W whose update is kept
        self.weights = list(weights)
        self.modules = list(model.modules())
        self.tables = [dict(m._buffers) for m in self.modules]  # buffer objects before the micro-batch (no copy)
        self.learning = tracker.changing is None
        # Each buffer object once, with its (module, name) (a buffer registered twice is one tensor).
        self.slots: dict[int, tuple[nn.Module, str, torch.Tensor]] = {}
        for m, table in zip(self.modules, self.tables):
            for name, t in table.items():
                if t is not None and id(t) not in self.slots:
                    self.slots[id(t)] = (m, name, t)
        self.native = {(id(m), n) for m in self.modules for n in natively_updated_buffers(m)}
        copied = [k for k in self.slots if self.learning or self._key(k) in tracker.changing or self._key(k) in self.native]
        self._copy(copied)
        self.versions = {k: _version(t) for k, (_, _, t) in self.slots.items()}
        self.reference: list[torch.Tensor] = []  # per group: the kept pass's (or the first counted pass's) values
        self.totals: list[torch.Tensor | None] = []  # per group: sum_{i>1} w_i (B_i - B_1), floating groups
        self.weight_sum = 0.0
        self.kept_tables: dict[int, dict[str, torch.Tensor | None]] = {}  # tables the kept pass changed
        self.has_reference = False
        self.done = False

    def _key(self, k: int) -> tuple[int, str]:
        return id(self.slots[k][0]), self.slots[k][1]

    def _copy(self, keys: list[int], values: dict[int, torch.Tensor] | None = None) -> None:
        """The state every pass starts from: one flat copy per dtype and device of the buffers in `keys`.

        `values`: what to copy, by buffer id (default: the buffers' current values).
        """
        self.copied = set(keys)
        self.groups = _groups([self.slots[k][2] for k in keys])
        self.backup = [g.gather(None if values is None else [values[id(t)] for t in g.tensors]) for g in self.groups]

    def _saved(self) -> dict[int, torch.Tensor]:
        """The copy every pass starts from, by buffer id (views into the flat copies)."""
        return {id(t): v for g, flat in zip(self.groups, self.backup) for t, v in zip(g.tensors, g.views(flat))}

    @torch.no_grad()
    def after_pass(self, index: int, counted: bool = True) -> None:
        """Record pass `index`'s result where the rule needs it, then put the buffers back as before the micro-batch.

        Args:
            index: the pass's position in the plan.
            counted: False for a pass dropped as non-finite (its update is ignored).
        """
        learn = self.learning and index == 0
        changed = self._changed_in_place(compare_values=learn)
        if learn:
            self._learn(changed)
        tables = [j for j, m in enumerate(self.modules) if not _same_table(m._buffers, self.tables[j])]
        role = self._role(index, counted)
        if role == "reference":
            self.reference = [g.gather() for g in self.groups]
            self.totals = [None] * len(self.groups)
            self.weight_sum = self.weights[index]
            self.kept_tables = {j: dict(self.modules[j]._buffers) for j in tables}
            self.has_reference = True
        elif role == "term":
            for i, g in enumerate(self.groups):
                if g.floating:
                    self.totals[i] = accumulate_difference(self.totals[i], g.gather(), self.reference[i], self.weights[index])
            self.weight_sum += self.weights[index]
        self._restore(tables)

    def _role(self, index: int, counted: bool) -> str | None:
        if self.keep is not None:
            return "reference" if index == self.keep else None
        if not counted:
            return None
        return "term" if self.has_reference else "reference"

    def _changed_in_place(self, compare_values: bool) -> list[int]:
        """Buffers the pass wrote in place: a version bump, or (when learning) a value that differs from the copy."""
        before = self._saved() if compare_values else {}  # learning: every buffer was copied
        changed = []
        for k, (m, name, t) in self.slots.items():
            if _version(t) != self.versions[k] or (compare_values and not torch.equal(t, before[k])):
                changed.append(k)
                if k not in self.copied:
                    self._unexpected(m, name)
        return changed

    def _learn(self, changed: list[int]) -> None:
        """After the first pass of the first micro-batch: keep copies of the changed buffers only (and norm statistics)."""
        self.tracker.changing = {self._key(k) for k in changed}
        keep = [k for k in self.slots if k in changed or self._key(k) in self.native]
        self._copy(keep, values=self._saved())  # the values before the pass, not the pass's result

    def _unexpected(self, module: nn.Module, name: str) -> None:
        key = (id(module), name)
        self.tracker.changing.add(key)
        if key not in self.tracker.warned:
            self.tracker.warned.add(key)
            logger.warning(
                "The buffer %r of %s was first changed by a forward after the first micro-batch: in this micro-batch "
                "its passes were not replayed (each started from the one before); it is copied and replayed from the "
                "next micro-batch on.",
                name,
                type(module).__name__,
            )

    def _restore(self, tables: list[int]) -> None:
        for g, flat in zip(self.groups, self.backup):
            g.scatter(flat)
        for j in tables:
            self.modules[j]._buffers.clear()
            self.modules[j]._buffers.update(self.tables[j])
        self.versions = {k: _version(t) for k, (_, _, t) in self.slots.items()}

    @torch.no_grad()
    def finish(self) -> None:
        """Write the kept update (after the last pass): the pass at W's, or the weighted mean of the counted passes."""
        for g, ref, total in zip(self.groups, self.reference, self.totals):
            g.scatter(ref if total is None else weighted_mean(ref, total, self.weight_sum))
        for j, table in self.kept_tables.items():
            self.modules[j]._buffers.clear()
            self.modules[j]._buffers.update(table)
        self.done = True

    @torch.no_grad()
    def abort(self) -> None:
        """A pass raised: every buffer back to its state before the micro-batch (a no-op once finished)."""
        if not self.done:
            self._restore(list(range(len(self.modules))))
            self.done = True
