"""Run a script under `accelerate launch` with accelerate's FSDP path switched on for the CPU (tests only).

    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 tests/scripts/fsdp_on_cpu.py \\
        recipes/commonsense.py --use_cpu true --ddp_backend gloo --bf16 false ...

accelerate 1.15 enables FSDP only for GPU-like distributed types: on a CPU-only machine it keeps MULTI_CPU and runs the
model under DDP instead, silently (the recipe now refuses that). This shim changes that one decision, after
``AcceleratorState`` has built the FSDP plugin from the launcher's config: the state says FSDP, so everything after
it is accelerate's own FSDP2 code (``fully_shard`` per decoder layer, the full state dict gathered on save, sharded
optimizer checkpoints), running on gloo. With ``fsdp_offload_params`` the ``CPUOffloadPolicy`` is kept but without
pinned memory, which needs an accelerator. Then it runs the script as ``__main__``.
"""

import runpy
import sys

import accelerate.state as state
import torch
from accelerate.utils import DistributedType
from torch.distributed.fsdp import CPUOffloadPolicy


_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        if isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy) and not torch.accelerator.is_available():
            fsdp_plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
