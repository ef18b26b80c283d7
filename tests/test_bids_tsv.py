"""participants.tsv and cohort TSVs as BIDS defines them: tab-separated fields, no quoting, refused when ambiguous.

Each case is a reproduction of a file that once lost subjects silently or crashed a reader; the Hypothesis
tests feed the reader arbitrary tables and assert it never raises anything but a DataError naming the file.
"""

from __future__ import annotations

import math
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcdiff.data.covariates import (
    MISSING,
    guess_kinds,
    is_missing,
    read_bids_tsv,
    read_cohort_tsv,
    schema_of,
)
from hpcdiff.data.ingest import make_plan
from hpcdiff.errors import DataError


def _write(path, text: str | bytes):
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _bids(root, tsv: str, subjects=("sub-01", "sub-02", "sub-03")):
    """A BIDS root with ``tsv`` as participants.tsv and an (empty) image per subject: enough to plan."""
    for s in subjects:
        (root / s / "anat").mkdir(parents=True)
        (root / s / "anat" / f"{s}_T1w.nii.gz").write_bytes(b"")
    _write(root / "participants.tsv", tsv)
    return root


def test_a_stray_quote_keeps_every_following_row(tmp_path):
    """CSV quoting swallowed the rows after a lone `"` into one value and dropped those subjects as "no row"."""
    root = _bids(tmp_path, 'participant_id\tage\tsite\nsub-01\t40\t"north\nsub-02\t50\tsouth\nsub-03\t60\teast\n')
    plan = make_plan(root, 2)
    assert plan.quarantine == []
    assert sorted(plan.covariates) == ["sub-01", "sub-02", "sub-03"]
    assert plan.covariates["sub-01"]["site"] == '"north' and plan.covariates["sub-03"]["age"] == 60.0


def test_a_repeated_column_name_is_refused_naming_it(tmp_path):
    path = _write(tmp_path / "p.tsv", "participant_id\tage\tage\nsub-01\t40\t41\n")
    with pytest.raises(DataError, match=r"p\.tsv: line 1, column 3: column 'age' is repeated \(also column 2\)"):
        read_bids_tsv(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = _write(tmp_path / "p.tsv", b"\xef\xbb\xbfparticipant_id\tage\r\nsub-01\t40\r\n")
    table = read_bids_tsv(path)
    assert table.columns == ["participant_id", "age"] and table.rows == [{"participant_id": "sub-01", "age": "40"}]


def test_another_encoding_is_refused_with_file_and_line(tmp_path):
    path = _write(tmp_path / "p.tsv", "participant_id\tsite\nsub-01\tnord\nsub-02\tMünchen\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"p\.tsv: line 3 is not UTF-8 \(byte 0xfc\); save the file as UTF-8"):
        read_bids_tsv(path)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ("participant_id\t.\n", r"column 2: column name '\.' cannot be used"),
        ("participant_id\tage/years\n", r"column 2: column name 'age/years' cannot be used"),
        ("participant_id\tage\t\n", r"line 1, column 3: the header ends with a tab .* remove the trailing tab"),
        ("participant_id\t\tage\n", r"column 2: column name '' cannot be used"),
    ],
    ids=["dot", "slash", "trailing-tab", "empty"],
)
def test_unusable_column_names_are_refused(tmp_path, header, match):
    path = _write(tmp_path / "p.tsv", header + "sub-01\t1\t2\n")
    with pytest.raises(DataError, match=match):
        read_bids_tsv(path)


def test_a_trailing_tab_on_a_row_is_refused_with_its_line(tmp_path):
    path = _write(tmp_path / "p.tsv", "participant_id\tage\nsub-01\t40\nsub-02\t50\t\n")
    with pytest.raises(DataError, match=r"line 3 has 3 tab-separated fields for 2 columns \(a trailing tab\?\)"):
        read_bids_tsv(path)


def test_a_numeric_column_with_one_word_is_refused_not_made_categorical(tmp_path):
    root = _bids(tmp_path, "participant_id\tage\nsub-01\t40\nsub-02\tforty\nsub-03\t60\n")
    with pytest.raises(DataError, match=r"participants\.tsv: line 3, column 'age': 'forty' .* write n/a"):
        make_plan(root, 2)


def test_missing_values_are_one_definition_and_never_a_level(tmp_path):
    assert {"", "n/a", "NA", "nan"} == MISSING and all(is_missing(f" {m} ") for m in MISSING) and is_missing(None)
    root = _bids(tmp_path, "participant_id\tage\tsex\nsub-01\tn/a\tF\nsub-02\t50\tNA\nsub-03\tnan\t\n")
    plan = make_plan(root, 3)
    assert plan.kinds == {"age": "continuous", "sex": "categorical"}
    assert math.isnan(plan.covariates["sub-01"]["age"]) and plan.covariates["sub-02"]["sex"] == "n/a"
    columns = {k: [plan.covariates[s][k] for s in sorted(plan.covariates)] for k in plan.kinds}
    assert schema_of(columns, plan.kinds)["sex"] == {"kind": "categorical", "levels": ["F"]}


def test_the_sampling_tsv_goes_through_the_same_reader(tmp_path):
    schema = {"age": {"kind": "continuous", "min": 40, "max": 80}, "sex": {"kind": "categorical", "levels": ["F"]}}
    ok = _write(tmp_path / "ok.tsv", b"\xef\xbb\xbfage\tsex\n50\tF\nn/a\tn/a\n")
    got = read_cohort_tsv(ok, schema, None)
    assert got["age"][0] == 50.0 and math.isnan(got["age"][1]) and got["sex"] == ["F", "n/a"]
    quoted = _write(tmp_path / "q.tsv", 'age\tsex\n50\t"F\n60\tF\n')
    with pytest.raises(DataError, match=r"q\.tsv: row 1 \(line 2\), column 'sex': level '\"F' was not seen"):
        read_cohort_tsv(quoted, schema, None)
    repeated = _write(tmp_path / "r.tsv", "age\tsex\tsex\n50\tF\tF\n")
    with pytest.raises(DataError, match="column 'sex' is repeated"):
        read_cohort_tsv(repeated, schema, None)


# ------------------------------------------------------------------ fuzzing
_CELL = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
_TABLE = st.lists(st.lists(_CELL, min_size=1, max_size=5), min_size=0, max_size=8)


def _bounded(fn):
    """Run ``fn`` and fail when one case takes more than 2 s or 500 MB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert time.perf_counter() - t0 < 2.0 and peak < 500e6


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_TABLE, sep=st.sampled_from(["\t", "\t", ",", '"', "\r\n"]), raw=st.binary(max_size=64))
def test_fuzz_any_table_is_read_or_refused_with_a_data_error(tmp_path, rows, sep, raw):
    text = "\n".join(sep.join(r) if sep != "\r\n" else "\t".join(r) + "\r" for r in rows).encode()
    for data in (text, raw, text + raw):
        path = tmp_path / "participants.tsv"
        path.write_bytes(data)

        def read():
            try:
                table = read_bids_tsv(path)
            except DataError as e:
                assert str(path) in str(e)
                return None
            assert all(len(r) == len(table.columns) for r in table.rows)
            try:
                guess_kinds(table, table.columns)
            except DataError as e:
                assert str(path) in str(e) and "line" in str(e)
            return table

        _bounded(read)
