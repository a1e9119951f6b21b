"""Launch target of the FSDP tests: aligndistil's CLI, with accelerate's FSDP allowed on CPU.

accelerate 1.15 switches FSDP on only when it finds GPUs (on a CPU-only multi-process launch
it falls back to gloo data parallelism, silently dropping the sharding), and with
``sync_module_states`` it asks for a GPU to initialise weights on. torch's FSDP2 itself runs
on CPU processes over gloo. This file keeps accelerate's FSDP state on such a launch and
changes nothing else, so the trainer's FSDP code (gathered saving, name-keyed optimizer
state, sharded frozen models) runs here as it would on GPUs:

    python -m accelerate.commands.launch --config_file fsdp_cpu.yaml tests/train/_fsdp_cpu.py train ...
"""

import os
import runpy
import sys

from accelerate import state as S
from accelerate.utils import DistributedType

_init = S.AcceleratorState.__init__


def _keep_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if kwargs.get("fsdp_plugin") is not None:  # later no-argument calls read the shared state
            self.fsdp_plugin = kwargs["fsdp_plugin"]


S.AcceleratorState.__init__ = _keep_fsdp

if __name__ == "__main__":
    sys.argv = ["aligndistil", *sys.argv[1:]]
    runpy.run_module("aligndistil", run_name="__main__")
