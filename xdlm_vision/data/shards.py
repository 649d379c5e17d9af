"""Token shards: WebDataset tar files of token grids and class labels, plus `meta.json` beside them.

Each sample has three members: the key, `<key>.tokens.npy` (the h x w grid in the smallest unsigned
dtype that can store every token id) and `<key>.cls` (the class index as ASCII text). Shards are named
`{split}-{index:06d}.tar`. The writer is deterministic (fixed member order, times and owners), so
encoding the same images twice gives byte-identical files, and it writes under a temporary name that
is renamed only once the shard is complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

META_FORMAT = "xdlm-token-shards"
META_VERSION = 1
META_FILE = "meta.json"


def shard_name(split: str, index: int) -> str:
    """Return the file name of shard `index` of a split, e.g. `train-000003.tar`."""
    return f"{split}-{index:06d}.tar"


def token_dtype(num_embeddings: int) -> np.dtype:
    """Return the smallest unsigned integer dtype that can store token ids 0 .. num_embeddings - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_embeddings - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"num_embeddings {num_embeddings} does not fit in uint32")


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def write_token_shard(path: str | os.PathLike, samples: Iterable[tuple[str, np.ndarray, int]]) -> int:
    """Write samples (key, tokens (h, w) unsigned array, class index) to a shard atomically; returns the count."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with open(temporary, "wb") as file:
            with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as archive:
                for key, tokens, label in samples:
                    if "." in key:
                        raise ValueError(f"sample key {key!r} contains a dot, which WebDataset reads as an extension")
                    buffer = io.BytesIO()
                    np.save(buffer, np.ascontiguousarray(tokens), allow_pickle=False)
                    _add_member(archive, f"{key}.tokens.npy", buffer.getvalue())
                    _add_member(archive, f"{key}.cls", str(int(label)).encode("ascii"))
                    count += 1
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        # A failed write (a full disk, say) must not leave a partial file that keeps the space.
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)
    return count


@dataclass
class ShardContents:
    """Contents of a verified shard: sample keys and class labels, in file order."""

    keys: list[str]
    labels: list[int]


def read_token_shard(
    path: str | os.PathLike, grid_size: int, num_embeddings: int, num_classes: int | None = None
) -> ShardContents:
    """Read and check a whole shard; raise ValueError naming the shard and the first problem found.

    Every sample must have exactly `tokens.npy` and `cls`, tokens of shape (grid_size, grid_size) in the
    expected dtype with values below `num_embeddings`, and a label below `num_classes` when given.
    """
    path = Path(path)
    expected_dtype = token_dtype(num_embeddings)
    members: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r") as archive:
            for info in archive:
                if not info.isfile():
                    continue
                key, dot, extension = info.name.partition(".")
                if not dot:
                    raise ValueError(f"member {info.name!r} has no extension")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][extension] = archive.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"token shard {path} is damaged: {error}") from error

    labels = []
    for key in order:
        fields = members[key]
        if set(fields) != {"tokens.npy", "cls"}:
            raise ValueError(f"token shard {path}: sample {key} has members {sorted(fields)}, expected cls and tokens.npy")
        try:
            tokens = np.load(io.BytesIO(fields["tokens.npy"]), allow_pickle=False)
            label = int(fields["cls"].decode("ascii"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"token shard {path}: sample {key} cannot be parsed: {error}") from error
        if tokens.shape != (grid_size, grid_size) or tokens.dtype != expected_dtype:
            raise ValueError(
                f"token shard {path}: sample {key} has tokens {tokens.shape} {tokens.dtype}, "
                f"expected ({grid_size}, {grid_size}) {expected_dtype}"
            )
        if tokens.size and int(tokens.max()) >= num_embeddings:
            raise ValueError(f"token shard {path}: sample {key} has token {int(tokens.max())} >= {num_embeddings}")
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise ValueError(f"token shard {path}: sample {key} has label {label} outside [0, {num_classes})")
        labels.append(label)
    return ShardContents(keys=order, labels=labels)


def write_meta(output_dir: str | os.PathLike, meta: dict) -> Path:
    """Write `meta.json` atomically and return its path."""
    path = Path(output_dir) / META_FILE
    temporary = path.with_name(f".{META_FILE}.tmp")
    temporary.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def read_meta(folder: str | os.PathLike) -> dict:
    """Read and check the `meta.json` of a token shard folder."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ValueError(f"{path} not found; is {folder} a folder written by `xdlm-vision encode`?") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise ValueError(
            f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"expected {META_FORMAT!r} version {META_VERSION}"
        )
    return meta
