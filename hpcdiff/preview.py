"""Preview samples during training: every ``train.preview_every`` steps the EMA model draws a fixed set.

The set is the same at every preview: subject i's noise comes from a generator seeded by (seed, i) and its
covariates span each covariate's trained range (continuous ones evenly from min to max, categorical ones cycling
through their levels), so successive montages show the same subjects getting better. Rank 0 draws them with its
own generators, without gradients, with the global RNG state forked and restored, and gives the EMA its
train/eval mode back: the training stream (weights, optimizer, every logged loss) is the one a run without
previews has.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdiff.atomic import atomic_write
from hpcdiff.seeds import seed_for

log = logging.getLogger(__name__)

PREVIEW_SEED = -2
"""Counter that keeps the preview noise apart from every training draw (which use steps and stream positions)."""


@dataclass
class PreviewSet:
    """The fixed subjects a preview draws: their noise seeds, covariates and labels."""

    seeds: list[int]
    covariates: dict[str, list] | None
    labels: list[str]


def preview_set(schema: dict[str, dict], num: int, seed: int) -> PreviewSet:
    """``num`` subjects spanning the covariates of ``schema`` (a shards manifest's ``covariates`` entries).

    Categorical covariates count in mixed radix (the first changes fastest), so two levels of sex alternate;
    continuous ones rise from the trained minimum to the maximum (mean +- 2 std where the range is unknown).
    """

    columns: dict[str, list] = {}
    radix = 1
    for name, spec in schema.items():
        if spec.get("kind") == "categorical":
            levels = list(spec["levels"])
            columns[name] = [levels[(i // radix) % len(levels)] for i in range(num)]
            radix *= len(levels)
        else:
            mean, std = float(spec.get("mean", 0.0)), float(spec.get("std", 1.0))
            lo, hi = float(spec.get("min", mean - 2 * std)), float(spec.get("max", mean + 2 * std))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                lo, hi = mean - 2 * std, mean + 2 * std
            columns[name] = [float(v) for v in np.linspace(lo, hi, num)]
    labels = [" ".join(_short(columns[name][i]) for name in columns) or f"#{i}" for i in range(num)]
    return PreviewSet([seed_for(seed, PREVIEW_SEED, i) for i in range(num)], columns or None, labels)


def _short(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def covariate_tensors(pset: PreviewSet, schema: dict[str, dict], device: torch.device) -> dict | None:
    """The set's covariates as the model takes them: float32 values, int64 level indices."""
    if pset.covariates is None:
        return None
    out = {}
    for name, values in pset.covariates.items():
        if schema[name].get("kind") == "categorical":
            levels = list(schema[name]["levels"])
            out[name] = torch.tensor([levels.index(v) for v in values], dtype=torch.int64, device=device)
        else:
            out[name] = torch.tensor(values, dtype=torch.float32, device=device)
    return out


class Previewer:
    """Draws the preview set from the EMA weights and writes ``previews/step-NNNNNNN.png``."""

    def __init__(
        self,
        ema: torch.nn.Module,
        objective: Any,
        schema: dict[str, dict],
        spatial: tuple[int, ...],
        out_dir: Path,
        *,
        num: int,
        steps: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.ema, self.objective, self.spatial, self.out_dir = ema, objective, tuple(spatial), out_dir
        self.steps, self.device = steps, device
        self.pset = preview_set(schema, num, seed)
        self.cov = covariate_tensors(self.pset, schema, device)

    def path(self, step: int) -> Path:
        return self.out_dir / f"step-{step:07d}.png"

    def draw(self) -> np.ndarray:
        """The preview set, shape (num, 1, *spatial), float32, leaving every RNG and the EMA's mode as found."""
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in self.pset.seeds]
        was_training = self.ema.training
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                self.ema.eval()
                shape = (len(self.pset.seeds), 1, *self.spatial)
                x = self.objective.sample(self.ema, shape, self.cov, gens, self.steps)
        finally:
            self.ema.train(was_training)
        return x.float().cpu().numpy()

    def __call__(self, step: int) -> tuple[Path, np.ndarray, float]:
        """Draw, render and write the montage of ``step``; returns its path, RGB pixels and the seconds it took."""
        t0 = time.perf_counter()
        images = self.draw()
        png, rgb = montage(images, self.pset.labels, f"EMA preview, step {step} ({self.steps} sampler steps)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.path(step)
        atomic_write(path, png)
        return path, rgb, time.perf_counter() - t0


def _views(volume: np.ndarray) -> list[np.ndarray]:
    """Middle slices to show, flipped to put the origin at the bottom: axial, coronal, sagittal, or the slice."""
    if volume.ndim == 2:
        return [volume.T[::-1]]
    d, h, w = volume.shape
    return [volume[:, :, w // 2].T[::-1], volume[:, h // 2, :].T[::-1], volume[d // 2, :, :].T[::-1]]


def montage(images: np.ndarray, labels: list[str], title: str, min_px: int = 96) -> tuple[bytes, np.ndarray]:
    """A grid, one column per subject and one row per view, as PNG bytes and as RGB pixels (H, W, 3) uint8.

    Drawn with plain arrays and Pillow, not matplotlib figures: a preview must cost milliseconds, not seconds.

    Args:
        images (np.ndarray): shape (num, 1, *spatial), 2D slices or 3D volumes.
        labels (list[str]): one caption per subject.
        title (str): the caption of the whole grid.
        min_px (int): small images are enlarged (nearest neighbour) until their larger side reaches this.
    """
    from PIL import Image, ImageDraw

    finite = images[np.isfinite(images)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    scale = 255.0 / max(float(hi - lo), 1e-12)
    views = [_views(img[0]) for img in images]
    side = max(max(v.shape) for subject in views for v in subject)
    zoom = max(1, -(-min_px // side))
    cell, pad, caption = side * zoom, 4, 14
    rows, cols = len(views[0]), len(views)
    grid = np.zeros((caption + rows * (cell + pad), cols * (cell + pad)), dtype=np.uint8)
    for c, subject in enumerate(views):
        for r, view in enumerate(subject):
            pixels = np.clip((np.nan_to_num(view, nan=lo) - lo) * scale, 0, 255).astype(np.uint8)
            pixels = pixels.repeat(zoom, 0).repeat(zoom, 1)
            y = caption + r * (cell + pad) + (cell - pixels.shape[0]) // 2
            x = c * (cell + pad) + (cell - pixels.shape[1]) // 2
            grid[y : y + pixels.shape[0], x : x + pixels.shape[1]] = pixels
    image = Image.fromarray(np.pad(grid, ((0, caption), (0, 0)))).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.text((2, 1), title, fill=(255, 255, 0))
    for c, label in enumerate(labels):
        draw.text((c * (cell + pad) + 2, image.height - caption + 1), label, fill=(255, 255, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), np.asarray(image)
