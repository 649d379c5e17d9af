"""Reading token shards for training: an endless, shuffled, resumable stream of micro-batches.

A token-shard folder contains WebDataset tar files (one sample per image: `tokens.npy` with the h x w
grid and `cls` with the class index as text) and a `meta.json` that lists the shards and their sizes.

Every reader (one per DataLoader worker of every process) produces a deterministic stream, so a run
can resume exactly from a count of consumed batches:

- with several readers and at least as many shards, reader `g` owns shards `g, g + R, ...` and
  reads them in a new order each epoch (split by node and worker);
- otherwise every reader reads all shards in the same order and keeps every R-th batch of this
  common stream, so small data sets still feed many processes, and R processes together see the
  same batches as one process does.

Within an epoch the samples pass through a shuffle buffer seeded by (seed, epoch, reader), and
batches run across epoch boundaries without a gap.
"""

from __future__ import annotations

import io
import json
import logging
import random
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

META_FORMAT = "xdlm-token-shards"
META_VERSION = 1
_REQUIRED_META_KEYS = ("grid_size", "num_embeddings", "num_classes", "shards")


def read_meta(folder: str | Path) -> dict[str, Any]:
    """Read and check `meta.json` of a token-shard folder; every listed shard must exist."""
    folder = Path(folder)
    path = folder / "meta.json"
    if not path.is_file():
        raise ValueError(
            f"{str(path)!r} not found; data.shards must be a folder written by `xdlm-vision encode` (tar shards + meta.json)"
        )
    with open(path, encoding="utf-8") as file:
        try:
            meta = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None

    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {META_FORMAT!r}")
    if meta.get("version") != META_VERSION:
        raise ValueError(f"{path} has version {meta.get('version')!r}; this reader supports version {META_VERSION}")
    missing = [key for key in _REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}")
    if not meta["shards"]:
        raise ValueError(f"{path} lists no shards")

    for shard in meta["shards"]:
        shard_path = folder / shard["name"]
        if not shard_path.is_file():
            raise ValueError(f"shard {str(shard_path)!r} listed in {path} not found")
        if int(shard["num_samples"]) < 1:
            raise ValueError(f"shard {shard['name']!r} in {path} has {shard['num_samples']} samples; remove empty shards")
    return meta


def verify_shards(folder: str | Path, meta: dict[str, Any], strict: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Read every listed shard once and drop the damaged ones; return the checked meta and the damaged names.

    A shard is damaged when its tar file cannot be read (truncated, empty, garbled), a sample cannot be
    decoded or is out of range, or its sample count differs from meta.json. Each one is logged with its
    name and reason. With `strict=True` the first damaged shard raises a ValueError instead. Skipping
    the same shards on every run keeps the data order, and so the exact resume, intact.
    """
    # NOTE: this decodes every sample once at start-up; on ImageNet-sized shard sets it takes minutes.
    folder = Path(folder)
    grid_size, num_embeddings, num_classes = int(meta["grid_size"]), int(meta["num_embeddings"]), int(meta["num_classes"])
    good, damaged = [], []
    for shard in tqdm(meta["shards"], desc="verify token shards", unit="shard", leave=False):
        path = folder / shard["name"]
        try:
            count = 0
            for sample in wds.tarfile_to_samples(handler=_raise_damaged_shard)(iter([{"url": str(path)}])):
                _decode_sample(sample, grid_size, num_embeddings, num_classes)
                count += 1
            if count != int(shard["num_samples"]):
                raise ValueError(f"token shard {path} contains {count} samples but meta.json lists {shard['num_samples']}")
        except ValueError as error:
            if strict:
                raise
            logger.warning("skipping damaged token shard %s: %s", shard["name"], error)
            damaged.append(shard["name"])
            continue
        good.append(shard)

    if not good:
        raise ValueError(f"every token shard in {folder} is damaged ({', '.join(damaged)}); run `xdlm-vision encode` again")
    checked = dict(meta, shards=good, num_samples=sum(int(shard["num_samples"]) for shard in good))
    return checked, damaged


def check_meta_matches_model(
    meta: dict[str, Any],
    *,
    num_embeddings: int,
    grid_size: int,
    num_classes: int,
    source: str = "model config",
) -> None:
    """Raise ValueError when the token shards' grid, codebook or class count differ from the model's."""
    pairs = (
        ("grid_size", grid_size, meta["grid_size"]),
        ("num_embeddings", num_embeddings, meta["num_embeddings"]),
        ("num_classes", num_classes, meta["num_classes"]),
    )
    for name, model_value, data_value in pairs:
        if int(model_value) != int(data_value):
            raise ValueError(
                f"{name} of the {source} is {model_value} but the token shards' meta.json has {data_value}; "
                f"set model.{name}={data_value} or point data.shards at shards encoded for this model"
            )


def _decode_sample(sample: dict[str, Any], grid_size: int, num_embeddings: int, num_classes: int):
    """Return (tokens [L] long, class index, key) of one raw WebDataset sample."""
    key = sample.get("__key__", "?")
    if "tokens.npy" not in sample or "cls" not in sample:
        raise ValueError(
            f"sample {key!r} in {sample.get('__url__', '?')} lacks tokens.npy or cls; re-encode the shard"
        )

    try:
        grid = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        label = int(sample["cls"].decode("ascii").strip())
    except (ValueError, EOFError, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"sample {key!r} in {sample.get('__url__', '?')} cannot be parsed ({error}); re-encode the "
                         "shard") from error
    if grid.shape != (grid_size, grid_size) or grid.dtype.kind != "u":
        raise ValueError(
            f"sample {key!r} has tokens of shape {grid.shape} and dtype {grid.dtype}; "
            f"meta.json promises an unsigned {grid_size}x{grid_size} grid"
        )
    if grid.size and int(grid.max()) >= num_embeddings:
        raise ValueError(f"sample {key!r} has token {int(grid.max())}, outside the codebook of {num_embeddings}")

    if not 0 <= label < num_classes:
        raise ValueError(f"sample {key!r} has class {label}, outside [0, {num_classes})")
    return torch.from_numpy(grid.astype(np.int64).reshape(-1)), label, key


class TokenShardDataset(IterableDataset):
    """Endless stream of micro-batches `{"tokens" [B, L] long, "class_labels" [B] long, "keys" [B] str}`.

    Args:
        folder: token-shard folder (tar shards + meta.json).
        batch_size: samples per micro-batch.
        rank, world_size: this process and the number of processes (one stream per DataLoader worker of each).
        seed: seed of the shard order and the shuffle buffer; equal on all processes.
        shuffle_buffer: samples in the shuffle buffer of each reader.
        start_batch: micro-batches this process has already consumed, to resume where a run stopped.
        meta: `read_meta(folder)`, when already read.
    """

    def __init__(
        self,
        folder: str | Path,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        start_batch: int = 0,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.folder = Path(folder)
        self.meta = read_meta(self.folder) if meta is None else meta
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch

    def _reader_plan(self, worker_id: int, num_workers: int) -> dict[str, Any]:
        """Shards, rng key and batch stride of one reader (one DataLoader worker of one process)."""
        shards = [(str(self.folder / shard["name"]), int(shard["num_samples"])) for shard in self.meta["shards"]]
        num_readers = self.world_size * num_workers
        reader = self.rank * num_workers + worker_id
        if num_readers > 1 and len(shards) >= num_readers:
            return {"shards": shards[reader::num_readers], "rng_key": reader, "stride": 1, "offset": 0}
        # One reader, or too few shards to split: every reader reads the common stream of all shards and
        # they take turns batch by batch. One process then receives the batches that R processes share.
        return {"shards": shards, "rng_key": "common", "stride": num_readers, "offset": reader}

    def _epochs(self, shards: list[tuple[str, int]], rng_key, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        """Yield raw samples of endless epochs, starting at `epoch` after its first `skip` samples."""
        samples_per_epoch = sum(count for _, count in shards)
        while True:
            # String seeds are hashed with SHA-512 by `random.Random`, so the order is the same in every process.
            rng = random.Random(f"{self.seed}/{epoch}/{rng_key}")
            order = list(shards)
            rng.shuffle(order)

            raw = wds.tarfile_to_samples(handler=_raise_damaged_shard)(iter([{"url": url} for url, _ in order]))
            shuffled = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
            count = 0
            for sample in shuffled:
                count += 1
                if count > skip:
                    yield sample
            if count != samples_per_epoch:
                names = [Path(url).name for url, _ in order]
                raise ValueError(
                    f"shards {names} hold {count} samples but meta.json lists {samples_per_epoch}; re-encode the data"
                )
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)

        # The DataLoader takes batches from its workers in turn, starting with worker 0. Reader w
        # therefore delivered batches w, w + num_workers, ... of the ones this process consumed, and a
        # resumed loader must start with the reader whose batch comes next: worker 0 plays that reader.
        reader_id = (worker_id + self.start_batch) % num_workers
        delivered = max(0, (self.start_batch - reader_id + num_workers - 1) // num_workers)
        plan = self._reader_plan(reader_id, num_workers)
        stride, offset = plan["stride"], plan["offset"]
        stream_batch = delivered * stride + offset
        samples_per_epoch = sum(count for _, count in plan["shards"])
        epoch, skip = divmod(stream_batch * self.batch_size, samples_per_epoch)
        if skip or epoch:
            logger.debug("reader %d/%d resumes at epoch %d after %d samples", self.rank, reader_id, epoch, skip)

        grid_size = int(self.meta["grid_size"])
        num_embeddings = int(self.meta["num_embeddings"])
        num_classes = int(self.meta["num_classes"])
        batch: list[dict[str, Any]] = []
        for sample in self._epochs(plan["shards"], plan["rng_key"], epoch, skip):
            batch.append(sample)
            if len(batch) < self.batch_size:
                continue
            if (stream_batch - offset) % stride == 0:
                # Only the batches this reader keeps are decoded.
                decoded = [_decode_sample(item, grid_size, num_embeddings, num_classes) for item in batch]
                yield {
                    "tokens": torch.stack([tokens for tokens, _, _ in decoded]),  # (B, L)
                    "class_labels": torch.tensor([label for _, label, _ in decoded], dtype=torch.long),  # (B,)
                    "keys": [key for _, _, key in decoded],
                }
            stream_batch += 1
            batch = []


def _raise_damaged_shard(error: Exception) -> bool:
    """Turn a tar read error (truncated, empty or garbled shard) into a ValueError that names the shard.

    A damaged shard stops training rather than being skipped: skipping would change the data order
    and the sample count of an epoch, and with them the exact resume.
    """
    source = next((arg for arg in reversed(error.args) if isinstance(arg, str) and arg.endswith(".tar")), None)
    reason = error.args[0] if error.args else type(error).__name__
    raise ValueError(
        f"token shard {source or '?'} is damaged ({reason}); run `xdlm-vision encode` again with the same "
        "--output-dir to re-encode damaged shards"
    ) from error


def _ignore_interrupts(worker_id: int) -> None:
    # The training process turns SIGINT/SIGTERM into a checkpoint; workers must outlive that save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: TokenShardDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Wrap the stream in a DataLoader whose workers ignore SIGINT and SIGTERM (the main process handles them)."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_interrupts if num_workers > 0 else None,
        persistent_workers=False,
    )
