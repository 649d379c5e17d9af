"""Atomic file writes: a temporary file in the target folder, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def default_file_mode() -> int:
    """Mode that `open()` would give a new file under the current umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing and rename it to `path` when the block succeeds.

    A failure inside the block (or a full disk) deletes the temporary file and leaves any earlier
    `path` untouched. The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, default_file_mode())  # mkstemp creates 0600
        with os.fdopen(handle, mode, encoding=encoding) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=2)
        file.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as file:
        file.write(text)
