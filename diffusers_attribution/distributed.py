"""Processes that share the work: a thin layer over accelerate, a no-op when there is one process.

Work is split by shard, never by padded batches: process r of W takes items r, r + W, r + 2W, ... of a
list every process agrees on (broadcast from the main process), so there are no duplicates and no gaps.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch


def launched_with_several_processes() -> bool:
    """True inside `accelerate launch` / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def partial_state():
    """accelerate's `PartialState`, on the CPU (gloo) when `ACCELERATE_USE_CPU` is set, as `Accelerator` does."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if launched_with_several_processes() and state.num_processes == 1:
        raise RuntimeError(
            f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up a single process (no GPU "
            "found?): every process would compute everything. On CPUs, set ACCELERATE_USE_CPU=1"
        )
    return state


class ProcessGroup:
    """Rank, world size, barrier, broadcast, gather and sum for `accelerator` (or the launch environment)."""

    def __init__(self, accelerator: Any = None):
        self.state = None
        if accelerator is not None:
            self.state = getattr(accelerator, "state", accelerator)
        elif launched_with_several_processes():
            self.state = partial_state()
        self.rank = self.state.process_index if self.state is not None else 0
        self.world = self.state.num_processes if self.state is not None else 1
        self.device = self.state.device if self.state is not None else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This process's part of `items`: every world-th item, starting at its rank."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        """The main process's `value`, on every process (picklable Python objects, sent between our own processes)."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def settle(self, error: BaseException | None) -> None:
        """After a step only the main process ran (with `error` if it failed): every process raises if it failed —
        the main process its own error, the others a `StoreMismatchError` or `RuntimeError` with its message — so
        that none waits for a main process that failed."""
        from .store.errors import StoreMismatchError

        status = None
        if self.is_main and error is not None:
            status = {"mismatch": isinstance(error, StoreMismatchError), "error": f"{type(error).__name__}: {error}"}
        status = self.broadcast(status if self.is_main else None)
        if error is not None:
            raise error
        if status:
            raise (StoreMismatchError if status["mismatch"] else RuntimeError)(status["error"])

    def gather(self, value: Any) -> list:
        """Every process's `value`, in rank order, on every process."""
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over processes (on the CPU, same dtype)."""
        if self.world == 1:
            return tensor
        from accelerate.utils import reduce

        device = self.device if self.device is not None and self.device.type != "cpu" else "cpu"
        return reduce(tensor.to(device), "sum").cpu()
