"""The training loop: build the parts, resume from the newest valid checkpoint, step, checkpoint, stop cleanly.

Exact resume rests on two facts: data order is a function of (seed, stream position), and every random draw of
a step comes from generators seeded by counters: noise, timesteps and condition dropout by (seed, stream
position of the sample), dropout layers by (seed, step, rank, micro-batch).
So the resume state is the step, the stream position and the tensors; a resumed run repeats the uninterrupted
one bit for bit. The loop does not know who launched it: it gets a ``dist.Context`` and a run directory.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from hpcdiff import checkpoint
from hpcdiff.config import diff, to_dict
from hpcdiff.data.loader import Loader
from hpcdiff.data.shards import ShardSet
from hpcdiff.dist import Context
from hpcdiff.errors import EXIT_REQUEUE, BadCheckpointError, CheckpointError, ConfigError, DivergedError, LeaseLostError
from hpcdiff.models import covariate_specs
from hpcdiff.networks import (
    ModelConfig,
    build_model_config,
    build_network,
    build_objective_from,
    check_input_size,
    check_latent_data,
    model_kind,
)
from hpcdiff.runstate import RunDir
from hpcdiff.seeds import seed_for
from hpcdiff.signals import StopFlag
from hpcdiff.train_config import JobConfig, job_to_dict
from hpcdiff.watch import Watch, open_watch

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


def lr_at(job: JobConfig, step: int) -> float:
    """Linear warm-up then cosine decay to lr x min_lr_ratio: a pure function of the step, nothing to save."""
    o, total = job.optim, job.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class _Parts:
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    model_config: ModelConfig
    covariate_schema: dict[str, Any]
    grid: dict[str, Any]
    data_sha256: str
    latent: dict[str, Any] | None  # the latent shards' block (scale factor, autoencoder, source grid); None: images
    step: int = 0
    position: int = 0


def _state(parts: _Parts, job: JobConfig, ctx: Context) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "step": parts.step,
        "position": parts.position,
        "world_size": ctx.world_size,
        # Intra-op threads change the order of float sums: a resume with another count is no longer bitwise exact.
        "num_threads": torch.get_num_threads(),
        "model": parts.model.state_dict(),
        "ema": parts.ema.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "config": job_to_dict(job),
        # What sampling needs to rebuild the network without the training shards or the job file.
        "model_kind": model_kind(job),
        "model_config": to_dict(parts.model_config),
        "objective_config": dict(job.objective),
        "covariates": parts.covariate_schema,
        "grid": parts.grid,
        # Which subjects in which order the stream positions refer to: a resume on other data is refused.
        "data_sha256": parts.data_sha256,
        # A latent run's samples are scaled back and decoded through this autoencoder onto the source grid.
        "latent": parts.latent,
    }


def _prepare_run_dir(job: JobConfig, run: RunDir, allow_config_change: bool) -> list[str]:
    """Freeze the config at first start, or refuse a changed one with ConfigError; returns an allowed change.

    An allowed change is frozen only once the checkpoint has loaded under it (see ``_resume``).
    """
    new = job_to_dict(job)
    old = run.read_config()
    if old is None:
        run.freeze_config(new)
        return []
    changes = diff(old, new)
    if changes and not allow_config_change:
        raise ConfigError(
            f"the config differs from the one frozen in {run.config}: "
            + "; ".join(changes)
            + ". Resume with the same config, or pass --allow-config-change to accept the new one."
        )
    return changes


def train(
    job: JobConfig,
    run: RunDir,
    ctx: Context,
    *,
    deadline: float | None = None,
    allow_config_change: bool = False,
    allow_data_change: bool = False,
    start_over: bool = False,
    progress: bool = False,
) -> int:
    """Train until ``job.train.steps`` or a stop request; return 0 (done) or 75 (checkpointed, requeue me).

    Args:
        job: the checked job config.
        run: the run directory; rank 0 is its only writer.
        ctx: the brought-up process group (or a world of one).
        deadline: wall-clock time (``time.time()``) when the job will be killed, e.g. a Slurm time limit.
        allow_config_change: accept a config that differs from the frozen one (if the checkpoint loads under it).
        allow_data_change: resume although the shards hold other subjects than the checkpoint was trained on.
        start_over: train from step 0 when every checkpoint in the run is invalid, instead of refusing.
        progress: show a progress bar on rank 0.
    """

    def claim_run_dir() -> list[str]:
        run.acquire_lock(job_id=ctx.topology.job_id)
        return _prepare_run_dir(job, run, allow_config_change)

    changes = ctx.run_on_main(claim_run_dir)

    shards = ShardSet.open(job.data.shards)
    try:
        specs = covariate_specs(shards.covariates, job.data.covariates)
    except ConfigError as e:
        raise ConfigError(f"data.covariates: {e}") from e
    device = ctx.device
    if job.train.deterministic:
        use_deterministic_kernels()
    torch.manual_seed(seed_for(job.train.seed, -1))
    check_latent_data(job, shards.is_latent)
    model_cfg = build_model_config(job, specs, shards.channels)
    check_input_size(job, model_cfg, shards.shape)
    model = build_network(model_cfg).to(device)
    objective = build_objective_from(job)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=job.optim.lr, betas=job.optim.betas, weight_decay=job.optim.weight_decay
    )
    schema = {s.name: shards.covariates[s.name] for s in specs}
    parts = _Parts(model, ema, optimizer, model_cfg, schema, shards.grid, shards.data_sha256, shards.latent)
    resumed = _resume(parts, ctx, run, changes, start_over=start_over, allow_data_change=allow_data_change)
    if changes and ctx.is_main:
        run.event("config_change", changes=changes)
        run.freeze_config(job_to_dict(job))

    if ctx.is_main:
        previous = run.read_status()
        starts = int(previous.get("starts", 0)) + 1
        job_ids = list(previous.get("job_ids", []))
        if ctx.topology.job_id and ctx.topology.job_id not in job_ids:
            job_ids.append(ctx.topology.job_id)
        # Rows past the checkpoint (or all rows, when a killed run left none) are logged again by this run.
        run.truncate_metrics(parts.step)
        run.update_status(
            state="running",
            step=parts.step,
            total_steps=job.train.steps,
            starts=starts,
            restarts=starts - 1,
            job_ids=job_ids,
            world_size=ctx.world_size,
            heartbeat=time.time(),
            last_checkpoint=str(resumed.path) if resumed else None,
        )
        run.event("start" if resumed is None else "restart", step=parts.step, world_size=ctx.world_size)

    if parts.step >= job.train.steps:
        log.info("run already complete at step %d", parts.step)
        if ctx.is_main:
            run.update_status(state="completed")
        return 0

    watch = open_watch(
        job,
        run,
        ctx.is_main,
        parts.step,
        ema=ema,
        objective=objective,
        schema=parts.covariate_schema,
        grid_shape=shards.grid["shape"],
        device=device,
        channels=shards.channels,
    )
    # DDP re-buckets gradients in the order they became ready after its first step. A resumed run's first step
    # would then all-reduce with another layout than the uninterrupted run's, and beyond 2 ranks the ring's
    # summation order, hence the weights, would differ in the last bits. With find_unused_parameters DDP never
    # re-buckets: every step of every start reduces the same way (for one traversal of the graph per step).
    net: torch.nn.Module = DistributedDataParallel(model, find_unused_parameters=True) if ctx.distributed else model
    cpu_bf16 = job.train.precision == "bf16" and device.type != "cuda"
    if cpu_bf16:
        log.warning("train.precision=bf16 applies on GPU only; training in fp32 on %s", device)
    use_bf16 = job.train.precision == "bf16" and device.type == "cuda"
    loader = Loader(
        shards,
        batch_size=job.data.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=job.train.seed,
        start_position=parts.position,
        mode=job.data.mode,
        slice_axis=job.data.slice_axis,
        patch_size=job.data.patch_size,
        prefetch=job.data.prefetch,
    )
    saver = checkpoint.Saver(run.checkpoints, job.train.keep_last, job.train.keep_every) if ctx.is_main else None
    stop = StopFlag().install()
    try:
        return _loop(job, run, ctx, parts, net, objective, loader, saver, watch, stop, deadline, use_bf16, progress)
    except BaseException as e:
        # A writer whose lease was taken over must leave the run to its new holder untouched.
        if ctx.is_main and not isinstance(e, SystemExit | KeyboardInterrupt | LeaseLostError):
            # Best effort: on a full disk this write fails too, and the error to report is the first one.
            with contextlib.suppress(OSError):
                run.update_status(state="failed", error=f"{type(e).__name__}: {e}")
                run.event("error", step=parts.step, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        stop.restore()
        watch.close()
        if saver is not None:
            saver.close()
        loader.close()
        shards.close()
        if ctx.is_main:
            run.release_lock()


def _loop(
    job: JobConfig,
    run: RunDir,
    ctx: Context,
    parts: _Parts,
    net: torch.nn.Module,
    objective: Any,
    loader: Loader,
    saver: checkpoint.Saver | None,
    watch: Watch,
    stop: StopFlag,
    deadline: float | None,
    use_bf16: bool,
    progress: bool,
) -> int:
    device = ctx.device
    t_cfg, o_cfg = job.train, job.optim
    # Latents are scaled to unit variance as in latent diffusion; image runs multiply by 1.0 (bitwise a no-op).
    scale = float(parts.latent["scale_factor"]) if parts.latent else 1.0
    global_batch = job.data.batch_size * ctx.world_size
    batches = iter(loader)
    ema = _EMA(parts.ema, parts.model, o_cfg.ema_decay)
    bar = _progress_bar(parts.step, t_cfg.steps) if progress and ctx.is_main else None
    last_ckpt = last_beat = time.monotonic()
    while parts.step < t_cfg.steps:
        step, step_position = parts.step, parts.position
        t0 = time.perf_counter()
        lr = lr_at(job, step)
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        parts.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        data_wait = 0.0
        for micro in range(o_cfg.grad_accum):
            tw = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - tw
            # float16 as stored: half the bytes to move, and the device converts at memory speed.
            x = batch.x.to(device, non_blocking=True).float() * scale
            cov = {k: v.to(device, non_blocking=True) for k, v in batch.covariates.items()} or None
            # Dropout inside the model draws from the global generator; everything else from one generator per
            # sample, seeded by its stream position: the same sample gets the same noise at any number of ranks.
            torch.manual_seed(seed_for(t_cfg.seed, step, ctx.rank, micro))
            gen = [
                torch.Generator(device=device).manual_seed(seed_for(t_cfg.seed, batch.position + i))
                for i in range(x.shape[0])
            ]
            last = micro == o_cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not ctx.distributed else net.no_sync()
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
            with sync, autocast:
                loss = objective.loss(net, x, cov, gen, cond_drop_prob=t_cfg.cond_drop_prob)
                (loss / o_cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        if not torch.isfinite(loss_sum):
            raise DivergedError(f"loss is {loss_sum.item()} at step {step}: lower optim.lr or check the data")
        if o_cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), o_cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parts.model.parameters() if p.grad is not None])
        parts.optimizer.step()
        ema.update(step)
        parts.step = step + 1
        parts.position += global_batch * o_cfg.grad_accum

        loss_mean = ctx.all_reduce_sum(loss_sum / o_cfg.grad_accum).item() / ctx.world_size
        now = time.monotonic()
        flags = [
            stop.raised,
            t_cfg.checkpoint_every_s is not None and now - last_ckpt >= t_cfg.checkpoint_every_s,
            deadline is not None and time.time() >= deadline - t_cfg.stop_margin_s,
        ]
        agreed = ctx.agree(flags)
        stopping = agreed[0] or agreed[2]
        elapsed = time.perf_counter() - t0
        if ctx.is_main:
            row = {
                "step": parts.step,
                "loss": loss_mean,
                "position": step_position,
                "world_size": ctx.world_size,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "samples_per_s": global_batch * o_cfg.grad_accum / elapsed,
                "step_s": elapsed,
                "data_wait_s": data_wait,
                "time": time.time(),
            }
            run.metric(row)
            watch.after_step(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_mean:.4f}")
            elif parts.step % t_cfg.log_every == 0 or parts.step == t_cfg.steps:
                log.info("step %d/%d loss %.5f lr %.2e", parts.step, t_cfg.steps, loss_mean, lr)
            if saver is not None:
                _record(run, saver.poll(), watch)
            if now - last_beat >= t_cfg.heartbeat_s:
                run.update_status(heartbeat=time.time(), step=parts.step)
                watch.flush()
                last_beat = now
        due = parts.step % t_cfg.checkpoint_every == 0 or parts.step == t_cfg.steps
        if due or stopping or agreed[1]:
            watch.before_checkpoint()
            _save(parts, job, ctx, run, saver, watch)
            last_ckpt = time.monotonic()
        if stopping:
            names = [n for n in ctx.all_gather_object(stop.signal_name) if n]
            why = names[0] if names else "time limit"
            if saver is not None:
                _record(run, saver.wait(), watch)
                run.update_status(state="stopped", step=parts.step, heartbeat=time.time(), stop_reason=why)
                run.event("signal", step=parts.step, reason=why)
            # Open MPI kills every rank when one exits non-zero: nobody leaves before rank 0 has written all.
            ctx.barrier()
            log.info("stopped at step %d on %s after a checkpoint; exit %d to be requeued", parts.step, why, 75)
            if bar is not None:
                bar.close()
            return EXIT_REQUEUE
    if bar is not None:
        bar.close()
    if saver is not None:
        _record(run, saver.wait(), watch)
        run.update_status(state="completed", step=parts.step, heartbeat=time.time())
        run.event("completed", step=parts.step)
    ctx.barrier()
    return 0


def use_deterministic_kernels() -> None:
    """Deterministic GPU kernels: bitwise-repeatable steps (and so bitwise resume) on CUDA, at some speed.

    cuBLAS reads its workspace setting when it starts, so it is set here, before the first kernel runs.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _resume(
    parts: _Parts, ctx: Context, run: RunDir, changes: list[str], *, start_over: bool, allow_data_change: bool
) -> checkpoint.CheckpointInfo | None:
    """Load the checkpoint rank 0 chose and verified; every rank checks it holds that one, on the same data.

    Returns its info, or None for a fresh start. Every checkpoint invalid is refused unless ``start_over``: a
    silent restart from step 0 would throw the run's work away. A checkpoint the (changed) config cannot hold is
    refused before anything is written.
    """
    decision = ctx.run_on_main(lambda: _decide(run, start_over))
    if decision is None:
        return None
    info = checkpoint.taken(run.checkpoints, decision)
    state = checkpoint.load(info, map_location=ctx.device)
    old = state.get("data_sha256")
    if old is None:
        log.warning(
            "%s records no data digest (an older hpcdiff): cannot check it was trained on these shards", info.path
        )
    elif old != parts.data_sha256:
        if not allow_data_change:
            raise ConfigError(
                f"the shards hold other subjects (data_sha256 {parts.data_sha256}) than checkpoint {info.path} was "
                f"trained on (data_sha256 {old}): resuming would change every epoch's order. Train on the same "
                "shards, start a new run directory, or pass --allow-data-change to continue on the new data."
            )
        log.warning("resuming on other data (--allow-data-change): data_sha256 %s -> %s", old, parts.data_sha256)
        if ctx.is_main:
            run.event("data_change", step=int(state["step"]), old=old, new=parts.data_sha256)
    try:
        parts.model.load_state_dict(state["model"])
        parts.ema.load_state_dict(state["ema"])
        parts.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        why = str(e).strip().splitlines()[:3]
        changed = f" after --allow-config-change ({'; '.join(changes)})" if changes else ""
        raise ConfigError(
            f"{info.path} does not fit the model of this config{changed}: {' '.join(why)}. Nothing was "
            f"changed: resume with the config frozen in {run.config}, or train the new model in a new --run-dir"
        ) from e
    parts.step, parts.position = int(state["step"]), int(state["position"])
    saved_threads = state.get("num_threads")
    if saved_threads is not None and saved_threads != torch.get_num_threads():
        log.warning(
            "resumed with %d intra-op thread(s), the checkpoint was written with %d: training goes on, but "
            "no longer bitwise equal to an uninterrupted run (set OMP_NUM_THREADS=%d to keep that)",
            torch.get_num_threads(),
            saved_threads,
            saved_threads,
        )
    digest = checkpoint.weights_sha256(parts.model.state_dict(), parts.ema.state_dict())
    if decision.weights_sha256 is not None and digest != decision.weights_sha256:
        raise CheckpointError(f"{info.path}: weights loaded on rank {ctx.rank} differ from what rank 0 verified")
    log.info("resumed from %s (step %d)", info.path, parts.step)
    return info


def _decide(run: RunDir, start_over: bool) -> checkpoint.Decision | None:
    """Rank 0's choice of checkpoint; None for a fresh start, refused when every checkpoint there is invalid."""
    decision = checkpoint.decide(run.checkpoints)
    if decision is None:
        bad = checkpoint.list_checkpoints(run.checkpoints, deep=False)
        if bad and not start_over:
            raise BadCheckpointError(
                f"every checkpoint in {run.checkpoints} is invalid ("
                + "; ".join(f"{i.path.name}: {i.reason}" for i in bad[:3])
                + (" ..." if len(bad) > 3 else "")
                + "). Restore them from a copy, or pass --start-over to train again from step 0"
            )
    return decision


class _EMA:
    """Exponential moving average of the weights, updated with one fused call per step.

    The parameter lists are taken once: walking the module tree every step costs more than the average itself.
    """

    def __init__(self, ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.ema_params, self.params = list(ema.parameters()), list(model.parameters())
        self.ema_buffers, self.buffers = list(ema.buffers()), list(model.buffers())

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm the average up over the first steps so short runs still sample from trained weights.
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.ema_params, self.params, 1 - d)
        for e, b in zip(self.ema_buffers, self.buffers):
            e.copy_(b)


def _save(
    parts: _Parts, job: JobConfig, ctx: Context, run: RunDir, saver: checkpoint.Saver | None, watch: Watch
) -> None:
    """Rank 0 writes (replicas are checked bitwise equal first); the others go on with the next step."""
    digest = checkpoint.weights_sha256(parts.model.state_dict(), parts.ema.state_dict())
    digests = ctx.all_gather_object(digest)
    if len(set(digests)) != 1:
        # DDP keeps replicas bitwise equal; if they drift, a checkpoint of rank 0 would silently lose the others.
        raise RuntimeError(f"weights differ across ranks at step {parts.step}: {digests}")
    if saver is not None:
        run.check_lease()  # no checkpoint from a writer the run was taken away from
        _record(run, saver.save(parts.step, _state(parts, job, ctx), digest), watch)


def _record(run: RunDir, saved: checkpoint.Saved | None, watch: Watch) -> None:
    """Status and event for a checkpoint once it is written and verified, with the stall it cost training."""
    watch.checkpoint(saved)
    if saved is not None:
        info = saved.info
        run.update_status(last_checkpoint=str(info.path), weights_sha256=info.weights_sha256)
        run.event(
            "checkpoint",
            step=info.step,
            path=str(info.path),
            seconds=round(saved.stall_s, 4),
            write_seconds=round(saved.write_s, 4),
        )


def _progress_bar(start: int, total: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
