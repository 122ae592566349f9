"""Turn what a user typed into input items: the one resolver.

A path, a folder (searched recursively for audio files), ``-`` for stdin, an http(s) URL, or a
``file://`` URL (the local file it names). Resolving touches only the file system, and reads
stdin (once: it cannot be read again) into an unnamed temporary file while hashing it; the bytes
of files and URLs are read later (`open_media`), in the worker that captions the item, so a batch
of thousands of files does not hold them all in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import unquote, urlsplit

import requests

from captioner.api import describe_failure
from captioner.errors import InputError, UsageError
from captioner.records import input_key

AUDIO_EXTENSIONS = frozenset(
    {
        ".wav", ".wave", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a",
        ".aac", ".mp4", ".webm", ".mka", ".wma", ".aif", ".aiff", ".amr",
    }
)  # fmt: skip

STDIN = "-"
DOWNLOAD_TIMEOUT = (10.0, 120.0)
CHUNK = 1 << 20

InputKind = Literal["file", "url", "stdin"]
Media = str | BinaryIO  # what the decoder reads: a path, or a seekable binary file


@dataclass(frozen=True)
class InputItem:
    """One thing to caption.

    `source` is how it is shown (records, output, messages): the path as the user gave it (a
    folder's files as the folder was named, joined with their names below it), the URL as given,
    or ``-``. `key` is its identity, what resume and deduplication match on: the real path of a
    file (absolute, symlinks resolved, ``..`` normalised: ``./a.wav``, ``x/../a.wav`` and a link
    to it are one input, shown by the first name given), the content hash of stdin, the URL.
    """

    source: str
    kind: InputKind
    path: str | None = None  # a file's real path
    sha256: str | None = None  # stdin's content hash
    spool: BinaryIO | None = field(default=None, repr=False, compare=False)  # stdin's bytes

    @property
    def key(self) -> str:
        return input_key(self.source, self.path, self.sha256)

    @property
    def name(self) -> str:
        """A short name for messages and MIME guessing."""
        if self.kind == "stdin":
            return "stdin"
        return self.source


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def file_url_path(text: str) -> str | None:
    """The local path a ``file://`` URL names, or None for anything else; `InputError` for a
    ``file://`` URL on another host."""
    if not text.lower().startswith("file://"):
        return None
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise InputError(f"{text}: a file:// URL names a file on this machine (file:///path)")
    return unquote(parts.path)


def resolve_inputs(args: Iterable[str], stdin: BinaryIO | None = None) -> list[InputItem]:
    """Resolve command-line inputs, in order, without duplicates (by key, and a file's hard
    links by inode: the first name given stands).

    Raises `InputError` for a path that does not exist, one that is not a regular file (a pipe:
    stdin is the way in for those), a folder without audio or with a subfolder it cannot read,
    and `UsageError` for ``-`` given twice. Failing here, before any request, keeps
    a typo from costing a half-finished batch. ``-`` reads `stdin` (default: the
    process's) to its end.
    """
    items: list[InputItem] = []
    seen: set[str] = set()
    seen_files: set[tuple[int, int]] = set()  # (device, inode): hard links are one file too

    def add(item: InputItem) -> None:
        if item.key in seen:
            return
        if item.path is not None:
            try:
                info = os.stat(item.path)
            except OSError:
                pass  # gone since it was listed: its worker says so
            else:
                if (info.st_dev, info.st_ino) in seen_files:
                    return
                seen_files.add((info.st_dev, info.st_ino))
        seen.add(item.key)
        items.append(item)

    stdin_given = False
    for arg in args:
        if arg == STDIN:
            if stdin_given:
                raise UsageError("'-' (stdin) can be given only once")
            stdin_given = True
            add(read_stdin(stdin or sys.stdin.buffer))
        elif is_url(arg):
            add(InputItem(arg, "url"))
        else:
            local = file_url_path(arg)
            path = Path(arg if local is None else local).expanduser()
            if path.is_dir():
                found = find_audio_files(path)
                if not found:
                    raise InputError(
                        f"{arg}: no audio files in this folder "
                        f"(looked for {', '.join(sorted(AUDIO_EXTENSIONS))})"
                    )
                for shown, real in found:
                    add(InputItem(shown, "file", path=real))
            elif path.is_file():
                # Named explicitly: take it whatever its extension; decoding decides.
                add(InputItem(arg, "file", path=os.path.realpath(path)))
            elif path.exists():  # a pipe (`<(cmd)`), a FIFO, a device: read once, like stdin
                raise InputError(f"{arg}: not a regular file; pipe it in instead: ... | test_client.py -")
            else:
                raise InputError(f"{arg}: no such file or folder")
    return items


def read_stdin(stream: BinaryIO) -> InputItem:
    """Stdin as an input: copied to an unnamed temporary file (memory stays small whatever its
    size) and hashed on the way, the hash its identity."""
    spool = tempfile.TemporaryFile(prefix="captioner-stdin-")
    digest = hashlib.sha256()
    try:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            spool.write(chunk)
        spool.flush()
    except OSError as exc:
        spool.close()
        raise InputError(f"stdin: cannot read: {exc.strerror or exc}") from exc
    return InputItem(STDIN, "stdin", sha256=digest.hexdigest(), spool=spool)


def find_audio_files(folder: Path) -> list[tuple[str, str]]:
    """(shown, real path) of the audio files under `folder`, recursively, sorted, hidden entries
    skipped. Shown is the path below `folder` as named; real has symlinks resolved.

    Each file appears once, by its real path, however many links lead to it; linked
    folders are followed, but a folder already visited (a symlink loop, or two links to
    one folder) is not walked again.
    """
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for file in _walk_audio(folder):
        real = os.path.realpath(file)
        if real not in seen and os.path.isfile(real):
            seen.add(real)
            found.append((file, real))
    return found


def _walk_audio(folder: Path) -> Iterator[str]:
    visited: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:  # a folder the walk cannot list: say so, skip nothing silently
        raise InputError(f"{exc.filename}: cannot read this folder: {exc.strerror or exc}")

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        try:
            info = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in visited:
            dirs[:] = []  # been here: a loop, or another link to the same folder
            continue
        visited.add((info.st_dev, info.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                yield os.path.join(root, name)


@contextlib.contextmanager
def open_media(item: InputItem, session: requests.Session | None = None) -> Iterator[Media]:
    """What the decoder reads for `item`: a file's real path, stdin's spool, or a URL downloaded
    into an unnamed temporary file (removed when the block ends); `InputError` on failure.

    URLs are fetched with their own plain session so the caption service's API key
    is never sent to a third-party host.
    """
    if item.kind == "file":
        assert item.path is not None
        yield item.path
    elif item.kind == "stdin":
        assert item.spool is not None
        yield item.spool
    else:
        with tempfile.TemporaryFile(prefix="captioner-download-") as spool:
            download(item.source, session or requests.Session(), spool)
            yield spool


def read_media(media: Media, name: str) -> bytes:
    """All of `media`'s bytes; `InputError` when it cannot be read."""
    try:
        if isinstance(media, str):
            return Path(media).read_bytes()
        media.seek(0)
        return media.read()
    except OSError as exc:
        raise InputError(f"{name}: {exc.strerror or exc}") from exc


def load_bytes(item: InputItem, session: requests.Session | None = None) -> bytes:
    """An item's bytes (files, stdin, or a download); `InputError` on failure or when empty."""
    with open_media(item, session) as media:
        data = read_media(media, item.name)
    if not data:
        raise InputError(f"{item.name}: empty input (0 bytes)")
    return data


def download(url: str, session: requests.Session, into: BinaryIO) -> None:
    """`url`'s body written to `into`; `InputError` saying in words what failed."""
    try:
        with session.get(url, timeout=DOWNLOAD_TIMEOUT, stream=True) as response:
            if response.status_code >= 400:
                raise InputError(f"{url}: download failed: HTTP {response.status_code} {response.reason}")
            for chunk in response.iter_content(CHUNK):
                into.write(chunk)
    except requests.RequestException as exc:
        raise InputError(f"{url}: download failed: {describe_failure(exc, DOWNLOAD_TIMEOUT)}") from exc
    except OSError as exc:  # the temporary file: a full disk
        raise InputError(f"{url}: download failed: cannot store it: {exc.strerror or exc}") from exc
    into.flush()
