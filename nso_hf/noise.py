"""Noise on the perturbed parameters, offsets along given directions, and their exact restore.

The invariant of this file: after `Perturbation.restore()` every parameter holds the bits it held
when the `Perturbation` was created, in every dtype. Restore is a copy from a saved backup, never a
subtraction (in bf16, W + U - U != W). The backup is the only parameter-sized copy held: the noise
is drawn straight into the parameters, and W - U is the reflection 2W - (W + U) of the point just
visited, which costs one pass over memory instead of a second draw.

Every move of the weights goes through `Perturbation`: NSO's training noise (`apply`), and the
deterministic offsets W + sum_k c_k D_k of the flatness measures (`move_to`: a landscape point, the
two points of a finite-difference Hessian-vector product, noise stability's draws through `apply`).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

# Prefixes that wrappers add to parameter names (DDP, FSDP, activation checkpointing, torch.compile).
# Include/exclude patterns are matched against the user-facing name with these removed.
_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def draw_seed(seed: int, global_step: int, micro_step: int, rank: int, draw: int, tensor: int) -> int:
    """Seed of the noise of one tensor in one draw, a pure function of where it happens in training.

    Args:
        seed: the run's noise seed.
        global_step: optimizer steps taken so far (`TrainerState.global_step`).
        micro_step: index of the micro-batch inside its gradient-accumulation window.
        rank: data-parallel rank (0 on every rank when the noise is shared).
        draw: index j of the draw, 0 <= j < k.
        tensor: index of the parameter among the perturbed ones (each tensor has its own stream,
            so its noise does not depend on the other tensors' sizes or devices).

    Returns:
        A 63-bit seed. Hashing (not adding) the fields keeps nearby steps' draws independent.
    """
    packed = struct.pack("<6q", seed, global_step, micro_step, rank, draw, tensor)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def clean_parameter_name(name: str) -> str:
    """Strip wrapper prefixes so patterns match the names a user sees on the bare model."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        name = name.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")
    return name


def filter_parameters(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    trainable_only: bool = True,
    label: str = "include/exclude",
) -> list[tuple[str, nn.Parameter]]:
    """Floating-point parameters filtered by name; the selection rule of NSO and of the flatness measures.

    Args:
        named_parameters: `model.named_parameters()` (wrapper prefixes are removed from the names).
        include: regexes; if given, a name must match one (re.search).
        exclude: regexes; a name matching one is left out.
        trainable_only: keep only parameters with `requires_grad`.
        label: how the patterns are named in the error message.

    Returns:
        `(clean_name, parameter)` pairs in model order; a tied parameter appears once.

    Raises:
        ValueError: a pattern does not compile.
    """
    try:
        inc = [re.compile(p) for p in include or ()]
        exc = [re.compile(p) for p in exclude or ()]
    except re.error as err:
        raise ValueError(f"{label}: bad regular expression: {err}") from err
    selected, seen = [], set()
    for name, param in named_parameters:
        if id(param) in seen or (trainable_only and not param.requires_grad) or not param.is_floating_point():
            continue
        seen.add(id(param))  # tied weights appear once
        clean = clean_parameter_name(name)
        if inc and not any(p.search(clean) for p in inc):
            continue
        if any(p.search(clean) for p in exc):
            continue
        selected.append((clean, param))
    return selected


def select_parameters(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """Parameters to perturb: trainable ones, filtered by name.

    Args:
        named_parameters: `model.named_parameters()`.
        include: regexes; if given, a name must match one (re.search).
        exclude: regexes; a name matching one is left out.

    Returns:
        `(clean_name, parameter)` pairs in model order (the order fixes which noise each one gets).

    Raises:
        ValueError: a pattern does not compile, or nothing is left to perturb.
    """
    named = list(named_parameters)
    selected = filter_parameters(named, include, exclude, label="NSOConfig.perturb_include/perturb_exclude")
    if not selected:
        trainable = len(filter_parameters(named))
        raise ValueError(
            f"NSO found no parameter to perturb ({trainable} trainable parameters, include={list(include or [])}, "
            f"exclude={list(exclude or [])}). Check requires_grad and the perturb_include/perturb_exclude patterns."
        )
    return selected


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The storage this rank owns for `param`: what the noise is written into.

    DeepSpeed ZeRO-3 keeps the rank's partition in `ds_tensor`; a forward gathers the partitions into
    `param.data`, which is empty outside forward except for parameters ZeRO-3 keeps gathered
    (`Perturbation`'s `after_move` hook brings those copies in line). FSDP2 parameters are DTensors
    whose local shard is `to_local()`. Everything else (plain, DDP, ZeRO-1/2, FSDP1 with
    use_orig_params, whose parameters are flat local shard views) is `data`.
    """
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    data = param.data
    if hasattr(data, "to_local"):
        return data.to_local()
    return data


def is_sharded(param: torch.Tensor) -> bool:
    """True when `param` holds only this rank's shard (ZeRO-3 or FSDP2 DTensor)."""
    return hasattr(param, "ds_tensor") or hasattr(param.data, "to_local")


def relative_scale(param: torch.Tensor) -> torch.Tensor:
    """The multiplier of sigma for relative noise: each output row's RMS, shaped like the local tensor.

    Works where rows are whole on every rank: unsharded parameters, and FSDP2's dim-0 shards (a 1-D
    FSDP2 parameter is one row spread over the ranks, so its RMS sums the squares of every shard:
    one small all-reduce, which every rank runs for the same tensors in the same order).

    Raises:
        ValueError: a partitioned ZeRO-3 parameter, or an FSDP2 parameter sharded along another dim.
            (FSDP1's flat shards carry no mark of their own: the trainer refuses those.)
    """
    if hasattr(param, "ds_tensor"):
        raise ValueError(
            "noise_scale='relative' needs whole rows, but DeepSpeed ZeRO-3 partitions this parameter into flat "
            "pieces. Use noise_scale='absolute', or ZeRO-2 / FSDP2 (which keep rows whole)."
        )
    data = param.data
    if not hasattr(data, "to_local"):
        return row_rms(data)
    shard_dims = [(i, pl.dim) for i, pl in enumerate(data.placements) if pl.is_shard()]
    if any(dim != 0 for _, dim in shard_dims):
        raise ValueError(
            f"noise_scale='relative' needs whole rows, but this FSDP2 parameter is sharded along dims "
            f"{[d for _, d in shard_dims]}. Shard along dim 0 (FSDP2's default) or use noise_scale='absolute'."
        )
    local = data.to_local()
    if data.dim() >= 2 or not shard_dims:
        return row_rms(local)
    total = local.detach().float().pow(2).sum().reshape(1)
    for mesh_dim, _ in shard_dims:
        torch.distributed.all_reduce(total, group=data.device_mesh.get_group(mesh_dim))
    return (total / max(data.numel(), 1)).sqrt().reshape(())


def row_rms(tensor: torch.Tensor) -> torch.Tensor:
    """Per-output-row RMS of a weight, shaped to broadcast against it.

    Rows are along dim 0 (the output features of nn.Linear/Embedding weights); a 1-D tensor
    (bias, norm weight) is one row. Computed in float32.
    """
    t = tensor.detach().float()
    if t.dim() <= 1:
        return t.pow(2).mean().sqrt()  # a 0-d tensor broadcasts against any shape
    return t.pow(2).mean(dim=tuple(range(1, t.dim())), keepdim=True).sqrt()


class Perturbation:
    """Moves a fixed set of parameters to W + s * U and back to W, exactly.

    Create it right before the passes of a micro-batch (it snapshots W), call `apply(sign, seeds)`
    before each perturbed pass and `restore()` after the last one (in a `finally`). `move_to`
    moves to W + sum_k c_k D_k along given directions instead of random noise.

    Every write goes to `local_tensor(param)`: this rank's shard under FSDP2 (DTensor) or ZeRO-3
    (`ds_tensor`), the whole tensor otherwise; directions given to `move_to` are shaped like it.

    Cost: one backup copy of the perturbed parameters (in their own dtype); per draw, one Gaussian
    sample per weight and two passes over memory (W + U, then 2W - (W + U)); per `move_to`, one
    pass over memory per direction. With relative noise, the row RMS of each tensor is computed
    once, at creation (one scalar per row).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        sigma: float,
        relative: bool,
        after_move: Callable[[], None] | None = None,
        scales: Sequence[torch.Tensor] | None = None,
    ):
        """Args:
        params: the parameters to move (their local storage, see `local_tensor`).
        sigma: the noise standard deviation (times the row RMS when `relative`).
        relative: scale each row's noise by that row's RMS.
        after_move: called after every change of the parameters' values (an engine that keeps
            another copy of them, such as ZeRO-3's gathered parameters, refreshes it there).
        scales: with `relative`, the multipliers of sigma to use instead of each parameter's own row
            RMS, one per parameter, broadcastable against it (merged-space noise scales by the rows
            of W0 + s BA, not of W0).
        """
        self.params = list(params)
        self.sigma = float(sigma)
        self.relative = relative
        self.after_move = after_move
        with torch.no_grad():
            self.backup = [local_tensor(p).clone() for p in self.params]
            if relative and scales is not None:
                self.scales = list(scales)
            else:
                self.scales = [relative_scale(p) for p in self.params] if relative else None
        self._generators: dict[torch.device, torch.Generator] = {}
        # (sign, seeds, sigma) of the noise the parameters hold; None: they hold W; "moving": an apply
        # or move_to was cut short; "offset": a move_to point.
        self._at: tuple[int, tuple[int, ...], float] | str | None = None

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    @torch.no_grad()
    def apply(self, sign: int, seeds: Sequence[int], sigma: float | None = None) -> None:
        """Set every parameter to W + sign * U, the noise of tensor i drawn from `seeds[i]`.

        U ~ N(0, sigma^2), times the row RMS of W when relative. It is drawn in the parameter's
        own dtype, in place: no temporary the size of a parameter.

        Args:
            sign: +1 for W + U, -1 for W - U (a reflection when W + U with the same seeds is held).
            seeds: one seed per parameter.
            sigma: this draw's standard deviation; default: the one given at creation.
        """
        seeds = tuple(seeds)
        sigma = self.sigma if sigma is None else float(sigma)
        reflect_only = sign < 0 and self._at == (1, seeds, sigma)
        self._at = "moving"  # if a draw raises half-way, restore() still copies W back
        if not reflect_only:  # W - U right after W + U needs no new draw
            scales = self.scales or [None] * len(self.params)
            for target, saved, seed, scale in zip(map(local_tensor, self.params), self.backup, seeds, scales, strict=True):
                target.normal_(0.0, sigma, generator=self._generator(target.device, seed))
                if scale is not None:
                    target.mul_(scale.to(target.dtype))
                target.add_(saved)
        if sign < 0:
            # Reflect W + U through W: 2W - (W + U), exactly antithetic up to one rounding.
            for target, saved in zip(map(local_tensor, self.params), self.backup):
                target.neg_().add_(saved, alpha=2)
        self._at = (sign, seeds, sigma)
        if self.after_move is not None:
            self.after_move()

    @torch.no_grad()
    def move_to(self, coefficients: Sequence[float], directions: Sequence[Sequence[torch.Tensor]]) -> None:
        """Set every parameter to W + sum_k coefficients[k] * directions[k][i], from the backup.

        The point is computed from W, not from the point held before, so consecutive points carry no
        accumulated rounding, and each parameter is rounded once into its dtype: the sum is formed in
        float32 (float64 for float64 weights) when the parameter is in a lower precision, which costs a
        temporary the size of one tensor at a time. The uses: a landscape point W + a d1 + b d2, the
        two points W +- eps v of a finite-difference Hessian-vector product, SAM's ascent W + rho g/||g||.

        Args:
            coefficients: c_k, one per direction.
            directions: D_k, each one tensor per parameter, shaped like `local_tensor(param)` (this
                rank's shard when sharded); any floating dtype, any device (moved per tensor).

        Raises:
            ValueError: the numbers of coefficients and directions differ, or a direction has the
                wrong number of tensors.
        """
        coefficients = [float(c) for c in coefficients]
        if len(coefficients) != len(directions):
            raise ValueError(f"move_to: {len(coefficients)} coefficients for {len(directions)} directions.")
        for d in directions:
            if len(d) != len(self.params):
                raise ValueError(f"move_to: a direction has {len(d)} tensors for {len(self.params)} parameters.")
        self._at = "moving"  # if a move raises half-way, restore() still copies W back
        for i, (target, saved) in enumerate(zip(map(local_tensor, self.params), self.backup)):
            wide = target.dtype in (torch.float32, torch.float64)
            point = target.copy_(saved) if wide else saved.float()
            for c, d in zip(coefficients, directions):
                if c != 0.0:
                    point.add_(d[i].to(device=point.device, dtype=point.dtype), alpha=c)
            if not wide:
                target.copy_(point)  # the one rounding into the parameter's dtype
        self._at = "offset"
        if self.after_move is not None:
            self.after_move()

    @property
    def at_origin(self) -> bool:
        """True when the parameters hold W (nothing applied since creation or the last restore)."""
        return self._at is None

    @torch.no_grad()
    def restore(self) -> None:
        """Copy W back, bit for bit. A no-op when the parameters already hold W.

        The no-op matters: under DeepSpeed the step restores W inside the engine's own `step()` (which
        then writes the update into the parameters), and the `finally` that restores again afterwards
        must not copy the pre-step weights over that update.
        """
        if self._at is None:
            return
        for param, saved in zip(self.params, self.backup):
            local_tensor(param).copy_(saved)
        self._at = None
        if self.after_move is not None:
            self.after_move()
