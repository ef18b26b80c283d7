"""Covariate conditioning: age, sex, group... as one embedding added to the time embedding.

Each covariate has its own learned *null* embedding. It stands in where a sample's conditioning is dropped
(classifier-free guidance trains the unconditional model with it) and where a value is missing (NaN for a
continuous covariate, level index -1 for a categorical one), so a cohort with gaps still trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hpcdiff.config import check, suggest
from hpcdiff.errors import ConfigError

MISSING_LEVEL = -1


@dataclass(kw_only=True)
class CovariateSpec:
    """One conditioning variable, as described by the shards' manifest."""

    name: str
    """Key of the covariate in the batch's ``covariates`` dict."""
    kind: Literal["continuous", "categorical"]
    """Continuous values are standardised and embedded by a small MLP; categorical ones index an embedding."""
    levels: list[str] = field(default_factory=list)
    """Categorical levels in index order (the loader passes the level index as int64)."""
    mean: float = 0.0
    """Continuous only: subtracted before embedding."""
    std: float = 1.0
    """Continuous only: divides after subtracting the mean; must be positive."""

    def __post_init__(self) -> None:
        where = f"covariate {self.name!r}"
        kinds = ("continuous", "categorical")
        check(self.kind in kinds, f"{where}.kind", f"{self.kind!r} is not one of {kinds}")
        if self.kind == "categorical":
            check(len(self.levels) > 0, f"{where}.levels", "a categorical covariate needs at least one level")
            check(len(set(self.levels)) == len(self.levels), f"{where}.levels", f"repeated level in {self.levels}")
        else:
            check(self.std > 0, f"{where}.std", f"must be positive, got {self.std} (a constant covariate?)")


def covariate_specs(schema: Mapping[str, Mapping[str, Any]], names: Sequence[str] | None = None) -> list[CovariateSpec]:
    """Specs from a shards manifest's ``covariates`` schema, for the chosen names (all when None).

    Raises:
        ConfigError: a name is not in the schema, or its entry is unusable.
    """
    chosen = list(schema) if names is None else list(names)
    specs = []
    for name in chosen:
        if name not in schema:
            raise ConfigError(f"covariate {name!r} is not in the shards' manifest{suggest(name, list(schema))}")
        entry = schema[name]
        if entry.get("kind") == "categorical":
            specs.append(CovariateSpec(name=name, kind="categorical", levels=[str(v) for v in entry.get("levels", [])]))
        else:
            std = float(entry.get("std", 1.0)) or 1.0  # a constant covariate carries no signal; avoid dividing by 0
            specs.append(
                CovariateSpec(name=name, kind=entry.get("kind", ""), mean=float(entry.get("mean", 0.0)), std=std)
            )
    return specs


class CovariateEmbedding(nn.Module):
    """Sum of per-covariate embeddings, each replaced by its null embedding where dropped or missing.

    Every parameter enters the graph on every call (``torch.where``, not Python branches), so
    DistributedDataParallel needs no ``find_unused_parameters``.
    """

    def __init__(self, specs: Sequence[CovariateSpec], dim: int) -> None:
        super().__init__()
        self.specs = list(specs)
        self.dim = dim
        self.encoders = nn.ModuleDict()
        for spec in self.specs:
            if spec.kind == "categorical":
                self.encoders[spec.name] = nn.Embedding(len(spec.levels), dim)
            else:
                self.encoders[spec.name] = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.randn(len(self.specs), dim) * 0.02)

    def forward(self, covariates: Mapping[str, Tensor] | None, drop: Tensor | None, batch: int) -> Tensor:
        """Embed a batch of covariates.

        Args:
            covariates (dict[str, Tensor] | None): per name, shape (batch,); continuous raw values (NaN = missing),
                categorical level indices (-1 = missing). None gives the unconditional (all-null) embedding.
                Keys without a spec are ignored: the loader passes every covariate of the shards.
            drop (Tensor | None): bool, shape (batch,); True uses the null embeddings for that sample.
            batch (int): batch size, used when ``covariates`` is None.

        Returns:
            Tensor: shape (batch, dim).
        """
        device = self.null.device
        out = torch.zeros(batch, self.dim, device=device, dtype=self.null.dtype)
        if covariates is None:
            for i in range(len(self.specs)):  # the same sum, in the same order, as an all-dropped batch
                out = out + self.null[i]
            return out
        missing = [s.name for s in self.specs if s.name not in covariates]
        if missing:
            raise ValueError(
                f"covariates {missing} are missing from the batch (got {sorted(covariates)}); pass them, "
                "or pass covariates=None for unconditional output"
            )
        dropped = torch.zeros(batch, dtype=torch.bool, device=device) if drop is None else drop.to(device).bool()
        for i, spec in enumerate(self.specs):
            value = covariates[spec.name].to(device)
            if value.shape != (batch,):
                raise ValueError(f"covariate {spec.name!r} has shape {tuple(value.shape)}, expected ({batch},)")
            if spec.kind == "categorical":
                emb, absent = self._categorical(spec, value)
            else:
                value = value.to(self.null.dtype)
                absent = torch.isnan(value)
                z = (torch.nan_to_num(value) - spec.mean) / spec.std
                emb = self.encoders[spec.name](z[:, None])
            out = out + torch.where((absent | dropped)[:, None], self.null[i], emb)
        return out

    def _categorical(self, spec: CovariateSpec, index: Tensor) -> tuple[Tensor, Tensor]:
        if index.is_floating_point():
            raise ValueError(f"categorical covariate {spec.name!r} must hold int64 level indices, got {index.dtype}")
        bad = (index < MISSING_LEVEL) | (index >= len(spec.levels))
        if bad.any():
            raise ValueError(
                f"categorical covariate {spec.name!r} has level index {int(index[bad][0])}, outside 0.."
                f"{len(spec.levels) - 1} (levels {spec.levels}); use -1 for a missing value"
            )
        absent = index == MISSING_LEVEL
        return self.encoders[spec.name](index.clamp(min=0)), absent
