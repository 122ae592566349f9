"""Turn what a user typed into input items: the one resolver.

A path, a folder (searched recursively for audio files), ``-`` for stdin, or an
http(s) URL. Resolving touches only the file system; reading the bytes happens
later (`load_bytes`), in the worker that captions the item, so a batch of
thousands of files does not hold them all in memory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import requests

from captioner.errors import InputError, UsageError

AUDIO_EXTENSIONS = frozenset(
    {
        ".wav", ".wave", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a",
        ".aac", ".mp4", ".webm", ".mka", ".wma", ".aif", ".aiff", ".amr",
    }
)  # fmt: skip

STDIN = "-"
DOWNLOAD_TIMEOUT = (10.0, 120.0)

InputKind = Literal["file", "url", "stdin"]


@dataclass(frozen=True)
class InputItem:
    """One thing to caption.

    `source` is its identity in results and the key that resume matches on: the
    real path for files (absolute, symlinks resolved, ``..`` normalised: so
    ``./a.wav``, ``x/../a.wav`` and a link to it are the same input), the URL as
    given, or ``-``.
    """

    source: str
    kind: InputKind

    @property
    def name(self) -> str:
        """A short name for messages and MIME guessing."""
        if self.kind == "stdin":
            return "stdin"
        return self.source


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def resolve_inputs(args: Iterable[str]) -> list[InputItem]:
    """Resolve command-line inputs, in order, without duplicates.

    Raises `InputError` for a path that does not exist or a folder without audio,
    and `UsageError` for ``-`` given twice. Failing here, before any request, keeps
    a typo from costing a half-finished batch.
    """
    items: list[InputItem] = []
    seen: set[str] = set()

    def add(item: InputItem) -> None:
        if item.source not in seen:
            seen.add(item.source)
            items.append(item)

    for arg in args:
        if arg == STDIN:
            if STDIN in seen:
                raise UsageError("'-' (stdin) can be given only once")
            add(InputItem(STDIN, "stdin"))
        elif is_url(arg):
            add(InputItem(arg, "url"))
        else:
            path = Path(arg).expanduser()
            if path.is_dir():
                found = find_audio_files(path)
                if not found:
                    raise InputError(
                        f"{arg}: no audio files in this folder "
                        f"(looked for {', '.join(sorted(AUDIO_EXTENSIONS))})"
                    )
                for file in found:
                    add(InputItem(str(file), "file"))
            elif path.exists():
                # Named explicitly: take it whatever its extension; decoding decides.
                add(InputItem(os.path.realpath(path), "file"))
            else:
                raise InputError(f"{arg}: no such file or folder")
    return items


def find_audio_files(folder: Path) -> list[Path]:
    """Audio files under `folder`, recursively, sorted, hidden entries skipped.

    Each file appears once, by its real path, however many links lead to it; linked
    folders are followed, but a folder already visited (a symlink loop, or two links to
    one folder) is not walked again.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for file in _walk_audio(folder):
        real = os.path.realpath(file)
        if real not in seen and os.path.isfile(real):
            seen.add(real)
            found.append(Path(real))
    return found


def _walk_audio(folder: Path) -> Iterator[str]:
    visited: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder.absolute(), followlinks=True):
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


def load_bytes(
    item: InputItem,
    stdin: BinaryIO | None = None,
    session: requests.Session | None = None,
) -> bytes:
    """Read an item's bytes (files, stdin, or a download); `InputError` on failure.

    URLs are fetched with their own plain session so the caption service's API key
    is never sent to a third-party host.
    """
    if item.kind == "file":
        try:
            data = Path(item.source).read_bytes()
        except OSError as exc:
            raise InputError(f"{item.source}: {exc.strerror or exc}") from exc
    elif item.kind == "stdin":
        data = (stdin or sys.stdin.buffer).read()
    else:
        data = download(item.source, session or requests.Session())
    if not data:
        raise InputError(f"{item.name}: empty input (0 bytes)")
    return data


def download(url: str, session: requests.Session) -> bytes:
    try:
        response = session.get(url, timeout=DOWNLOAD_TIMEOUT)
    except requests.RequestException as exc:
        raise InputError(f"{url}: download failed: {type(exc).__name__}") from exc
    if response.status_code >= 400:
        raise InputError(f"{url}: download failed: HTTP {response.status_code} {response.reason}")
    return response.content
