"""Figures a person would rather look at than read (written as PNG, logged to MLflow)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def k_selection(adata, path: Path) -> Path:
    c = adata.uns["nmf_consensus"]
    ks = np.asarray(c["k_values"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ("pac", "cophenetic", "delta_area"),
                              ("PAC (lower is better)", "cophenetic correlation", "delta area")):
        ax.plot(ks, c[key], "o-")
        ax.axvline(c["best_k"], color="crimson", ls="--", label=f"chosen K = {c['best_k']}")
        ax.set_xlabel("K")
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(adata, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [k_selection(adata, out_dir / "k_selection.png")]
