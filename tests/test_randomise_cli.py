"""`hpcdiff stats randomise` end to end on real shards: outputs, the same bytes whatever the slicing (1 rank, 2 ranks
under mpirun, 3 array tasks, a killed and rerun job), and bad input that exits 2 or 3 naming the problem."""

import json
import signal

import nibabel as nib
import numpy as np
import pytest

from hpcdiff.batch.hooks import KILL_AFTER
from hpcdiff.cli import main
from tests.harness import HPCDIFF, assert_ok, hpcdiff, mpirun
from tests.stats_data import regions, write_cohort_shards

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`

# 6 batches of 20 permutations, TFCE included: every output file is compared.
RUN = ["--group", "group", "--covariates", "age,sex", "--permutations", "120", "--batch-size", "20", "--tfce"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("randomise") / "shards with space"
    write_cohort_shards(root, num_subjects=40, group_effect=0.25, seed=3)
    return root


def cli(capsys, *args):
    """The real CLI in this process (a child process would spend most of its time importing)."""
    code = main(["stats", "randomise", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _outputs(out):
    """Every output file's bytes (partial files aside: they are the working state, not the result)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def one_rank(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    assert main(["stats", "randomise", str(shards), *RUN, "--out", str(out)]) == 0
    return out


def test_outputs_maps_null_and_summary(one_rank, shards):
    summary = json.loads((one_rank / "summary.json").read_text())
    assert summary["statistic"] == "t" and summary["tested"] == ["group[AD]"]
    assert summary["nuisance"] == ["intercept", "age", "sex[M]"]
    assert summary["permutations"] == 120 and summary["min_achievable_p"] == pytest.approx(1 / 121)
    assert summary["subjects_left_out"] == 0 and summary["two_sided"]
    null = np.loadtxt(one_rank / "max_null.txt")
    assert null.shape == (120,) and np.loadtxt(one_rank / "max_null_tfce.txt").shape == (120,)
    for name in ("max_null.png", "max_null_tfce.png", "mask.nii.gz"):
        assert (one_rank / name).stat().st_size > 0
    mask = nib.load(one_rank / "mask.nii.gz").get_fdata() > 0
    t = nib.load(one_rank / "stat.nii.gz").get_fdata()[mask]
    p_fwe = nib.load(one_rank / "p_fwe.nii.gz").get_fdata()[mask]
    p_unc = nib.load(one_rank / "p_uncorrected.nii.gz").get_fdata()[mask]
    # FWE p is the rank of |t| among the null maxima; it never beats the uncorrected p
    want = (1 + (null[None, :] >= np.abs(t)[:, None] - 1e-5).sum(axis=1)) / 121
    np.testing.assert_allclose(p_fwe, want, atol=1e-6)
    assert np.all(p_fwe >= p_unc - 1e-7) and p_fwe.min() == pytest.approx(1 / 121)
    truth = regions()["patch"][mask]
    assert (nib.load(one_rank / "p_tfce_fwe.nii.gz").get_fdata()[mask][truth] <= 0.05).mean() > 0.5


def test_two_ranks_three_tasks_and_a_killed_run_give_the_same_bytes(one_rank, shards, tmp_path, capsys):
    want = _outputs(one_rank)
    two = tmp_path / "two ranks"
    proc = mpirun(2, [*HPCDIFF, "stats", "randomise", shards, *RUN, "--out", two], timeout=300)
    assert_ok(proc)
    assert _outputs(two) == want
    tasks = tmp_path / "tasks"
    for task in range(3):
        assert cli(capsys, shards, *RUN, "--out", tasks, "--task", task, "--num-tasks", 3)[0] == 0
        assert ("summary.json" in _outputs(tasks)) == (task == 2)  # only the last task finds every batch done
    assert _outputs(tasks) == want
    killed = tmp_path / "killed"
    # SIGKILLed right after its second batch is written and recorded (the core's test hook).
    proc = hpcdiff("stats", "randomise", shards, *RUN, "--out", killed, env={KILL_AFTER: "2"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (killed / "partials").iterdir()) == ["batch-000000.npz", "batch-000001.npz"]
    assert not (killed / "summary.json").exists()
    code, stdout, _ = cli(capsys, shards, *RUN, "--out", killed, "--json")
    assert code == 0
    assert json.loads(stdout)["batches_computed"] == 4  # the two batches done before the kill were kept
    assert _outputs(killed) == want
    # A rerun of a finished run reads no data and rewrites nothing.
    code, stdout, _ = cli(capsys, shards, *RUN, "--out", killed, "--json")
    assert code == 0 and json.loads(stdout)["batches_computed"] == 0 and _outputs(killed) == want


def test_f_test_exchangeability_blocks_and_accel(shards, tmp_path, capsys):
    out = tmp_path / "f"
    args = ["--group", "group", "--covariates", "age", "--contrast", "age,sex", "--permutations", "60"]
    code, stdout, _ = cli(
        capsys, shards, *args, "--exchangeability-blocks", "sex", "--accel", "gamma", "--out", out, "--json"
    )
    assert code == 0
    summary = json.loads(stdout)
    assert summary["statistic"] == "F" and summary["tested"] == ["age", "sex[M]"]
    assert summary["nuisance"] == ["intercept", "group[AD]"]
    assert summary["fwe"]["accel"]["method"] == "gamma" and "ks_pvalue" in summary["fwe"]["accel"]
    assert (out / "p_fwe_permutation.nii.gz").exists()
    assert nib.load(out / "stat.nii.gz").get_fdata().min() >= 0  # F is never negative


@pytest.mark.parametrize(
    ("case", "extra", "code", "message"),
    [
        ("one_level", [], 3, "only one level"),
        ("few_subjects", [], 3, "model columns"),
        ("blocks_of_one", ["--exchangeability-blocks", "id"], 3, "one subject per block"),
        ("unknown_contrast", ["--contrast", "height"], 2, "--contrast 'height'"),
        ("unknown_blocks", ["--exchangeability-blocks", "site"], 2, "'site' is not a column"),
    ],
)
def test_bad_input_exits_2_or_3_naming_the_problem(tmp_path, capsys, case, extra, code, message):
    kwargs = {"one_level": {"groups": ("CN",)}, "few_subjects": {"num_subjects": 3}}.get(case, {})
    root = tmp_path / "shards"
    write_cohort_shards(root, **{"num_subjects": 12, "shape": (6, 7, 6), **kwargs})
    got, _, stderr = cli(
        capsys,
        root,
        "--group",
        "group",
        "--covariates",
        "age,sex",
        "--permutations",
        5,
        *extra,
        "--out",
        tmp_path / "out",
    )
    assert got == code
    assert message in stderr


@pytest.mark.parametrize("other", [["--seed", 1], ["--accel", "gamma"], ["--threads", 2], ["--tfce"]])
def test_a_rerun_with_other_options_is_refused_by_the_marker_unless_overwrite(shards, tmp_path, capsys, other):
    out = tmp_path / "out"
    base = [shards, "--group", "group", "--permutations", "20"]  # --accel gamma needs 20
    assert cli(capsys, *base, "--out", out)[0] == 0
    marker = json.loads((out / ".hpcdiff" / "owner.json").read_text())
    assert marker["command"] == "stats randomise" and "partials/batch-000000.npz" in marker["files"]
    before = _outputs(out)
    code, _, stderr = cli(capsys, *base, *other, "--out", out)
    assert code == 2
    assert "of another hpcdiff stats randomise plan" in stderr and "--overwrite" in stderr
    assert _outputs(out) == before  # refused before anything was written
    assert cli(capsys, *base, *other, "--overwrite", "--out", out)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan_digest"] == json.loads((out / ".hpcdiff" / "owner.json").read_text())["plan_sha256"]
    assert summary["plan_digest"] != marker["plan_sha256"]


def test_a_folder_with_files_it_did_not_write_is_refused_overwrite_included(shards, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, _, stderr = cli(capsys, shards, "--group", "group", "--permutations", 10, *extra, "--out", out)
        assert code == 2 and "notes.txt" in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_the_finisher_merges_partials_checked_against_their_records(shards, tmp_path, capsys):
    out = tmp_path / "out"
    base = [shards, "--group", "group", "--permutations", 20, "--batch-size", 10, "--out", out, "--num-tasks", 2]
    assert cli(capsys, *base, "--task", 0)[0] == 0
    partial = out / "partials" / "batch-000000.npz"
    raw = bytearray(partial.read_bytes())
    raw[-30] ^= 0xFF  # same size: a rerun would skip it, the finisher must not trust it
    partial.write_bytes(bytes(raw))
    code, _, stderr = cli(capsys, *base, "--task", 1)
    assert code == 3
    assert str(partial) in stderr and "does not match its record" in stderr
    assert not (out / "summary.json").exists()
