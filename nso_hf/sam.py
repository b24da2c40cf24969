"""SAM's and ASAM's ascent step: the offset e the second pass of a SAM step is taken at.

    SAM  (Foret et al.):           e = rho * g / ||g||
    ASAM (Kwon et al., adaptive):  e = rho * (w * w * g) / || |w| * g ||

with element-wise products and the norm over all perturbed tensors together, as in davda54/sam's
`first_step` (including its 1e-12 guard in the denominator). g is the gradient at W of this rank's
micro-batch; the trainer moves the weights to W + e through `Perturbation.move_to` and back by copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# davda54/sam adds this to the norm; kept so that the two agree to the last bit on the same inputs.
NORM_GUARD = 1e-12


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32, or float64 when it is float64: the ascent is formed in at least float32."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


@torch.no_grad()
def sam_perturbation(
    grads: Sequence[torch.Tensor],
    rho: float,
    weights: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor] | None:
    """The ascent offset e of SAM (weights None) or ASAM (weights given).

    Args:
        grads: g, one tensor per perturbed parameter (zeros for a parameter the loss does not reach).
        rho: the radius, >= 0.
        weights: ASAM only: w, the parameters' values, shaped like `grads`.

    Returns:
        e, one tensor per parameter in float32 (float64 for float64 inputs), with
        ||e|| = rho for SAM and || e / |w| || = rho for ASAM (up to the 1e-12 guard); None when the
        (weighted) gradient is zero or not finite, where no ascent direction exists. One host sync
        (the norm is read to decide that).
    """
    if weights is not None and len(weights) != len(grads):
        raise ValueError(f"sam_perturbation: {len(weights)} weights for {len(grads)} gradients.")
    if not grads:
        return None
    g = [_wide(t) for t in grads]
    w = None if weights is None else [_wide(t) for t in weights]
    # ||g|| over all tensors; ASAM weights the gradient by |w| inside the norm: || |w| * g ||.
    norm = torch.stack([(t if w is None else t * w[i].abs()).norm(2).double() for i, t in enumerate(g)]).norm(2)
    if not torch.isfinite(norm) or norm.item() == 0.0:
        return None
    coef = rho / (norm + NORM_GUARD)  # rho / ||g||
    # SAM: e = rho g / ||g||;  ASAM: e = rho w^2 g / || |w| g ||.
    return [t * coef.to(t.dtype) * (1.0 if w is None else w[i].pow(2)) for i, t in enumerate(g)]
