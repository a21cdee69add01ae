"""One run at a time: a lease object in the run's staging area, created create-only and renewed by
compare-and-swap while the run works.

Two launches of the same run (a cron trigger and a manual run, a flow retry racing a user) would
overwrite each other's staged shards and then both fail at commit. The second launch finds the
lease instead: it exits at once naming the holder ("started …, host …, pid …") or waits for it, by config.
A holder that died stops renewing; once its lease has expired, the next launch takes it over with a
compare-and-swap, so exactly one of several waiting launches wins. On the holder's own machine a
dead holder is recognised at once (its process is gone), so a re-run after `kill -9` resumes
without waiting for the expiry. The lease lives in the same store
as the run (local directory or S3) and uses only the store's create-only and compare-and-swap writes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self

from pydantic import BaseModel, ValidationError

from storage.layout import RunLayout
from storage.objectstore import NotFound, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)


class LeaseInfo(BaseModel):
    """What the lease object says: who holds the run, since when, until when unless renewed."""

    holder: str  # a fresh id per launch
    host: str
    pid: int
    started_at: datetime
    expires_at: datetime
    # The kernel's boot id and the process's start time (clock ticks after boot): with host and pid
    # they tell a dead holder on this machine from a live one, even after the pid is reused.
    boot_id: str | None = None
    proc_start: int | None = None

    def describe(self) -> str:
        return (f"started {self.started_at:%Y-%m-%d %H:%M:%SZ}, host {self.host}, pid {self.pid}, lease valid until "
                f"{self.expires_at:%H:%M:%SZ}")


class RunBusy(RuntimeError):
    """Another launch of the same run holds its lease (the message names it)."""

    def __init__(self, run_id: str, info: LeaseInfo) -> None:
        super().__init__(f"run {run_id} is in progress ({info.describe()}); wait for it to finish, or set "
                         "output.when_running: wait to queue behind it")
        self.info = info


class LeaseLost(RuntimeError):
    """This launch's lease was taken over (it could not renew in time): it must not commit."""


def _now() -> datetime:
    return datetime.now(UTC)


def _boot_id() -> str | None:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip() or None
    except OSError:
        return None


def _proc_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks after boot (Linux), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat; the first two (pid, comm) precede the split
    except (OSError, IndexError, ValueError):
        return None


# Holder ids of the leases this process holds now: a lease written by this very process under
# another id is a finished launch whose release could not delete it (e.g. the store was down).
_held: set[str] = set()
_held_lock = threading.Lock()


def _holder_is_dead(info: LeaseInfo) -> bool:
    """True only when the holder ran on this machine (same host name and boot) and is gone: its
    process ended, or it is this process and that launch has released its lease."""
    if info.host != socket.gethostname() or info.boot_id is None or info.boot_id != _boot_id():
        return False
    if info.proc_start is None or _proc_start(info.pid) != info.proc_start:
        return True
    if info.pid == os.getpid():
        with _held_lock:
            return info.holder not in _held
    return False


class RunLease:
    """Hold `<staging>/lease.json` for the duration of a `with` block (renewed in a thread)."""

    def __init__(self, store: ObjectStore, staging: str, run_id: str, *, ttl_s: float = 60.0,
                 wait: bool = False, poll_s: float | None = None) -> None:
        self.store, self.key, self.run_id = store, RunLayout(staging).lease, run_id
        self.ttl_s, self.wait = ttl_s, wait
        self.poll_s = poll_s if poll_s is not None else max(0.5, min(5.0, ttl_s / 6))
        self.info = LeaseInfo(holder=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                              started_at=_now(), expires_at=_now(), boot_id=_boot_id(),
                              proc_start=_proc_start(os.getpid()))
        self._etag: str | None = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release -----------------------------------------------------------------
    def _body(self) -> bytes:
        self.info = self.info.model_copy(update={"expires_at": _now() + timedelta(seconds=self.ttl_s)})
        return self.info.model_dump_json().encode()

    def _current(self) -> tuple[LeaseInfo | None, str | None]:
        try:
            data, etag = self.store.get_with_etag(self.key)
        except NotFound:
            return None, None
        try:
            return LeaseInfo.model_validate_json(data), etag
        except (ValidationError, ValueError):
            return None, etag  # unreadable: treat as expired, replace it by compare-and-swap

    def _try_acquire(self) -> LeaseInfo | None:
        """Take the lease if free or expired; else the holder's info."""
        try:
            self._etag = self.store.put_bytes(self.key, self._body(), if_none_match=True)
            return None
        except PreconditionFailed:
            pass
        current, etag = self._current()
        if etag is None:  # released between our two calls: try again at once
            return self._try_acquire()
        if current is not None and current.expires_at > _now() and not _holder_is_dead(current):
            return current
        try:
            self._etag = self.store.put_bytes(self.key, self._body(), if_match=etag)
        except PreconditionFailed:  # another launch took it over first
            again, _ = self._current()
            return again or current
        if current is not None:
            why = "expired" if current.expires_at <= _now() else "dead holder's"
            log.warning("run %s: took over the %s lease of %s", self.run_id, why, current.describe())
        return None

    def acquire(self) -> None:
        while True:
            holder = self._try_acquire()
            if holder is None:
                break
            if not self.wait:
                raise RunBusy(self.run_id, holder)
            log.info("run %s is in progress (%s); waiting", self.run_id, holder.describe())
            time.sleep(self.poll_s)
        with _held_lock:
            _held.add(self.info.holder)
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        with _held_lock:
            _held.discard(self.info.holder)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._lost.is_set():
            return
        current, _ = self._current()
        if current is not None and current.holder == self.info.holder:
            try:
                self.store.delete(self.key)
            except Exception as exc:  # noqa: BLE001 - an expired lease is harmless; the next launch takes it over
                log.warning("run %s: could not remove its lease: %s", self.run_id, exc)

    # -- renewal ---------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                assert self._etag is not None
                self._etag = self.store.put_bytes(self.key, self._body(), if_match=self._etag)
            except PreconditionFailed:
                self._lost.set()
                log.error("run %s: lost its lease to another launch; this one will not commit", self.run_id)
                return
            except Exception as exc:  # noqa: BLE001 - a store hiccup: try again next interval
                log.warning("run %s: could not renew its lease (%s); retrying", self.run_id, exc)

    def check(self) -> None:
        """Raise LeaseLost unless this launch still holds the lease (called before commit)."""
        current, _ = self._current()
        if self._lost.is_set() or current is None or current.holder != self.info.holder:
            self._lost.set()
            raise LeaseLost(f"run {self.run_id}: another launch took over this run's lease (this one stalled past "
                            f"{self.ttl_s:.0f} s without renewing); not committing, the other launch will")

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def read_lease(store: ObjectStore, staging: str) -> LeaseInfo | None:
    """The lease of a run's staging area, if any (for `gc`: a live run's staging is never removed)."""
    try:
        return LeaseInfo.model_validate(json.loads(store.get_bytes(RunLayout(staging).lease)))
    except (NotFound, ValidationError, ValueError):
        return None
