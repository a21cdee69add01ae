"""A DataLoader worker's batch memory, reused once the main process has let go of a batch.

A batch a worker hands over lives in shared memory. New memory for every batch costs the worker a
segment and a page fault for each 4 KB page it writes: ~5 ms of a batch of 16 four-second clips
(~30 ms in all) on the 2-core machine of bench/read.py. So each worker keeps a few segments (slots)
and refills one only once the main process holds no tensor of the batch it carried.

Protocol, one table per worker process (int64 shared memory, made by the worker):
- table[0]: 1 once the main process holds the table; until then every batch carries it along;
- table[1 + k]: 0 while slot k is free, else the lease (a number unique in the table) of the batch it carries.
The worker claims a slot only while it is 0. The main process, unpickling a batch (`_arrived`), keeps
a weak reference to its storage, and writes 0 into a slot only where it still holds the lease of a
batch whose storages have all expired: no tensor or view of them is left in the main process.
A batch the main process forwards to yet another process must be cloned first (its memory is
refilled once the main process drops it). Anything unexpected leaves a slot taken, never freed early:
the worker then allocates new memory, as it would without slots.
"""

from __future__ import annotations

import os
import secrets
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

SLOTS = 8  # per worker: the batches in its queue (prefetch_factor), the main process's last two, one filling
_KEEP_TABLES = 64  # worker tables a main process remembers (one per worker process it has heard from)

Lease = tuple[int, int]  # (slot, lease number)


class WorkerMemory:
    """One worker process's slots (made in that process, on its first batch)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.key = secrets.randbits(62)
        self.table = torch.zeros(1 + SLOTS, dtype=torch.int64).share_memory_()
        self._states = self.table.numpy()
        self._slots: list[torch.UntypedStorage | None] = [None] * SLOTS
        self._issued = 0

    def storage(self, nbytes: int) -> tuple[torch.UntypedStorage, Lease | None]:
        """Shared memory of at least `nbytes` (contents undefined) and its lease; (new memory,
        None) while every slot is taken."""
        for k in range(SLOTS):
            if self._states[1 + k] != 0:
                continue
            storage = self._slots[k]
            if storage is None or storage.nbytes() < nbytes:
                storage = torch.UntypedStorage._new_shared(-(-nbytes * 5 // 4 // 4096) * 4096)  # room to grow
                self._slots[k] = storage
            self._issued += 1
            self._states[1 + k] = self._issued
            return storage, (k, self._issued)
        return torch.UntypedStorage._new_shared(nbytes), None

    def release(self, lease: Lease) -> None:
        """Give back a slot whose batch was never handed over (an error while filling it)."""
        k, number = lease
        if self._states[1 + k] == number:
            self._states[1 + k] = 0

    def leased(self, batch: dict[str, Any], lease: Lease) -> LeasedBatch:
        return LeasedBatch(batch, (self.pid, self.key, self.table, *lease))


class LeasedBatch(dict[str, Any]):
    """A batch whose memory is a worker's slot. Pickled to the main process it arrives as a plain
    dict and registers the slot's release there (`_arrived`)."""

    def __init__(self, batch: dict[str, Any], lease: tuple[int, int, torch.Tensor, int, int]) -> None:
        super().__init__(batch)
        self.lease = lease

    def __copy__(self) -> LeasedBatch:  # torch's default_convert copies a batch in the worker
        return LeasedBatch(self, self.lease)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:  # new memory: no slot to give back
        import copy

        return copy.deepcopy(dict(self), memo)

    def __reduce__(self) -> tuple[Any, ...]:
        pid, key, table, slot, number = self.lease
        carried = None if int(table[0]) == 1 else table  # sent until the main process has it
        return _arrived, (dict(self), pid, key, carried, slot, number)


# In the main process: worker key -> its table (the tensor, which keeps the shared memory, and its array).
_tables: OrderedDict[int, tuple[torch.Tensor, np.ndarray]] = OrderedDict()
_pending: dict[tuple[int, int, int], list[StorageWeakRef]] = {}  # (key, slot, lease) -> the batch's storages
released = 0  # slots given back by this process (tests read it)


def _arrived(batch: dict[str, Any], pid: int, key: int, table: torch.Tensor | None, slot: int,
             number: int) -> dict[str, Any]:
    """Unpickling a LeasedBatch: in the worker itself (a copy) it stays leased; elsewhere the
    batch's storages are watched and the slots of batches let go since are given back."""
    if os.getpid() == pid:  # pickled and unpickled in the worker: the slot stays taken
        return batch
    if table is not None:
        _remember(key, table)
    if key in _tables:
        _pending.setdefault((key, slot, number), []).extend(_storages(batch))
    _sweep()
    return batch


def _remember(key: int, table: torch.Tensor) -> None:
    _tables[key] = (table, table.numpy())
    _tables.move_to_end(key)
    _tables[key][1][0] = 1
    while len(_tables) > _KEEP_TABLES:  # a worker long gone; one still alive sends its table again
        _, (_, states) = _tables.popitem(last=False)
        states[0] = 0


def _storages(batch: dict[str, Any]) -> list[StorageWeakRef]:
    """Weak references to the distinct storages of the batch's tensors (one, as pack_tensors makes it)."""
    seen: dict[int, StorageWeakRef] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen.setdefault(storage.data_ptr(), StorageWeakRef(storage))

    walk(batch)
    return list(seen.values())


def _sweep() -> None:
    global released
    for entry in [e for e, refs in _pending.items() if all(r.expired() for r in refs)]:
        del _pending[entry]
        key, slot, number = entry
        states = _tables[key][1] if key in _tables else None
        if states is not None and states[1 + slot] == number:
            states[1 + slot] = 0
            released += 1


__all__ = ["SLOTS", "LeasedBatch", "WorkerMemory"]
