"""What sharded training (FSDP2, DeepSpeed ZeRO) changes: saving, resuming, frozen models, sampling.

Under FSDP each process holds a shard of every parameter of the policy (and of the AdamW
moments). Three things follow, each of which fails when only the main process acts:

- A full model state dict is a COLLECTIVE: every process must take part in gathering it.
  The writer runs on the main process only (:func:`aligndistil.train.accel.on_main`), so the
  gathering happens first, on all processes, and the writer gets the gathered dict. Asking
  the main process alone to ``save_pretrained`` a sharded model hangs (FSDP1) or hands
  safetensors DTensor shards it cannot write (FSDP2, measured on two CPU processes).
- The optimizer state is sharded too: the main process's ``optimizer.state_dict()`` holds
  its shard only. The full state is gathered (parameter names as keys) on every process
  with ``torch.distributed.checkpoint.state_dict``, and a resume loads it AFTER ``prepare``
  (the sharded parameters exist only then), where each process keeps its own shard.
- Frozen models (reference, teachers) would otherwise be whole on every process, which is
  what FSDP exists to avoid: under FSDP2 they are sharded like the policy, layer by layer
  (:func:`shard_frozen`); their forwards then gather each layer's weights in turn.
- A second trainable module (SparsePO's masks) is refused: accelerate prepares one model
  per launch under FSDP2.

DeepSpeed's ZeRO optimizer partitions its state (fp32 master weights and AdamW moments)
over the processes too, in flat buffers of its own layout. Each process's partition,
DeepSpeed's own ``state_dict()``, is gathered to the main process and saved as a list
(:data:`PER_RANK`); a resume hands every process the list, from which DeepSpeed takes its
own partition, fp32 master weights included, so a bf16 model resumes without rounding.
The list fits the same number of processes only, which a resume checks. With bf16 the
weights saved are those fp32 masters, not the bf16 copy DeepSpeed runs. Under ZeRO-3 every
model is partitioned as it loads: the frozen ones get inference engines of their own
(:func:`shard_frozen`), and those that must be whole (the teacher-cache build) load outside
the partitioning (:func:`loaded_whole`).

Where every forward is a collective (FSDP, ZeRO-3: :func:`collective_forwards`), the
processes must run the same forwards, on-policy sampling included.

Without sharding (one process, DDP) every function here is the plain
``state_dict()`` / ``load_state_dict()`` of before, and checkpoints keep their format.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from aligndistil.model.outputs import unwrap
from aligndistil.train.accel import uses_deepspeed, zero_stage
from aligndistil.train.checkpoints import CheckpointError

#: ``trainer_state.pt``'s ``optimizer_format`` when the optimizer state is the full,
#: name-keyed one of :func:`optimizer_state` (absent: ``torch.optim``'s own, id-keyed).
FULL_BY_NAME = "full_by_name"
#: ``optimizer_format`` of DeepSpeed's ZeRO optimizer: one ``state_dict()`` per process, in rank order.
PER_RANK = "deepspeed_per_rank"


def is_fsdp(acc) -> bool:
    return "FSDP" in str(getattr(acc, "distributed_type", "")).upper()


def is_fsdp2(acc) -> bool:
    return is_fsdp(acc) and getattr(getattr(acc, "state", None), "fsdp_plugin", None) is not None \
        and acc.state.fsdp_plugin.fsdp_version == 2


def collective_forwards(acc) -> bool:
    """Whether every forward of the policy is a collective (its weights gathered from all
    processes as it runs): FSDP and ZeRO-3. The processes must then run the same number of
    forwards, sampling included."""
    return is_fsdp(acc) or zero_stage(acc) == 3


def is_sharded(acc) -> bool:
    """FSDP, or DeepSpeed (whose ZeRO-3 shards weights; accelerate's gather handles every stage)."""
    return is_fsdp(acc) or uses_deepspeed(acc)


def model_state(acc, model) -> dict | None:
    """The full state dict of a prepared ``model``, gathered on every process (call it on all
    of them); None when nothing is sharded (the writer then reads the model itself). On the
    main process it holds every parameter, on CPU; the others may hold nothing."""
    if not is_sharded(acc):
        return None
    state = acc.get_state_dict(model, unwrap=True)
    if uses_deepspeed(acc):
        state = _with_fp32_masters(model, state)
    return state


def _with_fp32_masters(model, state: dict) -> dict:
    """DeepSpeed with bf16 (or fp16) runs the model in that precision and keeps the fp32
    master weights in its optimizer; the weights saved are the masters, as every other
    launch saves its fp32 policy (a bf16 copy would round away what small learning rates
    added since the start). A collective: every process gathers every master."""
    from deepspeed.utils import safe_get_full_fp32_param

    net = unwrap(model)
    masters = {}
    for p in net.parameters():
        if p.dtype in (torch.bfloat16, torch.float16):
            full = safe_get_full_fp32_param(p)
            if full is not None:
                masters[id(p)] = full.detach().float().cpu()
    if not masters or state is None:
        return state
    out = dict(state)
    for key in state:  # tied weights (lm_head / embed_tokens) name one parameter twice: one tensor for both
        try:
            param = net.get_parameter(key)
        except AttributeError:
            continue  # a buffer
        if id(param) in masters:
            out[key] = masters[id(param)]
    return out


def _named(policy, modules: dict) -> nn.Module:
    """One module holding the policy and the extra modules under their names, so that the
    optimizer (whose groups span all of them) can be keyed by parameter name."""
    return nn.ModuleDict({"policy": policy, **{f"module_{k}": m for k, m in modules.items()}})


def optimizer_state(acc, policy, modules: dict, optimizer) -> tuple[dict | list, str | None]:
    """``(state, format)`` of ``optimizer`` for ``trainer_state.pt``; call on every process.

    Under FSDP the full state keyed by parameter name (:data:`FULL_BY_NAME`), gathered to the
    CPU; under DeepSpeed every process's partition, in rank order (:data:`PER_RANK`);
    otherwise ``optimizer.state_dict()`` and format None.
    """
    if uses_deepspeed(acc):
        from accelerate.utils import gather_object

        zero = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer
        mine = _to_cpu(zero.state_dict())
        return (gather_object([mine]) if acc.num_processes > 1 else [mine]), PER_RANK
    if not is_fsdp(acc):
        return optimizer.state_dict(), None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch's optimizer
    state = get_optimizer_state_dict(_named(policy, modules), opt,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state, FULL_BY_NAME


def _to_cpu(obj):
    """``obj`` with every tensor in it moved to the CPU (what is gathered and saved)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def deepspeed_state_classes() -> tuple:
    """The classes besides tensors and plain data in DeepSpeed's ZeRO optimizer state (its
    loss scaler, stage and parameter-slice records), which a ``weights_only`` load of a
    checkpoint must be allowed to rebuild; empty when DeepSpeed is not installed."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return ()
    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


def _launch_kind(fmt: str | None) -> str:
    return {FULL_BY_NAME: "under FSDP", PER_RANK: "under DeepSpeed"}.get(fmt, "without FSDP or DeepSpeed")


def check_optimizer_format(acc, state, fmt: str | None) -> None:
    """Refuse a checkpoint's optimizer state that this launch cannot load (checked when the
    checkpoint is read, before any model is loaded).

    Raises:
        CheckpointError: written under FSDP, DeepSpeed or neither, and resumed under another; or by
            another number of DeepSpeed processes.
    """
    here = PER_RANK if uses_deepspeed(acc) else FULL_BY_NAME if is_fsdp(acc) else None
    if fmt != here:
        raise CheckpointError(f"--resume: the checkpoint's optimizer state was written {_launch_kind(fmt)} and this launch "
                         f"runs {_launch_kind(here)}; resume it with the same kind of launch (or start afresh)")
    if fmt == PER_RANK and len(state) != acc.num_processes:
        raise CheckpointError(f"--resume: the checkpoint's DeepSpeed optimizer state is partitioned over {len(state)} "
                         f"processes; resume it with {len(state)}, not {acc.num_processes}")


def load_optimizer_state(acc, policy, modules: dict, optimizer, state, fmt: str | None) -> None:
    """Load what :func:`optimizer_state` saved into the PREPARED ``optimizer`` (every process);
    :func:`check_optimizer_format` first."""
    check_optimizer_format(acc, state, fmt)
    if fmt is None:
        optimizer.load_state_dict(state)
    elif fmt == PER_RANK:  # DeepSpeed takes this process's partition from the list
        zero = getattr(optimizer, "optimizer", optimizer)
        zero.load_state_dict(state, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opt = getattr(optimizer, "optimizer", optimizer)
        set_optimizer_state_dict(_named(policy, modules), opt, state, options=StateDictOptions(full_state_dict=True))


def module_states(acc, modules: dict) -> dict:
    """``name -> full state dict`` of the extra trainable modules, gathered on every process."""
    return {k: (acc.get_state_dict(m, unwrap=True) if is_sharded(acc) else unwrap(m).state_dict())
            for k, m in modules.items()}


def shard_frozen(acc, model: nn.Module, name: str, log=print) -> nn.Module:
    """Under FSDP2, shard a frozen ``model`` over the processes like the policy: each block
    its architecture declares unsplittable (``_no_split_modules``: the decoder layers), then
    the rest; under ZeRO-3, give it an inference engine (:func:`_zero3_inference`). Every
    process must call it, and every forward of the model is then a collective (all processes
    run it, on their own batches, as the training step does). Elsewhere (one process, DDP,
    ZeRO-1/2, FSDP1) the model is returned as it is: whole on every process.
    """
    if zero_stage(acc) == 3:
        return _zero3_inference(acc, model, name, log)
    if not is_fsdp2(acc):
        return model
    from torch.distributed.fsdp import fully_shard

    log(f"[fsdp] {name}: sharded over {acc.num_processes} processes")
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m)
    fully_shard(model)
    return model


@contextlib.contextmanager
def loaded_whole(acc):
    """A context in which models load whole on every process. Under ZeRO-3 transformers
    partitions every model as it loads (``zero.Init``, whenever DeepSpeed's config is
    registered with it, which accelerate does); this is for models that run on one process's
    share of the work alone (the teacher-cache build), where a partitioned model's forward, a
    collective, would wait for processes that are not running it. (accelerate's own
    ``zero3_init_context_manager(enable=False)`` registers the same ZeRO-3 config again, so
    transformers still partitions; the registration itself is lifted here.)"""
    if zero_stage(acc) != 3:
        yield
        return
    from transformers.integrations import deepspeed as hf_ds

    registered = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = registered


def _zero3_inference(acc, model: nn.Module, name: str, log) -> nn.Module:
    """Under ZeRO-3 transformers loads every model partitioned (``zero.Init``): a frozen model
    holds empty parameters until an engine gathers them around each module's forward. It is
    given an engine of its own, ZeRO-3 without an optimizer (the pattern of TRL's
    ``prepare_deepspeed``), so it stays partitioned and its forwards gather layer by layer."""
    import copy

    import deepspeed

    cfg = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": 3}
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    log(f"[deepspeed] {name}: ZeRO-3 partitioned over {acc.num_processes} processes")
    return engine
