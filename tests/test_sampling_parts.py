"""The pure parts of sampling and its report: worker arithmetic, Slurm array variables, cohort TSV rules, MMD."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hpcdiff.batch import Worker, array_task
from hpcdiff.data.covariates import draw_cohort, read_cohort_tsv
from hpcdiff.errors import DataError, UsageError
from hpcdiff.quality import downsample, median_bandwidth, mmd2

SCHEMA = {
    "age": {"kind": "continuous", "min": 40.0, "max": 80.0, "mean": 60.0, "std": 10.0},
    "group": {"kind": "categorical", "levels": ["control", "patient"]},
}


@pytest.mark.parametrize(("tasks", "world"), [(1, 1), (1, 3), (2, 2), (3, 1), (4, 3)])
def test_every_shard_has_exactly_one_worker(tasks, world):
    owners = [
        shard
        for task, rank in itertools.product(range(tasks), range(world))
        for shard in Worker(task, tasks, rank, world).indices(23)
    ]
    assert sorted(owners) == list(range(23))


def test_array_task_counts_from_the_arrays_minimum():
    assert array_task({}) == (0, 1)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert array_task(env) == (3, 4)
    with pytest.raises(UsageError, match="contiguous"):
        Worker(3, 3, 0, 1)  # --array=0-6:3: the second task has ID - MIN = 3 but COUNT is 3


def test_cohort_tsv_reads_values_missing_cells_and_any_column_order(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("group\tage\npatient\t61.5\ncontrol\tn/a\n\n")
    cols = read_cohort_tsv(tsv, SCHEMA, None)
    assert cols["group"] == ["patient", "control"]
    assert cols["age"][0] == 61.5 and math.isnan(cols["age"][1])
    assert list(cols) == ["age", "group"]  # schema order, whatever the file's
    tsv.write_text("age\tgroup\n")
    with pytest.raises(DataError, match="no rows"):
        read_cohort_tsv(tsv, SCHEMA, None)
    tsv.write_text("age\tgroup\n50\n")
    with pytest.raises(DataError, match="line 2 has 1 tab-separated fields for 2 columns"):
        read_cohort_tsv(tsv, SCHEMA, None)


def test_drawn_cohort_rows_depend_only_on_seed_and_index():
    table = {"id": np.array(["a", "b", "c"]), "age": np.array([41.0, 50.0, 79.0]), "group": np.array(["x", "y", "z"])}
    small, large = draw_cohort(table, ["age", "group"], 5, 3), draw_cohort(table, ["age", "group"], 9, 3)
    assert small["age"] == large["age"][:5] and small["group"] == large["group"][:5]
    pairs = {(a, g) for a, g in zip(large["age"], large["group"])}
    assert pairs <= {(41.0, "x"), (50.0, "y"), (79.0, "z")}  # whole rows: the joint distribution is kept
    assert draw_cohort(table, ["age"], 9, 4)["age"] != large["age"]


def _mmd2_loops(x, y, bandwidth):
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * bandwidth**2))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_its_definition_and_separates_distributions():
    rng = np.random.default_rng(0)
    x, y, z = rng.normal(size=(30, 5)), rng.normal(size=(25, 5)), rng.normal(0.8, 1.0, size=(25, 5))
    bw = median_bandwidth(x)
    assert mmd2(x, y, bw) == pytest.approx(_mmd2_loops(x, y, bw), abs=1e-10)
    assert mmd2(x, z, bw) == pytest.approx(_mmd2_loops(x, z, bw), abs=1e-10)
    assert abs(mmd2(x, y, bw)) < 0.02 < mmd2(x, z, bw)


def test_downsample_averages_blocks():
    v = np.arange(2 * 4 * 4 * 5, dtype=np.float64).reshape(2, 4, 4, 5)
    d = downsample(v, 2)
    assert d.shape == (2, 2 * 2 * 2)
    assert d[0, 0] == v[0, :2, :2, :2].mean()
