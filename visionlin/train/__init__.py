"""Training, validation and benchmark entry points over public visionlin and timm APIs.

Submodules are imported on use (``from visionlin.train import scaling``): importing this package loads nothing heavy.

- ``scaling``: forward latency and peak memory as the input grows (the ``visionlin demo`` command).
"""

__all__: list[str] = []
