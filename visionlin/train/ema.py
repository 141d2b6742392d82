"""An exponential moving average of FSDP2-sharded weights (``visionlin train --fsdp --model-ema``).

timm's ``ModelEmaV3`` keeps a deep copy of the model, which a model sharded by ``fully_shard`` cannot give (its copy
would be neither whole nor a working FSDP module). Here each process keeps the average of its own shards only, as
plain tensors: the same update as ``ModelEmaV3`` (floating-point entries of the state dict ``lerp``-ed towards the
model with ``1 - decay``, the others copied; the decay and its warm-up from ``ModelEmaV3.get_decay``), so the average
is element for element what DDP's ``ModelEmaV3`` computes. The whole average exists only when it is gathered for a
checkpoint (:meth:`ShardedEma.full_state_dict`, a collective); it is evaluated by copying it into the model's shards for
the duration of the evaluation (:meth:`ShardedEma.swapped_into`), so no process ever holds a second whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .checkpoint import SELF_FILLED

__all__ = ["ShardedEma", "WholeEma", "make_ema"]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ShardedEma:
    """The moving average of ``model``'s state dict, shard by shard (see the module docstring).

    ``model`` is the sharded module whose ``state_dict()`` holds ``DTensor`` parameters (plain tensors pass through:
    buffers, or an unsharded model, for which the result equals ``ModelEmaV3``'s).
    """

    def __init__(self, model: nn.Module, decay: float, use_warmup: bool = False) -> None:
        from timm.utils import ModelEmaV3

        # a one-weight stand-in: only its decay schedule (get_decay) is used
        self._schedule = ModelEmaV3(nn.Linear(1, 1, bias=False), decay=decay, use_warmup=use_warmup)
        state = model.state_dict()
        self.names = list(state)
        self.averages = [_local(v).detach().clone() for v in state.values()]

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        state = model.state_dict()
        if list(state) != self.names:
            raise ValueError(f"the model's state dict has changed since the EMA was made: {len(state)} entries")
        return [(avg, _local(v)) for avg, v in zip(self.averages, state.values(), strict=True)]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """One ``ModelEmaV3.update`` on the local shards."""
        decay = self._schedule.get_decay(step)
        lerp_avg, lerp_new = [], []
        for avg, new in self._pairs(model):
            if avg.is_floating_point():
                lerp_avg.append(avg)
                lerp_new.append(new.detach())
            else:
                avg.copy_(new)
        if lerp_avg:
            torch._foreach_lerp_(lerp_avg, lerp_new, 1.0 - decay)

    @torch.no_grad()
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole average on the CPU, keyed as the model's state dict. Every process must call it (it gathers)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, avg, ref in zip(self.names, self.averages, model.state_dict().values(), strict=True):
            if isinstance(ref, DTensor):
                avg = DTensor.from_local(
                    avg, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape, stride=ref.stride()
                ).full_tensor()
            out[name] = avg.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Take each process's shards of a whole average (as :meth:`full_state_dict` returns it)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        # (a grid record, which the model fills in for checkpoints saved before it had one, is taken from the model)
        missing = [n for n in self.names if n not in state and not n.endswith(SELF_FILLED)]
        unexpected = [n for n in state if n not in self.names]
        if missing or unexpected:
            raise ValueError(f"EMA weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for i, (name, ref) in enumerate(zip(self.names, model.state_dict().values(), strict=True)):
            if name not in state:
                self.averages[i].copy_(_local(ref))
                continue
            full = state[name].to(device=_local(ref).device, dtype=ref.dtype)
            if tuple(full.shape) != tuple(ref.shape):
                raise ValueError(f"EMA entry {name!r} has shape {tuple(full.shape)}; the model's is {tuple(ref.shape)}")
            if isinstance(ref, DTensor):
                full = distribute_tensor(full, ref.device_mesh, ref.placements).to_local()
            self.averages[i].copy_(full)

    @contextlib.contextmanager
    def evaluated(self, model: nn.Module, eval_model: nn.Module) -> Iterator[nn.Module]:
        """``eval_model`` (the sharded wrapper) with the average in ``model``'s shards, for an evaluation."""
        with self.swapped_into(model):
            yield eval_model

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``model``'s own shards hold the average (for evaluation); restored afterwards, even on
        an error."""
        pairs = self._pairs(model)
        with torch.no_grad():
            saved = [new.detach().clone() for _, new in pairs]
            for avg, new in pairs:
                new.copy_(avg)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (_, new), old in zip(pairs, saved, strict=True):
                    new.copy_(old)


class WholeEma:
    """timm's ``ModelEmaV3`` (a whole copy of the model) behind :class:`ShardedEma`'s interface, so the trainer treats
    both alike."""

    def __init__(self, model: nn.Module, decay: float, use_warmup: bool = False) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay, use_warmup=use_warmup)

    def update(self, model: nn.Module, step: int | None = None) -> None:
        self.ema.update(model, step=step)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(state)

    @contextlib.contextmanager
    def evaluated(self, model: nn.Module, eval_model: nn.Module) -> Iterator[nn.Module]:
        yield self.ema.module


def make_ema(model: nn.Module, *, sharded: bool, decay: float, use_warmup: bool = False) -> ShardedEma | WholeEma:
    """The EMA of ``--model-ema``: per shard under FSDP, timm's ``ModelEmaV3`` otherwise."""
    return (ShardedEma if sharded else WholeEma)(model, decay=decay, use_warmup=use_warmup)
