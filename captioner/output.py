"""Where records go: checked before the first request, locked, kept as they finish.

`--output FILE` is checked (its folder exists and is writable, no other run holds it)
before anything is sent, and locked (`flock`) for the whole run, so two runs on the
same file cannot both write it. Every record is appended to a JSONL *state file* as
soon as its input finishes, one write then fsync: the output file itself for
`--format jsonl`, else a side file `FILE.partial.jsonl` that the final text, json,
srt or vtt file is rendered from at the end, after which it is removed. An interrupt
or a fatal error therefore keeps every finished record, and the same command resumes
from the state file. At the end the JSONL output is rewritten in input order.

Records reach stdout in input order too: one that finishes early waits for those
before it (jsonl and text stream; json, srt and vtt are rendered at the end).

A `.jsonl` output is a collection: records of inputs this run does not name stay in it, so
several runs (two clips piped in one after the other) gather in one file. The other formats are
one run's document: FILE is rewritten, at the end, with the records of this run's inputs.

An `--output` that is a symlink is resolved once: its target is checked, locked and written
(atomically, by a rename next to the target), and the link stays a link.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from captioner.errors import UsageError
from captioner.files import atomic_write
from captioner.formats import SUBTITLE_FORMATS, render, render_text
from captioner.records import Record, Segment, input_key

RECORD_PREFIX = b'{"source":'  # every line this client writes starts so
STATE_SUFFIX = ".partial.jsonl"


def check_output_path(path: Path, shown: Path | None = None) -> None:
    """`UsageError` unless `path` can be written: a file name in an existing, writable folder.

    Called before the first request, so a typo costs nothing. The folder must be
    writable even when the file exists: files are replaced atomically (a temporary
    file next to them, then a rename). `shown` is the name the user gave (a link to `path`).
    """
    shown = shown or path
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"--output {shown}: is a folder; give a file name")
    if not folder.is_dir():
        raise UsageError(f"--output {shown}: the folder {folder} does not exist (create it first)")
    try:  # a real try rather than os.access: root, read-only mounts, ACLs
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--output {shown}: cannot write in the folder {folder}: {exc.strerror}") from exc
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--output {shown}: cannot write the file (permission denied)")


def check_not_an_input(target: Path, keys: Sequence[str], shown: Path) -> None:
    """`UsageError` when the file `--output` writes is one of the inputs (its real path, or a hard
    link to it): writing it would destroy the audio being captioned."""
    try:
        written = os.stat(target)
    except OSError:
        return  # not there yet: no input can be it
    for key in keys:
        if not key.startswith("/"):
            continue  # stdin's hash, a URL
        try:
            info = os.stat(key)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (written.st_dev, written.st_ino):
            raise UsageError(f"--output {shown}: is one of the inputs; give another file name")


def output_target(path: Path) -> Path:
    """The file `--output PATH` writes: PATH with symlinks resolved (a dangling link: the file it
    names), so the link is kept and the lock is on the file written."""
    return Path(os.path.realpath(path))


def state_path(path: Path, fmt: str) -> Path:
    """The JSONL file that holds finished records during a run writing `path` as `fmt`."""
    return path if fmt == "jsonl" else path.with_name(path.name + STATE_SUFFIX)


def _open_locked(path: Path, shown: Path) -> int:
    """`path` opened for appending and locked (flock, exclusive); `UsageError` if another
    run holds it. Checks that the locked file is still the one at `path`: a run that
    repaired the file replaced it, and a lock on the old inode would guard nothing."""
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise UsageError(f"--output {shown}: cannot write: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"--output {shown}: another run is writing this file; wait for it to finish "
                "or pick another --output"
            ) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)
    raise UsageError(f"--output {shown}: the file keeps being replaced by another run")


@dataclass
class ResumeInfo:
    done: set[str] = field(default_factory=set)  # the keys of inputs done (records.input_key)
    records: list[Record] = field(default_factory=list)  # the kept ones, in file order
    dropped_partial: bool = False  # a torn last line (a crash mid-write) was removed
    dropped_failed: int = 0  # failed records removed so they are retried
    dropped_duplicates: int = 0

    @property
    def rewritten(self) -> bool:
        return self.dropped_partial or bool(self.dropped_failed or self.dropped_duplicates)


def scan_records(raw: bytes, shown: Path) -> tuple[ResumeInfo, list[bytes]]:
    """Which inputs an earlier run finished (by key), and the lines to keep.

    Keeps the first successful record per input, drops failed ones (they will be
    retried) and a torn line. Refuses (`UsageError`) lines this client did not write,
    rather than rewrite somebody's other file.
    """
    info = ResumeInfo()
    keep: list[bytes] = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        if not line.startswith(RECORD_PREFIX):
            raise UsageError(
                f"{shown}: line {number} is not a caption record; this does not look like "
                "a --format jsonl output file (pick another --output, or delete it)"
            )
        try:
            data = json.loads(line)
            key = input_key(str(data["source"]), data.get("path"), data.get("sha256"))
        except (ValueError, KeyError, TypeError, AttributeError):
            info.dropped_partial = True  # torn by a crash mid-write
            continue
        if data.get("error"):
            info.dropped_failed += 1
        elif key in info.done:
            info.dropped_duplicates += 1
        else:
            info.done.add(key)
            info.records.append(record_from_json(data))
            keep.append(line)
    return info, keep


def record_from_json(data: dict[str, object]) -> Record:
    segments = data.get("segments") or []
    assert isinstance(segments, list)
    usage = data.get("usage")
    duration = data.get("duration")
    latency = data.get("latency")
    path, sha256 = data.get("path"), data.get("sha256")
    return Record(
        source=str(data["source"]),
        path=path if isinstance(path, str) else None,
        sha256=sha256 if isinstance(sha256, str) else None,
        duration=float(duration) if isinstance(duration, (int, float)) else None,
        segments=[Segment(float(s["start"]), float(s["end"]), str(s["caption"])) for s in segments],
        caption=str(data.get("caption") or ""),
        model=str(data["model"]) if data.get("model") is not None else None,
        usage=usage if isinstance(usage, dict) else None,
        latency=float(latency) if isinstance(latency, (int, float)) else 0.0,
        error=str(data["error"]) if data.get("error") else None,
    )


class StateFile:
    """A locked JSONL file of finished records; each appended whole, then fsynced."""

    def __init__(self, path: Path, shown: Path | None = None) -> None:
        self.path = path
        self.shown = shown or path
        self._fd = _open_locked(path, self.shown)

    def load(self) -> ResumeInfo:
        """What an earlier run left (see `scan_records`); repairs the file if needed."""
        raw = b""
        while chunk := os.pread(self._fd, 1 << 20, len(raw)):
            raw += chunk
        info, keep = scan_records(raw, self.shown)
        if info.rewritten or (raw and not raw.endswith(b"\n")):
            self.replace(b"".join(line + b"\n" for line in keep))
        return info

    def write(self, record: Record) -> None:
        view = memoryview(record.to_line().encode("utf-8"))
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def replace(self, data: bytes) -> None:
        """Swap the file's content for `data` atomically, keeping the lock."""
        atomic_write(self.path, data)
        old = self._fd
        self._fd = _open_locked(self.path, self.shown)
        os.close(old)

    def empty(self) -> bool:
        return os.fstat(self._fd).st_size == 0

    def close(self, remove: bool = False) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)


class Output:
    """The records of one run, to stdout or `--output`, in input order.

    `order` is every input's key (records.input_key), in input order. Open it (checks and locks
    the output) before the first request; `resume()` says what is already done. `path` is the
    output as the user named it, for messages; `target` the file written (links resolved).
    """

    def __init__(self, fmt: str, path: Path | None, order: Sequence[str], stdout: TextIO) -> None:
        self.fmt, self.path, self.stdout = fmt, path, stdout
        self.target = None if path is None else output_target(path)
        self.many = len(order) > 1
        self.order = list(dict.fromkeys(order))
        self.position = {key: i for i, key in enumerate(self.order)}
        self.records: dict[str, Record] = {}  # this run's and resumed ones, by key
        self._next = 0  # stdout: position of the next record to print
        self._printed = 0
        self.state: StateFile | None = None
        self._created = False
        if path is not None and self.target is not None:
            check_output_path(self.target, shown=path)
            check_not_an_input(self.target, self.order, shown=path)
            state = state_path(self.target, fmt)
            self._created = not state.exists()
            self.state = StateFile(state, shown=path)
        self.resumed = ResumeInfo()
        self.resumable = path is not None  # the same command picks up where this run stops

    def resume(self) -> ResumeInfo:
        if self.state is not None:
            self.resumed = self.state.load()
            for record in self.resumed.records:
                self.records[record.key] = record
        return self.resumed

    def add(self, record: Record) -> None:
        self.records[record.key] = record
        if self.state is not None:
            self.state.write(record)
        elif self.fmt in ("jsonl", "text"):
            self._print_ready()

    def _print_ready(self) -> None:
        while self._next < len(self.order) and self.order[self._next] in self.records:
            self._print(self.records[self.order[self._next]])
            self._next += 1

    def _print(self, record: Record) -> None:
        if self.fmt == "jsonl":
            text = record.to_line()
        else:
            text = render_text([record], self.many)
            if text and self._printed:
                text = "\n" + text
        if text:
            self._printed += 1
            self.stdout.write(text)
            self.stdout.flush()

    def ordered(self) -> list[Record]:
        """The records in the file's order, new ones after, with this run's inputs sorted into
        input order in the places they hold: a .jsonl gathering runs keeps its order, and a run
        resumed after an interrupt ends in input order, whatever order its inputs finished in."""
        records = list(self.records.values())
        mine = iter(sorted((r for r in records if r.key in self.position),
                           key=lambda r: self.position[r.key]))  # fmt: skip
        return [next(mine) if r.key in self.position else r for r in records]

    def finish(self) -> None:
        """Everything ran: the final output, in input order; the state file goes.

        jsonl keeps the records of inputs this run did not name (see `ordered`); the other
        formats hold this run's inputs alone."""
        records = self.ordered()
        if self.state is None:
            if self.fmt not in ("jsonl", "text"):
                self._render_to(None, records)
            return
        assert self.target is not None
        if self.fmt == "jsonl":
            data = "".join(r.to_line() for r in records).encode("utf-8")
            self.state.replace(data)
            self.state.close()
        else:
            self._render_to(self.target, [r for r in records if r.key in self.position])
            self.state.close(remove=True)
        self.state = None

    def abandon(self) -> None:
        """The run stopped early: keep the state file (resume), unless it is empty and new."""
        if self.state is not None:
            self.state.close(remove=self._created and self.state.empty())
            self.state = None

    def _render_to(self, path: Path | None, records: list[Record]) -> None:
        if self.fmt in SUBTITLE_FORMATS and not any(r.ok for r in records):
            return  # the failure is reported; an empty subtitle file helps nobody
        text = render(records, self.fmt, self.many)
        if path is None:
            self.stdout.write(text)
            self.stdout.flush()
            return
        try:
            atomic_write(path, text.encode("utf-8"))
        except OSError as exc:
            raise UsageError(f"--output {self.path}: cannot write: {exc.strerror}") from exc
