"""Job configs as a careless or hostile user writes them: refused with exit 2 and the key named, never a traceback.

The Hypothesis tests build configs from random keys, types, values, nesting and YAML anchors, in-process: each
either validates or raises ConfigError (exit 2), within 2 s and 500 MB.
"""

from __future__ import annotations

import re
import time
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpcdiff.train  # noqa: F401  (torch imported once, outside the timed cases)
from hpcdiff.config import apply_overrides
from hpcdiff.errors import EXIT_USAGE, ConfigError
from hpcdiff.train_config import job_to_dict, load_job
from tests.harness import assert_ok, hpcdiff

BASE = {
    "data": {"shards": "shards", "batch_size": 2},
    "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": []},
    "train": {"steps": 4},
}


def _job(tmp_path, text: str | None = None, **sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


# A 470-byte bomb: each level lists the previous one nine times (9**9 leaves once expanded).
BOMB = "data: {shards: s, batch_size: 1}\ntrain: {steps: 1}\nx0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
BOMB += "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = _job(tmp_path, BOMB)
    assert len(BOMB) < 600
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"job\.yaml is not valid YAML: YAML anchors and aliases .* not allowed"):
        load_job(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0 and peak < 20e6


def test_no_shipped_job_uses_anchors():
    from tests.harness import ROOT

    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        assert "&" not in path.read_text() and "*" not in path.read_text().replace("**", ""), path


def test_betas_and_3e_4_on_the_command_line(tmp_path):
    job = load_job(_job(tmp_path), ["optim.betas=[0.9,0.95]", "optim.lr=3e-4", "optim.weight_decay=1e-2"])
    assert job.optim.betas == (0.9, 0.95) and job.optim.lr == 3e-4 and job.optim.weight_decay == 0.01


def test_the_set_example_names_a_real_key(tmp_path):
    with pytest.raises(ConfigError, match=r"for example (\S+)=") as e:
        apply_overrides({}, ["novalue"])
    example = str(e.value).split("for example ")[1].split(",")[0].rstrip(")")
    assert load_job(_job(tmp_path), [example]).optim.lr == 3e-4
    from hpcdiff.cli.runs import SET_HELP

    examples = re.findall(r"(?:e\.g\. | or )'?([a-z_.]+=[^' ]+)", SET_HELP)
    assert len(examples) == 2
    assert load_job(_job(tmp_path), examples).optim.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.seed=-1", "train.seed"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("data.batch_size=1000000000", "data.batch_size"),
        ("data.batch_size=1e9", "data.batch_size"),
        ("train.stop_margin_s=.nan", "train.stop_margin_s"),
        ("train.collective_timeout_s=1e999", "train.collective_timeout_s"),
        ("optim.betas=[0.9, 1.5]", "optim.betas"),
        ("model.base_channels=wide", "model.base_channels"),
    ],
)
def test_out_of_range_values_name_their_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key)):
        load_job(_job(tmp_path), [override])


def test_bad_values_exit_2_from_the_command_line_naming_the_key(tmp_path):
    proc = hpcdiff("train", _job(tmp_path), "--run-dir", tmp_path / "run", "--set", "train.seed=-3")
    assert_ok(proc, EXIT_USAGE)
    assert "train.seed: must be 0 or more, got -3" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_non_utf8_config_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"data:\n  shards: \xff\xfe\n")
    proc = hpcdiff("train", path, "--run-dir", tmp_path / "run")
    assert_ok(proc, EXIT_USAGE)
    assert f"{path} is not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr


def test_a_runs_own_resolved_config_loads_back_unchanged(tmp_path):
    """config.yaml as a run freezes it (betas as a list, every default written out) is a valid job config."""
    job = load_job(_job(tmp_path))
    frozen = tmp_path / "config.yaml"
    frozen.write_text(yaml.safe_dump(job_to_dict(job), sort_keys=False))
    assert "betas" in frozen.read_text()
    assert job_to_dict(load_job(frozen)) == job_to_dict(job)


# ------------------------------------------------------------------ fuzzing
_KEYS = st.sampled_from(
    ["data", "train", "optim", "model", "objective", "shards", "batch_size", "steps", "lr", "betas", "seed", "mode"]
    + ["kind", "base_channels", "channel_mults", "weight_decay", "x", "", "1", "<<"]
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(["3e-4", "1e9", ".inf", "nan", "2d", "3d", "flow", "ddpm", "-1"])
)
_VALUES = st.recursive(
    _SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_KEYS, kids, max_size=4), max_leaves=12
)


def _valid_or_exit_2(path) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        load_job(path)
    except ConfigError as e:
        assert e.exit_code == EXIT_USAGE and str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0 and peak < 500e6


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sections=st.dictionaries(st.sampled_from(["data", "train", "optim", "model", "objective"]), _VALUES, max_size=5),
    extra=st.dictionaries(_KEYS, _VALUES, max_size=3),
)
def test_fuzz_random_configs_validate_or_exit_2(tmp_path, sections, extra):
    data = {k: dict(v) for k, v in BASE.items()}
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = value
    for name, value in extra.items():
        target = data.get("data") if isinstance(data.get("data"), dict) else data
        target[name] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    _valid_or_exit_2(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(st.sampled_from(list("&*<:{}[]-,!|>'\"#%@ \n\tab01.")), max_size=120),
    anchor=st.sampled_from(["", "x: &a [1, 2]\ny: *a\n", "data: &d {shards: s, batch_size: 1}\nz: {<<: *d}\n"]),
)
def test_fuzz_random_yaml_text_and_anchors_validate_or_exit_2(tmp_path, text, anchor):
    path = tmp_path / "job.yaml"
    path.write_text(anchor + text)
    _valid_or_exit_2(path)
