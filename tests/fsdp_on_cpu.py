"""Run the ``visionlin`` command with accelerate's FSDP path on CPU processes (test helper, launched by torchrun).

accelerate forms an FSDP group only on GPUs; on CPU processes it falls back to DDP (``MULTI_CPU``). PyTorch's
``fully_shard`` itself runs on CPU tensors over gloo, so this helper switches the distributed type to FSDP when a
plugin was given, which lets the CPU tests exercise ``--fsdp`` (sharded wrapping, full-state checkpoints, exact
resume). It changes nothing else in the run.

It prints how many gloo threads are left once the command has returned (a test reads it), flushes the output and ends
the process with ``os._exit``. FSDP's ``DTensor`` machinery keeps references to the gloo process group that
``destroy_process_group`` does not release (torch 2.14: the group's two ``pt_gloo_runloop`` worker threads are still
alive after the run and a ``gc.collect()``, where a DDP run's group is gone by then), so those threads live into
interpreter finalization. The full CI runs' resumed FSDP run aborted there three times ("terminate called without an
active exception", exit -6, after a run that had completed and written its last checkpoint; never reproduced here, 0
in 60 runs under load). The likely mechanism: a worker that drops its last finished collective late (a loaded machine)
frees a tensor whose Python object it owns and takes the GIL while the interpreter finalizes, which ends the thread
through a ``noexcept`` frame. A GPU run (NCCL, whose ``shutdown`` stops its threads) and a CPU DDP run (its group is
destroyed with the model, before finalization) do not take this path.
"""

import contextlib
import os
import sys
from pathlib import Path

import accelerate.state as state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu


def _gloo_threads() -> int:
    """How many of this process's threads are gloo's (``pt_gloo_runloop`` workers, ``gloo_tcp_loop``); Linux only."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append(comm.read_text().strip())
    return sum(n.startswith(("pt_gloo", "gloo_")) for n in names)


if __name__ == "__main__":
    from visionlin.cli import main

    status = main(sys.argv[1:])  # an exception propagates as usual (a failed run)
    print(f"gloo threads left after the command: {_gloo_threads()}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status is None else int(status))
