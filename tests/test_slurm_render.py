"""sbatch scripts are a pure function of the options: golden files (slurm/*.sbatch), shell safety, bad options.

Regenerate the golden files after an intended change with ``HPCDIFF_UPDATE_GOLDEN=1 pytest tests/test_slurm_render.py``
and review the diff.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from hpcdiff.errors import ConfigError, UsageError
from hpcdiff.launch.slurm.pipeline import jobs, load_pipeline
from hpcdiff.launch.slurm.sbatch import (
    JobScript,
    SlurmOptions,
    hpcdiff_argv,
    output_pattern,
    render,
    sbatch_argv,
    train_job,
)
from tests.harness import ROOT, assert_ok, hpcdiff

PY = "/project/me/hpcdiff/.venv/bin/python"
DATA = Path("/scratch/me/hpcdiff")

EXAMPLES: dict[str, JobScript] = {
    "train": train_job(
        Path("/project/me/hpcdiff/jobs/demo.yaml"),
        DATA / "runs/demo",
        SlurmOptions(
            partition="gpu",
            account="my-lab",
            time="1-00:00:00",
            nodes=2,
            gpus_per_node=4,
            cpus_per_task=8,
            max_restarts=5,
            signal_before_s=600,
            setup=["module load cuda/12.4 openmpi/4.1", "source /project/me/hpcdiff/.venv/bin/activate"],
        ),
        python=PY,
    ),
    "sample": JobScript(
        kind="sample",
        command=hpcdiff_argv(
            "sample", "--run-dir", DATA / "runs/demo", "--out", DATA / "synth", "--n", "1000", python=PY
        ),
        options=SlurmOptions(partition="gpu", time="04:00:00", gpus_per_node=1, setup=["module load cuda/12.4"]),
        array=8,
    ),
    "ingest": JobScript(
        kind="ingest",
        command=hpcdiff_argv("ingest", "/project/me/bids", "--out", DATA / "shards", python=PY),
        options=SlurmOptions(partition="cpu", time="02:00:00", ntasks_per_node=4, cpus_per_task=2),
        array=4,
    ),
    "encode": JobScript(
        kind="encode",
        command=hpcdiff_argv(
            "encode",
            DATA / "shards",
            "--run-dir",
            DATA / "runs/ae",
            "--out",
            DATA / "latents",
            "--subjects-per-shard",
            "64",
            python=PY,
        ),
        options=SlurmOptions(partition="gpu", time="04:00:00", gpus_per_node=1, setup=["module load cuda/12.4"]),
        array=16,
    ),
    "stats": JobScript(
        kind="stats",
        command=hpcdiff_argv(
            "stats", "compare", DATA / "shards", DATA / "synth", "--out", DATA / "stats", "--workers", "16", python=PY
        ),
        options=SlurmOptions(partition="cpu", time="01:00:00", cpus_per_task=16),
        use_srun=False,
    ),
    "randomise": JobScript(
        kind="randomise",
        command=hpcdiff_argv(
            "stats",
            "randomise",
            DATA / "shards",
            "--out",
            DATA / "randomise",
            "--group",
            "group",
            "--permutations",
            "10000",
            "--covariates",
            "age,sex",
            "--tfce",
            python=PY,
        ),  # fmt: skip
        options=SlurmOptions(partition="cpu", time="12:00:00", ntasks_per_node=4),
        array=10,
    ),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rendered_script_matches_golden_file(name):
    golden = ROOT / "slurm" / f"{name}.sbatch"
    text = render(EXAMPLES[name])
    if os.environ.get("HPCDIFF_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.read_text() == text, f"{golden} is stale: rerun with HPCDIFF_UPDATE_GOLDEN=1 and review the diff"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_golden_scripts_are_valid_bash(name):
    proc = subprocess.run(["bash", "-n", ROOT / "slurm" / f"{name}.sbatch"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_rendering_is_a_pure_function():
    again = train_job(
        Path("/project/me/hpcdiff/jobs/demo.yaml"), DATA / "runs/demo", EXAMPLES["train"].options, python=PY
    )
    assert render(again) == render(EXAMPLES["train"])


WEIRD = '/tmp/my runs/it\'s "quoted" $(touch /tmp/pwned) `id` ; rm -rf ~ %j'


def test_paths_with_spaces_quotes_and_shell_syntax_reach_the_program_verbatim(tmp_path):
    job = train_job(Path(WEIRD) / "job.yaml", Path(WEIRD) / "run", SlurmOptions(), ["train.note=a b;$(x)"])
    text = render(job)
    step = next(line for line in text.splitlines() if line.startswith("STEP=("))
    # bash itself parses the line; the array must hold exactly the argument list, nothing executed.
    proc = subprocess.run(
        ["bash", "-c", step + '\nprintf "%s\\0" "${STEP[@]}"'], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\0")[:-1] == job.command
    assert job.command[4] == WEIRD + "/job.yaml" and job.command[6] == WEIRD + "/run"
    assert not list(tmp_path.iterdir())


def test_output_pattern_escapes_percent_and_sbatch_gets_an_argument_list():
    out = output_pattern(Path("/data/100%/run"), "train", array=False)
    assert out == "/data/100%%/run/train-%j.out"
    assert output_pattern(Path("/d"), "sample", array=True) == "/d/sample-%A_%a.out"
    argv = sbatch_argv(Path("/a b/train.sbatch"), out, "afterok:12")
    assert argv == [
        "sbatch",
        "--parsable",
        f"--output={out}",
        "--dependency=afterok:12",
        "--kill-on-invalid-dep=yes",
        "/a b/train.sbatch",
    ]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"partition": "gpu --wrap=evil"}, "partition"),
        ({"account": "lab'x"}, "account"),
        ({"qos": "a#b"}, "qos"),
        ({"time": "tomorrow"}, "time"),
        ({"nodes": 0}, "nodes"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"setup": ["module load a\nmodule load b"]}, "setup"),
    ],
)
def test_bad_options_are_refused_naming_the_option(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SlurmOptions(**kwargs)


def test_options_only_in_the_script_when_given():
    text = render(train_job(Path("/j.yaml"), Path("/r"), SlurmOptions()))
    for absent in ("--partition", "--account", "--qos", "--constraint", "--time", "--gpus-per-node", "--array"):
        assert f"#SBATCH {absent}" not in text
    for present in ("--requeue", "--open-mode=append", "--signal=B:USR1@300", "--ntasks-per-node=1"):
        assert f"#SBATCH {present}" in text


def test_submit_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    job = ROOT / "jobs" / "pipeline.yaml"
    cfg = tmp_path / "job.yaml"
    cfg.write_text("data: {shards: /nowhere, batch_size: 2}\ntrain: {steps: 3}\n")
    run = tmp_path / "run dir"
    proc = hpcdiff(
        "submit", cfg, "--run-dir", run, "--backend", "slurm", "--dry-run", "--partition", "gpu",
        "--gpus-per-node", "2", "--time", "30", "--setup", "module load cuda",
    )  # fmt: skip
    assert_ok(proc)
    assert proc.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --gpus-per-node=2" in proc.stdout and "#SBATCH --ntasks-per-node=2" in proc.stdout
    assert "\nmodule load cuda\n" in proc.stdout
    assert shlex.quote(str(run)) in proc.stdout
    assert not run.exists()
    assert job.exists()


def test_submit_refuses_a_bad_option_with_exit_2(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("data: {shards: /nowhere, batch_size: 2}\ntrain: {steps: 3}\n")
    proc = hpcdiff("submit", cfg, "--run-dir", tmp_path / "r", "--backend", "slurm", "--dry-run", "--time", "soon")
    assert_ok(proc, 2)
    assert "time" in proc.stderr and "HH:MM:SS" in proc.stderr


def test_pipeline_yaml_is_typed_and_renders_dependent_stages(tmp_path):
    pipe = load_pipeline(ROOT / "jobs" / "pipeline.yaml", run_dir=str(tmp_path / "p"))
    names = [name for name, _ in jobs(pipe)]
    assert names == ["ingest", "train", "sample", "stats"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("dir: x\nstages:\n  train: {config: j.yaml, sett: []}\n")
    with pytest.raises(ConfigError, match="stages.train.sett.*did you mean 'set'"):
        load_pipeline(bad)
    bad.write_text("dir: x\nstages:\n  sample: {n: 4}\n")
    with pytest.raises(UsageError, match="needs stages.train"):
        load_pipeline(bad)


def _step(text: str) -> list[str]:
    """The STEP array of a rendered script, as bash itself parses it."""
    step = next(line for line in text.splitlines() if line.startswith("STEP=("))
    proc = subprocess.run(["bash", "-c", step + '\nprintf "%s\\0" "${STEP[@]}"'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\0")[:-1]


def test_randomise_yaml_renders_an_array_whose_tasks_take_their_slice_from_slurm(tmp_path):
    pipe = load_pipeline(ROOT / "jobs" / "randomise.yaml", run_dir=str(tmp_path / "r dir"))
    ((name, job),) = jobs(pipe)
    text = render(job)
    assert name == "randomise" and job.array == 10 and job.use_srun
    assert "#SBATCH --array=0-9 " in text and "#SBATCH --ntasks-per-node=2 " in text
    argv = _step(text)
    assert argv[1:5] == ["-m", "hpcdiff", "stats", "randomise"]
    assert argv[argv.index("--out") + 1] == str(tmp_path / "r dir" / "randomise")
    assert argv[argv.index("--permutations") + 1] == "5000" and "--tfce" in argv
    assert "--task" not in argv and "--num-tasks" not in argv  # each task reads SLURM_ARRAY_TASK_ID/COUNT


def test_randomise_stage_after_ingest_reads_its_shards_and_bad_stages_are_refused(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "dir: d\nstages:\n  ingest: {bids: b}\n"
        "  randomise: {group: group, permutations: 100, tasks: 3, args: [--accel, gamma]}\n"
    )
    pipe = load_pipeline(spec, run_dir=str(tmp_path / "d"))
    assert [name for name, _ in jobs(pipe)] == ["ingest", "randomise"]
    argv = _step(render(jobs(pipe)[1][1]))
    assert argv[5] == str(tmp_path / "d" / "shards") and argv[-2:] == ["--accel", "gamma"]
    for stage, message in [
        ("{group: group, permutations: 10}", "stages.randomise needs 'shards'"),
        ("{group: group, permutations: 10, shards: s, tasks: 0}", "stages.randomise.tasks"),
        ("{group: group, permutations: 10, shards: s, args: [--task, '1']}", "--task is set by the pipeline"),
        ("{group: group, permutation: 10, shards: s}", "did you mean 'permutations'"),
    ]:
        spec.write_text(f"dir: d\nstages:\n  randomise: {stage}\n")
        with pytest.raises((ConfigError, UsageError), match=message):
            load_pipeline(spec)


def test_latent_pipeline_chains_autoencoder_encode_and_train_on_the_latents(tmp_path):
    root = tmp_path / "p dir"
    pipe = load_pipeline(ROOT / "jobs" / "ukbiobank-latent-pipeline.yaml", run_dir=str(root))
    stages = dict(jobs(pipe))
    assert list(stages) == ["ingest", "autoencoder", "encode", "train", "sample"]
    ae = _step(render(stages["autoencoder"]))
    assert ae[3:5] == ["train", str(ROOT / "jobs" / "ukbiobank-autoencoder.yaml")]
    assert ae[ae.index("--run-dir") + 1] == str(root / "autoencoder")
    assert ae[ae.index("--set") + 1] == f"data.shards={root / 'shards'}"
    text = render(stages["encode"])
    assert stages["encode"].kind == "encode" and stages["encode"].array == 16 and stages["encode"].use_srun
    assert "#SBATCH --array=0-15 " in text and "#SBATCH --gpus-per-node=1 " in text
    assert "#SBATCH --job-name=hpcdiff-encode " in text
    enc = _step(text)
    assert enc[1:] == [
        "-m", "hpcdiff", "encode", str(root / "shards"), "--run-dir", str(root / "autoencoder"),
        "--out", str(root / "latents"), "--subjects-per-shard", "64",
    ]  # fmt: skip
    train = _step(render(stages["train"]))
    assert train[3:5] == ["train", str(ROOT / "jobs" / "ukbiobank-latent.yaml")]
    assert train[train.index("--set") + 1] == f"data.shards={root / 'latents'}"
    sample = _step(render(stages["sample"]))
    assert sample[sample.index("--run-dir") + 1] == str(root / "run")


def test_latent_pipeline_submits_each_stage_after_the_one_before(tmp_path, monkeypatch):
    from hpcdiff.launch.slurm import pipeline
    from hpcdiff.launch.slurm.sbatch import Submission

    calls = []

    def fake_submit(script, output, dependency):
        calls.append((script.name, dependency))
        return Submission(job_id=str(100 + len(calls)), script=script, output=output, argv=[])

    monkeypatch.setattr(pipeline, "submit", fake_submit)
    pipe = load_pipeline(ROOT / "jobs" / "latent-pipeline.yaml", run_dir=str(tmp_path / "p"))
    pipeline.submit_pipeline(pipe)
    assert calls == [
        ("autoencoder.sbatch", None),
        ("encode.sbatch", "afterok:101"),
        ("train.sbatch", "afterok:102"),
        ("sample.sbatch", "afterok:103"),
        ("stats.sbatch", "afterok:104"),
    ]
    enc = _step((tmp_path / "p" / "slurm" / "encode.sbatch").read_text())
    # no ingest stage: encode reads the image shards the autoencoder trained on; stats compares against them
    shards = str(ROOT / "demo-out" / "shards-2mm")
    assert enc[4] == shards and enc[enc.index("--subjects-per-shard") + 1] == "8"
    stats = _step((tmp_path / "p" / "slurm" / "stats.sbatch").read_text())
    assert stats[5:7] == [shards, str(tmp_path / "p" / "synth")]


def test_bad_latent_stages_are_refused_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs below are relative to the repository
    spec = tmp_path / "p.yaml"
    ae = "autoencoder: {config: jobs/latent-demo.yaml}"
    for stages, message in [
        ("encode: {shards: s}", "stages.encode needs stages.autoencoder, or 'run_dir'"),
        (f"{ae}\n  encode: {{run_dir: r}}", "stages.encode.run_dir: leave it out"),
        ("encode: {run_dir: r}", "stages.encode needs 'shards'"),
        (f"{ae}\n  encode: {{tasks: 0}}", "stages.encode.tasks"),
        (f"{ae}\n  encode: {{args: [--out, x]}}", "--out is set by the pipeline"),
        (f"{ae}\n  encode: {{subject_per_shard: 8}}", "did you mean 'subjects_per_shard'"),
        (f"{ae}\n  train: {{config: jobs/latent-demo-diffusion.yaml}}", "stages.train after stages.autoencoder"),
        ("autoencoder: {config: jobs/demo.yaml}\n  encode: {}", "stages.autoencoder.config: 'unet'"),
    ]:
        spec.write_text(f"dir: d\nstages:\n  {stages}\n")
        with pytest.raises((ConfigError, UsageError), match=message):
            load_pipeline(spec)
    spec.write_text("dir: d\nstages:\n  encode: {run_dir: r, shards: s, tasks: 3}\n")
    ((name, job),) = jobs(load_pipeline(spec, run_dir=str(tmp_path / "d")))
    assert name == "encode" and job.array == 3
    assert _step(render(job))[4:7] == [str(ROOT / "s"), "--run-dir", str(ROOT / "r")]
