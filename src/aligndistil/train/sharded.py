"""What sharded training (FSDP, DeepSpeed ZeRO-3) changes about saving and resuming.

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

Without sharding (one process, DDP) every function here is the plain
``state_dict()`` / ``load_state_dict()`` of before, and checkpoints keep their format.
DeepSpeed keeps its own optimizer state; only its ZeRO-3 weights go through here
(accelerate's ``get_state_dict`` consolidates them).
"""

from __future__ import annotations

import torch.nn as nn

from aligndistil.model.outputs import unwrap

#: ``trainer_state.pt``'s ``optimizer_format`` when the optimizer state is the full,
#: name-keyed one of :func:`optimizer_state` (absent: ``torch.optim``'s own, id-keyed).
FULL_BY_NAME = "full_by_name"


def is_fsdp(acc) -> bool:
    return "FSDP" in str(getattr(acc, "distributed_type", "")).upper()


def is_fsdp2(acc) -> bool:
    return is_fsdp(acc) and getattr(getattr(acc, "state", None), "fsdp_plugin", None) is not None \
        and acc.state.fsdp_plugin.fsdp_version == 2


def is_sharded(acc) -> bool:
    """FSDP, or DeepSpeed (whose ZeRO-3 shards weights; accelerate's gather handles every stage)."""
    kind = str(getattr(acc, "distributed_type", "")).upper()
    return "FSDP" in kind or "DEEPSPEED" in kind


def model_state(acc, model) -> dict | None:
    """The full state dict of a prepared ``model``, gathered on every process (call it on all
    of them); None when nothing is sharded (the writer then reads the model itself). On the
    main process it holds every parameter, on CPU; the others may hold nothing."""
    if not is_sharded(acc):
        return None
    return acc.get_state_dict(model, unwrap=True)


def _named(policy, modules: dict) -> nn.Module:
    """One module holding the policy and the extra modules under their names, so that the
    optimizer (whose groups span all of them) can be keyed by parameter name."""
    return nn.ModuleDict({"policy": policy, **{f"module_{k}": m for k, m in modules.items()}})


def optimizer_state(acc, policy, modules: dict, optimizer) -> tuple[dict, str | None]:
    """``(state, format)`` of ``optimizer`` for ``trainer_state.pt``; call on every process.

    Under FSDP the full state keyed by parameter name (:data:`FULL_BY_NAME`), gathered to the
    CPU; otherwise ``optimizer.state_dict()`` and format None.
    """
    if not is_fsdp(acc):
        return optimizer.state_dict(), None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch's optimizer
    state = get_optimizer_state_dict(_named(policy, modules), opt,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state, FULL_BY_NAME


def load_optimizer_state(acc, policy, modules: dict, optimizer, state: dict, fmt: str | None) -> None:
    """Load what :func:`optimizer_state` saved into the PREPARED ``optimizer`` (every process).

    Raises:
        ValueError: the checkpoint's format does not fit this launch (a sharded checkpoint
            resumed without FSDP, or the other way round).
    """
    if (fmt == FULL_BY_NAME) != is_fsdp(acc):
        saved = "under FSDP" if fmt == FULL_BY_NAME else "without FSDP"
        raise ValueError(f"the checkpoint's optimizer state was written {saved}; resume it with the same "
                         "kind of launch (or start afresh)")
    if fmt != FULL_BY_NAME:
        optimizer.load_state_dict(state)
        return
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
    the rest. Every process must call it, and every forward of the model is then a
    collective (all processes run it, on their own batches, as the training step does).
    Elsewhere (one process, DDP, FSDP1) the model is returned as it is: whole on every process.
    """
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
