"""PNG figures with matplotlib's Agg backend (no display needed): slices, histograms, the gamma fit."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hpcdiff.stats.gammafit import GammaFit  # noqa: E402


def orthogonal_slices(
    volume: np.ndarray, path: Path, title: str, symmetric: bool = False, cmap: str | None = None
) -> None:
    """Three orthogonal slices through the voxel of largest |value| (the centre if all zero), one colour bar.

    Args:
        volume: map on the grid, shape (D, H, W).
        symmetric: centre the colour scale on 0 (signed maps such as t or z).
    """
    v = np.nan_to_num(np.asarray(volume, dtype=np.float64))
    peak = np.unravel_index(np.argmax(np.abs(v)), v.shape) if np.any(v) else tuple(n // 2 for n in v.shape)
    lim = float(np.max(np.abs(v))) or 1.0
    vmin, vmax = (-lim, lim) if symmetric else (float(v.min()), float(v.max()) or 1.0)
    cmap = cmap or ("RdBu_r" if symmetric else "gray")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), constrained_layout=True)
    for axis, ax in enumerate(axes):
        image = np.take(v, peak[axis], axis=axis)
        shown = ax.imshow(image.T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(f"axis {axis} = {peak[axis]}")
        ax.axis("off")
    fig.colorbar(shown, ax=axes, shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def histogram(values: np.ndarray, path: Path, title: str, xlabel: str, bins: int = 80, ylabel: str = "voxels") -> None:
    v = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    ax.hist(v[np.isfinite(v)], bins=bins, color="steelblue")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def gamma_fit_plot(values: np.ndarray, fit: GammaFit, path: Path, title: str) -> None:
    """Density histogram of positive ``values`` with the fitted gamma pdf over it."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    ax.hist(v, bins=80, density=True, color="lightgray", label="voxels")
    x = np.linspace(0, np.quantile(v, 0.999), 400)
    ax.plot(x, fit.pdf(x), color="crimson", label=f"gamma k={fit.shape:.3g}, scale={fit.scale:.3g}")
    ax.set(title=f"{title}\nKS D={fit.ks_statistic:.3g}", xlabel="residual variance", ylabel="density")
    ax.legend()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def scatter(x: np.ndarray, y: np.ndarray, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Voxel-by-voxel scatter of two maps with the identity line."""
    ok = np.isfinite(x) & np.isfinite(y)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    ax.scatter(x[ok], y[ok], s=2, alpha=0.3)
    lim = float(np.max(np.abs(np.concatenate([x[ok], y[ok]])))) if ok.any() else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="crimson", lw=1)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.savefig(path, dpi=80)
    plt.close(fig)
