"""The command-line contract: help lists every sub-command, wrong usage exits 2 and says what was expected."""

import argparse
import json
import re

import pytest

from hpcdiff.cli import build_parser
from tests.harness import assert_ok, hpcdiff, require_mpi


def _subcommands() -> list[str]:
    (action,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def test_help_lists_every_subcommand():
    proc = hpcdiff("--help")
    assert_ok(proc)
    names = _subcommands()
    assert "doctor" in names
    for name in names:
        assert name in proc.stdout, f"'{name}' missing from hpcdiff --help:\n{proc.stdout}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate' (choose from"),
        (["doctor", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_wrong_usage_exits_2_and_says_what_was_expected(args, expected):
    proc = hpcdiff(*args)
    assert_ok(proc, 2)
    assert expected in proc.stderr
    assert "usage: hpcdiff" in proc.stderr
    if args == ["frobnicate"]:
        assert all(name in proc.stderr for name in _subcommands())  # the valid choices are listed


def _doctor(env=None) -> dict:
    proc = hpcdiff("doctor", "--json", env=env, timeout=180)
    assert_ok(proc)
    return json.loads(proc.stdout)


def test_doctor_json_reports_mpi():
    require_mpi()
    report = _doctor()
    assert report["mpi"]["present"] is True
    assert report["mpi"]["library"] and report["mpi"]["mpirun"]
    assert "mpi" not in report["missing"]


def test_doctor_names_a_missing_slurm_conf():
    report = _doctor({"SLURM_CONF": "/nonexistent dir/slurm.conf"})
    if not report["slurm"]["present"]:
        pytest.skip("no Slurm client installed")
    assert report["slurm"]["controller"] is False
    assert "/nonexistent dir/slurm.conf" in report["slurm"]["controller_error"]
    assert "SLURM_CONF" in report["slurm"]["fix"]


@pytest.mark.slurm
def test_doctor_json_reports_the_local_slurm_controller(slurm_cluster):
    report = _doctor(slurm_cluster.env)
    slurm = report["slurm"]
    assert slurm["present"] is True and slurm["controller"] is True, slurm
    assert re.search(r"\b\d+\.\d+\.\d+\b", slurm["version"]), slurm["version"]  # e.g. "slurm-wlm 22.05.8"
    assert [p.split()[0] for p in slurm["partitions"]] == ["low*", "high"]
