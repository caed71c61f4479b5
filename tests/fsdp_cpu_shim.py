"""Test-only launcher: run an algorithm script under accelerate's own FSDP path on CPU (gloo) processes.

    accelerate launch --config_file CONFIG --num_processes 2 --mixed_precision no tests/fsdp_cpu_shim.py dqo.py ARGS

`accelerate launch` reads CONFIG and sets the FSDP environment of each process exactly as on a GPU node; the script then
builds its FullyShardedDataParallelPlugin from that environment and `accelerator.prepare` wraps the models with
accelerate's own FSDP1/FSDP2 code. What accelerate cannot do on CPU, and this shim changes after `Accelerator.__init__`:
  - AcceleratorState sets distributed_type FSDP only for GPU-like devices: the shim sets it (and the plugin) on the
    gloo CPU state, in PartialState's shared state too, since every later AcceleratorState() copies that one over;
  - FSDP1 requires the compute device to equal `device_id`: the shim sets the state's device to plain `cpu`.
Not covered here: NCCL, bf16 mixed precision, `fsdp_sync_module_states` and `fsdp_cpu_ram_efficient_loading` (both
need a GPU in accelerate's FSDP1 plugin).
"""

import os
import runpy
import sys

import accelerate
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    fsdp = {"distributed_type": DistributedType.FSDP, "device": torch.device("cpu")}
    # Both shared dicts: AcceleratorState() (built again e.g. by every AcceleratedOptimizer) copies PartialState's over its own
    PartialState._shared_state.update(fsdp)
    AcceleratorState._shared_state.update(fsdp, fsdp_plugin=FullyShardedDataParallelPlugin())  # from accelerate launch's env


accelerate.Accelerator.__init__ = _init_fsdp_on_cpu
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # the script's own imports (common)
runpy.run_path(sys.argv[0], run_name="__main__")
