"""The ``accelerate`` set-up the training loop runs on: precision, DeepSpeed, seeds.

Precision. The trained policy always holds float32 master weights (and AdamW float32
states): an update of lr 1e-6 is far below half the spacing of bfloat16 numbers near a
typical weight (about 1e-4), so a policy stored in bfloat16 rounds most updates away and
does not train. ``model.dtype`` sets the dtype of the frozen models and of the policy's
forward, which runs under autocast through accelerate's ``mixed_precision`` (``bf16`` /
``fp16``). A precision chosen at launch (``accelerate launch --mixed_precision bf16`` or an
accelerate config) wins over ``model.dtype``.

DeepSpeed. Accelerate cannot size DeepSpeed's batch without a DataLoader (the loop has
none: it builds its own micro-batches), so :func:`resolve_deepspeed_config` fills the
config's ``auto`` values from the run config before ``prepare``: micro-batch, accumulation,
global batch and ``gradient_clipping`` from ``train.max_grad_norm``. DeepSpeed is told the
true accumulation, and the loop marks each micro-batch's boundary itself (``sync_gradients``
true on the last one only), so the engine steps once per optimizer step.

Seeds. Every process initialises with ``train.seed``; sampling noise afterwards uses
``train.seed + rank`` so that processes do not draw the same on-policy samples.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch

from aligndistil.config import ConfigError, RunConfig

#: ``model.dtype`` -> accelerate's ``mixed_precision`` name.
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def cpu_only_multiprocess() -> bool:
    """True when launched as several processes (torchrun / accelerate launch --multi_gpu) on a
    machine without a GPU: accelerate then needs ``cpu=True`` to set up gloo data parallelism
    (its own ``--cpu`` launcher starts several processes only through MPI)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def choose_mixed_precision(dtype: str, on_cpu: bool, launched: str | None) -> tuple[str, str | None]:
    """The ``mixed_precision`` to run the policy's forward with, and a warning (or None).

    Args:
        dtype: ``model.dtype``.
        on_cpu: no accelerator device is used.
        launched: ``ACCELERATE_MIXED_PRECISION`` as set by ``accelerate launch`` (``no`` or
            unset: the user chose nothing).
    """
    if launched in ("bf16", "fp16"):
        wanted = MIXED_PRECISION[dtype]
        note = None if wanted == launched else (
            f"accelerate was launched with mixed_precision={launched}; it wins over model.dtype={dtype} for the policy")
        return launched, note
    if dtype == "float16" and on_cpu:
        return "no", ("model.dtype=float16: autocast in float16 needs a GPU, so on this CPU the policy's forward "
                      "runs in float32 (the frozen models stay float16)")
    if dtype == "bfloat16" and on_cpu:
        return "bf16", ("model.dtype=bfloat16 on a CPU: autocast works but is slow on most CPUs; "
                        "model.dtype=float32 is recommended here")
    return MIXED_PRECISION[dtype], None


def make_accelerator(cfg: RunConfig):
    """An ``Accelerator`` for ``cfg`` and a precision warning (or None).

    Accelerate keeps its state in a per-process singleton that refuses a second
    ``mixed_precision``; one process may train runs of several dtypes (a pipeline), so a
    state set up for another precision is reset first (the process group survives).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = cpu_only_multiprocess()
    mp, note = choose_mixed_precision(cfg.model.dtype, on_cpu=cpu or not torch.cuda.is_available(),
                                      launched=os.environ.get("ACCELERATE_MIXED_PRECISION"))
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mp:
        AcceleratorState._reset_state()
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.ddp_timeout))
    return Accelerator(cpu=cpu, mixed_precision=mp, kwargs_handlers=[timeout]), note


def uses_deepspeed(acc) -> bool:
    return getattr(acc.state, "deepspeed_plugin", None) is not None


def zero_stage(acc) -> int | None:
    """DeepSpeed's ZeRO stage for this launch (None without DeepSpeed)."""
    if not uses_deepspeed(acc):
        return None
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def resolve_deepspeed_config(ds: dict, *, per_device_batch_size: int, gradient_accumulation_steps: int,
                             world_size: int, max_grad_norm: float) -> dict:
    """A copy of DeepSpeed config ``ds`` with the batch and clipping keys taken from the run.

    ``"auto"`` (or absent) values are filled; an explicit value that disagrees with the run
    config is refused, since the loop's normalisation and data order follow the run config.

    Returns:
        the config with ``train_micro_batch_size_per_gpu`` = ``per_device_batch_size``,
        ``gradient_accumulation_steps``, ``train_batch_size`` = their product times
        ``world_size``, and ``gradient_clipping`` = ``max_grad_norm`` (0 turns it off, as
        ``train.max_grad_norm=0`` does).
    """
    want = {
        "train_micro_batch_size_per_gpu": (per_device_batch_size, "train.per_device_batch_size"),
        "gradient_accumulation_steps": (gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (per_device_batch_size * gradient_accumulation_steps * world_size,
                             "per_device_batch_size x gradient_accumulation_steps x processes"),
        "gradient_clipping": (float(max_grad_norm), "train.max_grad_norm"),
    }
    out = copy.deepcopy(ds)
    for key, (value, source) in want.items():
        have = out.get(key, "auto")
        if have in ("auto", None):
            out[key] = value
            continue
        try:
            same = float(have) == float(value)
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ConfigError(f"the DeepSpeed config sets {key}={have!r} but this run needs {value} ({source}); "
                              f"set it to \"auto\" to take the run's value")
    return out


def apply_deepspeed_config(acc, cfg: RunConfig) -> None:
    """Resolve the accelerator's DeepSpeed config in place before ``prepare`` (no-op without DeepSpeed)."""
    if not uses_deepspeed(acc):
        return
    t = cfg.train
    ds = acc.state.deepspeed_plugin.deepspeed_config  # the dict accelerate hands to deepspeed.initialize
    ds.update(resolve_deepspeed_config(ds, per_device_batch_size=t.per_device_batch_size,
                                       gradient_accumulation_steps=t.gradient_accumulation_steps,
                                       world_size=acc.num_processes, max_grad_norm=t.max_grad_norm))
    if zero_stage(acc) == 3:  # the trainer writes whole HF folders: gather the weights to save them
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def seed_sampling(seed: int, rank: int) -> None:
    """Seed torch (CPU and every CUDA device) and Python for this process's sampling noise."""
    import random

    torch.manual_seed(seed + rank)
    random.seed(seed + rank)


# ----------------------------------------------------------------------------- coordination
def on_main(acc, fn):
    """Run ``fn`` on the main process only and hand its result, or its error, to every
    process, so that a refusal there (a locked folder, a full disk) stops all of them
    instead of leaving the others waiting in a collective."""
    from aligndistil.errors import AlignDistilError

    if acc.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box, err = [None], None
    if acc.is_main_process:
        try:
            box = [("ok", fn())]
        except AlignDistilError as e:
            err, box = e, [("error", f"{e.label}: {e}")]
    box = broadcast_object_list(box, from_process=0)
    if err is not None:
        raise err
    if box[0][0] == "error":
        raise StoppedWithMain(f"stopped with the main process ({box[0][1]})")
    return box[0][1]


class StoppedWithMain(Exception):
    """Raised on the other processes when the main one refused (its error is in the message)."""


def deepspeed_backward(acc, loss: torch.Tensor, step_loss: torch.Tensor, last: bool) -> bool:
    """Backward of one micro-batch under DeepSpeed, whose engine steps inside ``backward``
    at an accumulation boundary; returns False, before any backward, when the step's loss
    (``step_loss``: this micro-batch's included) is not finite on some process.

    The loop marks the boundary itself (``sync_gradients`` true on the step's last
    micro-batch only), so the engine steps once per optimizer step, after the finiteness
    check; ``scale_wrt_gas=False`` because ``loss`` is already this micro-batch's share of
    the step's mean, which the engine would otherwise divide by the accumulation count
    again. Not run in this repository's tests: deepspeed is not installed here.
    """
    if last:
        total = acc.reduce(step_loss.clone(), reduction="sum") if acc.num_processes > 1 else step_loss
        if not torch.isfinite(total):
            return False
    acc.gradient_state._set_sync_gradients(last)  # what accelerate's own accumulate() sets
    try:
        acc.backward(loss, scale_wrt_gas=False)
    finally:
        acc.gradient_state._set_sync_gradients(True)
    return True


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """With ``train.progress_bar=false``, silence transformers' and the hub's own bars
    (checkpoint loading, shards) too, and restore them afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
        hub_was_off = are_progress_bars_disabled()
        disable_progress_bars()
    except ImportError:  # an older huggingface_hub
        hub_was_off, enable_progress_bars = True, None
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
        if not hub_was_off and enable_progress_bars is not None:
            enable_progress_bars()
