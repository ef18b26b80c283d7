"""How much memory a training job needs, measured before anything is submitted.

The job's network, EMA copy and AdamW are built on the meta device (shapes, no data) and two training steps run
there, under a dispatch mode that adds up the bytes of every tensor when it is created and takes them off when it
is freed. Its peak is the step's peak of live tensors: weights, EMA, optimizer state, gradients, what autograd
saves for the backward pass and the temporaries around it. Nothing is computed, so a 1 mm volume is planned in
seconds on a laptop. bf16 autocast has no meta implementation: its casts are replayed by a function mode that
follows CUDA autocast's rules (convolutions, linear layers and attention in bf16; normalisation in float32).
Not counted: the CUDA context and kernels' workspaces (cuDNN, cuBLAS), and the caching allocator's fragmentation,
together often 1-3 GiB on a GPU: the plan adds a margin for them.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from hpcdiff.models import AutoencoderConfig, CovariateSpec, FlowMatching
from hpcdiff.networks import ModelConfig, build_model_config, build_network, build_objective_from
from hpcdiff.train_config import JobConfig

META = torch.device("meta")


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages on the meta device, and their peak, while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # storages keep one Python object while they live, so id() names them
        if key in self._seen:
            return
        self._seen.add(key)
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n


_TO_BF16 = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose3d, F.linear, F.scaled_dot_product_attention}
_TO_BF16 |= {torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul}
_TO_FP32 = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, F.mse_loss, F.l1_loss, torch.Tensor.softmax}


class Bf16Autocast(TorchFunctionMode):
    """CUDA autocast's casts, replayed on any device: low-precision ops get bf16 inputs, norms and losses float32.

    Like autocast, the casts happen above autograd, so what the backward pass keeps is the cast copies.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        dtype = torch.bfloat16 if func in _TO_BF16 else torch.float32 if func in _TO_FP32 else None
        if dtype is not None:

            def cast(v: Any) -> Any:
                return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs or {})
        return func(*args, **(kwargs or {}))


@dataclass
class StepMemory:
    """What two simulated training steps allocated."""

    parameters: int
    """Trainable parameters."""
    state_bytes: int
    """Weights + EMA + AdamW state + gradients: resident through training."""
    peak_bytes: int
    """Peak of live tensors over the steps."""
    checkpoint_bytes: int
    """Tensors in a checkpoint: weights, EMA and optimizer state."""

    @property
    def activation_bytes(self) -> int:
        """The peak above the resident state: saved activations and the temporaries of the step."""
        return self.peak_bytes - self.state_bytes


def input_shape(job: JobConfig, volume_shape: Sequence[int]) -> tuple[int, ...]:
    """One training sample's (C, *spatial): the patch, the whole volume, or a 2D slice."""
    channels = int(job.model.get("in_channels", 1))  # C of latent shards: give model.in_channels to plan for them
    if job.data.mode == "2d":
        return (channels, *(s for a, s in enumerate(volume_shape) if a != job.data.slice_axis))
    return (channels, *(job.data.patch_size or volume_shape))


def measure_step(
    job: JobConfig,
    volume_shape: Sequence[int],
    specs: list[CovariateSpec],
    *,
    batch_size: int | None = None,
    checkpointing: bool | None = None,
    device: torch.device = META,
) -> StepMemory:
    """Two AdamW training steps of the job's model (build, EMA, optimizer included) under ``LiveBytes``.

    Args:
        job: the checked job config; its precision picks fp32 or emulated bf16 autocast.
        volume_shape: (D, H, W) of the shards.
        specs: covariates the model is built with (the steps themselves run unconditioned: the embedding of a few
            covariates is negligible).
        batch_size: samples per step (default: data.batch_size).
        checkpointing: override model.checkpointing.
        device: meta to plan; cpu runs the same steps for real (what the plan is checked against).
    """
    cfg = build_model_config(job, specs)
    if checkpointing is not None:
        cfg = replace(cfg, checkpointing=checkpointing)
    batch = job.data.batch_size if batch_size is None else batch_size
    shape = (batch, *input_shape(job, volume_shape))
    autocast = Bf16Autocast() if job.train.precision == "bf16" else None
    with LiveBytes() as mem:
        with device:
            model = build_network(cfg)
            ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = _training_step(cfg, job, model, shape, device)
        for i in range(2):
            optimizer.zero_grad(set_to_none=True)
            with autocast or contextlib.nullcontext():
                _backward(step(i))
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.001)
        params = sum(p.numel() for p in model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        optim_bytes = sum(
            v.numel() * v.element_size()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.ndim > 0
        )
    return StepMemory(
        parameters=params,
        state_bytes=3 * param_bytes + optim_bytes,
        peak_bytes=mem.peak,
        checkpoint_bytes=2 * param_bytes + optim_bytes,
    )


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without going through the function modes.

    A mode is off while it handles a call, so ``Tensor.backward`` run by ``Bf16Autocast`` would run without it, and
    activation checkpointing, which replays blocks' forward inside the backward pass, would replay them uncast.
    """
    torch.autograd.graph._engine_run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True
    )


def _training_step(
    cfg: ModelConfig, job: JobConfig, model: torch.nn.Module, shape: tuple[int, ...], device: torch.device
) -> Callable[[int], torch.Tensor]:
    """The loss of one step as the training loop computes it; noise generators live on the CPU."""
    objective = build_objective_from(job)
    x = torch.zeros(shape, device=device)
    if not isinstance(cfg, AutoencoderConfig) and job.objective.get("kind") == "ddpm":
        # DDPM indexes its CPU schedule with the timesteps, which a meta tensor cannot do; its memory is that of
        # a flow step (noise, x_t and target the size of the input) as far as the network is concerned.
        objective = FlowMatching()

    def step(i: int) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i * shape[0] + j) for j in range(shape[0])]
        return objective.loss(model, x, None, gens)

    return step
