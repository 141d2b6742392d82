"""Run the ``visionlin`` command with accelerate's FSDP path on CPU processes (test helper, launched by torchrun).

accelerate forms an FSDP group only on GPUs; on CPU processes it falls back to DDP (``MULTI_CPU``). PyTorch's
``fully_shard`` itself runs on CPU tensors over gloo, so this helper switches the distributed type to FSDP when a
plugin was given, which lets the CPU tests exercise ``--fsdp`` (sharded wrapping, full-state checkpoints, exact
resume). It changes nothing else.
"""

import sys

import accelerate.state as state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from visionlin.cli import main

    sys.exit(main(sys.argv[1:]))
