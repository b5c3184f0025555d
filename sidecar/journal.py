"""The sidecar's journal: charges not on the ledger yet, kept on local disk across crashes.

One append-only file of JSON lines, ``<dir>/journal.jsonl`` (format: docs/ledger.md, "The
sidecar's journal"). Three kinds of record, each with ``"v": 1``:

- ``open``: a request admitted fail-open (Redis unreachable), with the upper bound of its cost
  that it takes from the customer's fail-open allowance; written and fsync'd before the model
  is called.
- ``charge``: a cost to settle (a fail-open request that ended, or a settle that failed after
  the response); fsync'd before it is acknowledged.
- ``done``: the request is on the ledger (or had nothing to charge); not fsync'd — losing one
  only means the next start settles that charge again, which ``settle`` ignores (idempotent by
  request id).

At start the file is replayed: a request whose last record is not ``done`` is pending again.
A partial last line (the process was killed mid-write) is ignored and cut off; every complete
line is kept. The file is compacted (rewritten with only what is pending, atomically) when
everything is acknowledged or acknowledged records pile up. Appends are batched: one write and
one fsync for every record queued meanwhile (group commit), in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("spendgate.sidecar.journal")

VERSION = 1
FILE_NAME = "journal.jsonl"
LOCK_NAME = "journal.lock"
KINDS = ("open", "charge", "done")
COMPACT_AFTER = 1000  # acknowledged records that trigger a compaction


class JournalError(Exception):
    """The journal cannot be used: not writable, locked by another process, unreadable."""


@dataclass
class Pending:
    """What the journal knows of one request not acknowledged yet."""

    customer: str
    request_id: str
    allowance: int = 0  # taken from the fail-open allowance (0: the request was reserved)
    charge: dict[str, Any] | None = None  # cost, key, usage, since; None: not ended yet
    since_ms: int = 0
    interrupted: bool = False  # admitted fail-open by an earlier process that never saw it end

    def records(self) -> list[dict[str, Any]]:
        """The records that recreate this state (for compaction)."""
        base = {"v": VERSION, "id": self.request_id, "customer": self.customer}
        out = []
        if self.allowance and self.charge is None:
            out.append({**base, "op": "open", "allowance": self.allowance, "ts": self.since_ms})
        if self.charge is not None:
            out.append({**base, "op": "charge", **self.charge})
        return out


def key_of(customer: str, request_id: str) -> str:
    return f"{customer}/{request_id}"


@dataclass
class Replay:
    pending: dict[str, Pending] = field(default_factory=dict)
    records: int = 0  # complete records read
    torn_bytes: int = 0  # a partial last line, cut off
    skipped: list[str] = field(default_factory=list)  # complete lines that made no sense


def apply(state: dict[str, Pending], record: dict[str, Any]) -> None:
    """One record's effect on the pending requests (replay and live appends alike)."""
    key = key_of(record["customer"], record["id"])
    kind = record["op"]
    if kind == "done":
        state.pop(key, None)
        return
    entry = state.setdefault(key, Pending(record["customer"], record["id"]))
    if kind == "open":
        entry.allowance = int(record["allowance"])
        entry.since_ms = int(record.get("ts", 0))
    else:
        entry.charge = {k: v for k, v in record.items() if k not in ("v", "op", "id", "customer")}
        entry.since_ms = entry.since_ms or int(record.get("ts", 0))
        if "allowance" in record:  # a fail-open request that ended: its cost replaces its bound
            entry.allowance = int(record["allowance"])


def parse(data: bytes) -> tuple[Replay, int]:
    """Records of a journal file; returns the replay and the length of its complete lines."""
    replay = Replay()
    complete = data.rfind(b"\n") + 1
    replay.torn_bytes = len(data) - complete
    for number, line in enumerate(data[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            if record.get("v") != VERSION:
                raise JournalError(
                    f"line {number}: journal record version {record.get('v')!r}; this sidecar"
                    f" reads version {VERSION} (a newer sidecar wrote it: run that version"
                    " until its charges are reconciled)"
                )
            if record.get("op") not in KINDS or not isinstance(record.get("id"), str):
                raise ValueError(f"unknown record kind {record.get('op')!r}")
            if not isinstance(record.get("customer"), str):
                raise ValueError("no customer")
            apply(replay.pending, record)
        except (ValueError, KeyError, TypeError) as error:
            replay.skipped.append(f"line {number}: {error}")
            continue
        replay.records += 1
    return replay, complete


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"


class Journal:
    """The journal in ``directory``; ``None``: in memory only (charges die with the process)."""

    def __init__(self, directory: str | None, *, compact_after: int = COMPACT_AFTER) -> None:
        self.directory = Path(directory) if directory else None
        self.compact_after = compact_after
        self.pending: dict[str, Pending] = {}
        self.allowance_used: dict[str, int] = {}  # customer -> fail-open allowance in use
        self.acknowledged = 0  # ``done`` records since the last compaction
        self.size = 0  # bytes in the file
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._io = asyncio.Lock()

    @property
    def durable(self) -> bool:
        return self.directory is not None

    @property
    def path(self) -> Path | None:
        return self.directory / FILE_NAME if self.directory else None

    # ------------------------------------------------------------------ start-up

    def open(self) -> Replay:
        """Lock the directory, replay the file, cut a torn tail; ``JournalError`` if unusable."""
        if self.directory is None:
            return Replay()
        where = str(self.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            problem = error.strerror or str(error)
            raise JournalError(f"journal directory {where} is not usable: {problem}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._close_lock()
            raise JournalError(
                f"journal directory {where} is in use by another sidecar process"
            ) from None
        try:
            self._fd = os.open(self.directory / FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            data = _read_all(self._fd)
            replay, complete = parse(data)
            if replay.torn_bytes:
                os.ftruncate(self._fd, complete)
                os.fsync(self._fd)
            os.lseek(self._fd, 0, os.SEEK_END)
            _fsync_dir(self.directory)
        except JournalError:
            self.close()
            raise
        except OSError as error:
            self.close()
            raise JournalError(f"journal {self.path} is not usable: {error.strerror}") from None
        self.size = complete
        self.pending = replay.pending
        for entry in self.pending.values():
            entry.interrupted = entry.charge is None
            self._count(entry.customer, entry.allowance)
        for problem in replay.skipped:
            log.error("journal line skipped", extra={"journal": str(self.path), "problem": problem})
        if replay.torn_bytes:
            log.warning(
                "journal: partial last record ignored (the process was killed while writing it)",
                extra={"journal": str(self.path), "bytes": replay.torn_bytes},
            )
        return replay

    # ------------------------------------------------------------------ appends

    def append(self, record: dict[str, Any]) -> asyncio.Future[None]:
        """Apply ``record`` now; the future is done once it is on disk (fsync'd)."""
        record = {"v": VERSION, **record}
        key = key_of(record["customer"], record["id"])
        before = self.pending[key].allowance if key in self.pending else 0
        apply(self.pending, record)
        after = self.pending[key].allowance if key in self.pending else 0
        self._count(record["customer"], after - before)
        if record["op"] == "done":
            self.acknowledged += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._fd is None:
            future.set_result(None)
            return future
        self._queue.append((_encode(record), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(), name="journal-writer")
        return future

    def _count(self, customer: str, delta: int) -> None:
        used = self.allowance_used.get(customer, 0) + delta
        if used:
            self.allowance_used[customer] = used
        else:
            self.allowance_used.pop(customer, None)

    def append_soon(self, record: dict[str, Any]) -> None:
        """Append without waiting for the disk (``done`` records: losing one is harmless)."""
        self.append(record).add_done_callback(_log_failure)

    async def _write_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            data = b"".join(line for line, _ in batch)
            try:
                async with self._io:
                    fd = self._fd
                    if fd is None:
                        raise OSError("journal closed")
                    await asyncio.to_thread(_write_durably, fd, data)
                    self.size += len(data)
            except OSError as error:
                failure = JournalError(f"journal {self.path}: write failed: {error}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
        await self.compact_if_due()

    # ------------------------------------------------------------------ compaction

    def compaction_due(self) -> bool:
        if self._fd is None or self.size == 0:
            return False
        return not self.pending or self.acknowledged >= self.compact_after

    async def compact_if_due(self) -> bool:
        if not self.compaction_due():
            return False
        await self.compact()
        return True

    async def compact(self) -> None:
        """Rewrite the file with only what is pending: a new file, fsync'd, renamed over."""
        if self._fd is None or self.directory is None:
            return
        async with self._io:
            records = [r for entry in self.pending.values() for r in entry.records()]
            data = b"".join(_encode({"v": VERSION, **r}) for r in records)
            try:
                fd = await asyncio.to_thread(_replace_file, self.directory, data)
            except OSError as error:
                log.error("journal compaction failed", extra={"error": repr(error)})
                return
            old, self._fd = self._fd, fd
            os.close(old)
            self.size, self.acknowledged = len(data), 0
        log.info("journal compacted", extra={"pending": len(self.pending), "bytes": self.size})

    # ------------------------------------------------------------------ shutdown

    async def flush(self) -> None:
        """Wait for every queued record to be written."""
        while self._writer is not None and not self._writer.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writer)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._close_lock()

    def _close_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("journal append failed", extra={"error": str(future.exception())})


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_durably(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _replace_file(directory: Path, data: bytes) -> int:
    temporary = directory / f"{FILE_NAME}.tmp"
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_durably(fd, data)
        os.replace(temporary, directory / FILE_NAME)
        _fsync_dir(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
