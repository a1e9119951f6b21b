"""Launch target of the FSDP and DeepSpeed tests: aligndistil's CLI, with accelerate's FSDP and
DeepSpeed allowed on CPU processes.

accelerate 1.15 switches FSDP and DeepSpeed on only when it finds GPUs. On a CPU-only
multi-process launch it falls back to gloo data parallelism and silently drops the sharding
(checked: the wrapper is DDP and ``distributed_type`` is ``MULTI_CPU``). Both run on CPU
processes over gloo: torch's FSDP2 as it is, DeepSpeed through its own CPU accelerator.
This file lifts accelerate's GPU check for the launch it is given and changes nothing
else, so the trainer's sharded code (gathered saving, name-keyed optimizer state, sharded
frozen models, DeepSpeed's engine and its accumulation boundary) runs here as on GPUs:

    python -m accelerate.commands.launch --config_file fsdp_cpu.yaml tests/train/_sharded_cpu.py train ...

- FSDP: after accelerate's state is set up as gloo data parallelism, its type is set back to
  FSDP (the plugin it was given is kept).
- DeepSpeed: accelerate starts DeepSpeed's process group only when ``cpu=False``, and finds
  no backend without a GPU; the trainer is told it is not a CPU-only launch and accelerate
  gets gloo as the backend, as it would get NCCL on GPUs. DeepSpeed's compiled shared-memory
  all-reduce (a CPU speed-up) is left out: plain gloo collectives.
"""

import os
import runpy
import sys

from accelerate import state as S
from accelerate.utils import DistributedType

_init = S.AcceleratorState.__init__
_backend = S.PartialState._prepare_backend


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _keep_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if _flag("ACCELERATE_USE_FSDP") and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if kwargs.get("fsdp_plugin") is not None:  # later no-argument calls read the shared state
            self.fsdp_plugin = kwargs["fsdp_plugin"]


def _gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
    if _flag("ACCELERATE_USE_DEEPSPEED") and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU  # DeepSpeed's init runs first; accelerate then reads the rank
    return _backend(self, cpu, sagemaker_dp, backend)


S.AcceleratorState.__init__ = _keep_fsdp
S.PartialState._prepare_backend = _gloo_for_deepspeed
if _flag("ACCELERATE_USE_DEEPSPEED"):
    import deepspeed.ops

    from aligndistil.train import accel

    accel.cpu_only_multiprocess = lambda: False  # cpu=True would make accelerate drop DeepSpeed
    # DeepSpeed's CPU backend compiles a shared-memory all-reduce kernel on first use (about
    # 40 s on 2 cores, and a C++ compiler); gloo's own collectives serve these tests as well.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed then builds none

if __name__ == "__main__":
    sys.argv = ["aligndistil", *sys.argv[1:]]
    runpy.run_module("aligndistil", run_name="__main__")
