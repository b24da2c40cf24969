"""Loss landscapes of several checkpoints in one PNG (needs matplotlib: `pip install nso-hf[flatness]`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def plot_landscapes(entries: Sequence[dict[str, Any]], path: str) -> None:
    """1-D curves of every checkpoint on one axis; a contour per checkpoint that has a 2-D surface.

    Args:
        entries: dicts with "label", "landscape_1d" ({alphas, losses}) and "landscape_2d"
            ({alphas, betas, losses} or None), as `flatness_report` writes them.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    surfaces = [e for e in entries if e["landscape_2d"] is not None]
    fig, axes = plt.subplots(1, 1 + len(surfaces), figsize=(5.5 * (1 + len(surfaces)), 4.2), squeeze=False)
    ax = axes[0][0]
    for e in entries:
        ax.plot(e["landscape_1d"]["alphas"], e["landscape_1d"]["losses"], marker=".", label=e["label"])
    ax.set_xlabel("step along a random filter-normalised direction")
    ax.set_ylabel("loss")
    ax.set_title("Loss landscape (1-D)")
    ax.legend()
    for ax, e in zip(axes[0][1:], surfaces):
        s = e["landscape_2d"]
        z = torch.tensor(s["losses"]).T.numpy()  # contour wants z[beta index, alpha index]
        contour = ax.contour(s["alphas"], s["betas"], z, levels=15)
        ax.clabel(contour, fontsize=7)
        ax.set_title(f"{e['label']} (2-D)")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
