"""Missing covariate values as a lab writes them (n/a, empty, NA): never a level, the null embedding in training,
left out of a statistical model with the count in summary.json and the log.
"""

import json

import numpy as np
import pytest
import torch

from hpcdiff.data.cohort import make_cohort
from hpcdiff.data.ingest import ingest
from hpcdiff.data.loader import Loader
from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import DataError
from hpcdiff.models.conditioning import MISSING_LEVEL, CovariateEmbedding, covariate_specs
from tests.harness import assert_ok, hpcdiff

SHAPE = (16, 20, 16)
NUM = 12
# sub-0002 lacks sex; sub-0003 lacks age and sex; sub-0004 lacks site (coded 1/2, declared categorical).
GAPS = {"sub-0002": {"sex": "n/a"}, "sub-0003": {"age": "", "sex": "NA"}, "sub-0004": {"site": "nan"}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The built-in cohort with gaps in a continuous and two categorical columns, ingested."""
    root = tmp_path_factory.mktemp("gaps") / "bids"
    make_cohort(root, NUM, SHAPE, seed=5)
    lines = (root / "participants.tsv").read_text().splitlines()
    header = [*lines[0].split("\t"), "site"]
    rows = []
    for i, line in enumerate(lines[1:]):
        row = dict(zip(header, [*line.split("\t"), str(1 + i % 2)]))
        row.update(GAPS.get(row["participant_id"], {}))
        rows.append("\t".join(row[c] for c in header))
    (root / "participants.tsv").write_text("\n".join(["\t".join(header), *rows]) + "\n")
    declared = json.loads((root / "participants.json").read_text())
    declared["site"] = {"Description": "scanner site", "Levels": {"1": "north", "2": "south"}}
    (root / "participants.json").write_text(json.dumps(declared))
    out = root.parent / "shards"
    ingest(root, out, SHAPE, subjects_per_shard=5)
    return ShardSet.open(out, verify=True)


def test_missing_values_are_no_level_and_keep_their_kind(shards):
    schema = shards.covariates
    assert schema["sex"] == {"kind": "categorical", "levels": ["F", "M"]}
    assert schema["site"] == {"kind": "categorical", "levels": ["1", "2"]}
    assert schema["age"]["kind"] == "continuous"
    table = shards.subjects()
    row = {sid: i for i, sid in enumerate(table["id"])}
    assert np.isnan(table["age"][row["sub-0003"]]) and np.isfinite(np.delete(table["age"], row["sub-0003"])).all()


def test_the_loader_gives_a_missing_level_the_null_embedding(shards):
    loader = Loader(shards, batch_size=NUM, rank=0, world_size=1, seed=0, prefetch=0)
    batch = loader.batch_at(0)
    ids = [str(shards.subjects()["id"][i]) for i in batch.indices]
    sex = dict(zip(ids, batch.covariates["sex"].tolist()))
    site = dict(zip(ids, batch.covariates["site"].tolist()))
    assert sex["sub-0002"] == sex["sub-0003"] == site["sub-0004"] == MISSING_LEVEL
    assert {v for k, v in sex.items() if k not in GAPS or "sex" not in GAPS[k]} == {0, 1}
    torch.manual_seed(0)
    embed = CovariateEmbedding(covariate_specs(shards.covariates, ["sex"]), dim=8)
    first = ids.index("sub-0002")
    got = embed({"sex": batch.covariates["sex"]}, None, NUM)
    unconditional = embed(None, None, NUM)
    assert torch.equal(got[first], unconditional[first])  # the null embedding, not a learned "n/a" class
    known = [i for i, k in enumerate(ids) if k not in GAPS]
    assert not torch.equal(got[known[0]], unconditional[known[0]])


def test_a_level_the_manifest_does_not_list_is_refused(shards, tmp_path):
    edited = ShardSet(shards.root, {**shards.manifest, "covariates": {"sex": {"kind": "categorical", "levels": ["F"]}}})
    with pytest.raises(DataError, match="covariate 'sex' of subject row .* is 'M', not one of the manifest's levels"):
        Loader(edited, batch_size=1, rank=0, world_size=1, seed=0, prefetch=0)


def test_groupdiff_leaves_out_subjects_missing_a_used_value_and_counts_them(shards, tmp_path):
    out = tmp_path / "gd"
    proc = hpcdiff("stats", "groupdiff", shards.root, "--group", "group", "--covariates", "age,sex", "--out", out)
    assert_ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["left_out"] == {
        "missing_values": {"group": 0, "age": 1, "sex": 2},
        "missing_values_total": 2,
        "other_group_levels": 0,
        "total": 2,
    }
    assert sum(summary["num_subjects"].values()) == NUM - 2
    assert summary["columns"] == ["intercept", summary["columns"][1], "age", "sex[M]"]  # no sex[n/a]
    assert f"2 of {NUM} subjects left out for missing values (age: 1, sex: 2)" in proc.stderr
