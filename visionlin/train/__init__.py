"""Training, validation and benchmark entry points over public visionlin and timm APIs.

Submodules are imported on use (``from visionlin.train import scaling``): importing this package loads nothing heavy.

- ``scaling``: forward latency and peak memory as the input grows (the ``visionlin demo`` command).
- ``bench``: GPU benchmarks next to a dense twin: inference across sizes, training step, largest input (the
  ``visionlin bench`` command); ``bench_op``: the linear-attention op (``visionlin bench op``).
"""

__all__: list[str] = []
