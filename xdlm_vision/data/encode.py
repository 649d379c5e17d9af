"""`xdlm-vision encode`: tokenize an image source once into WebDataset token shards.

The images of a source are cut, in the source's fixed order, into shards of `--shard-size` images.
Shard `i` always contains images `i * shard_size ...`, so its name is deterministic. A shard is written under a
temporary name and renamed when complete, so after an interruption the next run verifies the
finished shards, skips them and encodes only the rest. Sample keys are the image's position in the
source (`00000042`), and `00000042_flip` for its horizontally flipped copy.

A corrupt image is logged, counted and left out of its shard, unless `--strict` makes it fatal.
`meta.json` is written last, from the samples of each shard as written or as verified on disk.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xdlm_vision.data.images import FASHION_MNIST_DIR, SOURCE_KINDS, CorruptImageError, open_image_source
from xdlm_vision.data.shards import (
    META_FORMAT,
    META_VERSION,
    read_token_shard,
    shard_name,
    token_dtype,
    write_meta,
    write_token_shard,
)

logger = logging.getLogger(__name__)

SETTINGS_FILE = ".encode-settings.json"
# The tokenizer trained on Fashion-MNIST that ships in the repository (a source checkout, not a wheel).
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "tokenizers" / "fashion-mnist-vq512"


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that fixes the content of the shards; a resumed run must use the same values."""

    tokenizer: str
    source: str
    data_dir: str | None
    split: str
    image_size: int
    num_images: int
    shard_size: int
    horizontal_flip: bool
    grid_size: int
    num_embeddings: int


@dataclass
class ShardResult:
    """Outcome of encoding (or verifying) one shard."""

    name: str
    num_samples: int
    num_corrupt: int
    skipped: bool
    class_counts: list[int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `encode`."""
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                        help="VQTokenizer folder, diffusers VQModel folder or LlamaGen .pt file "
                        "(default: the shipped Fashion-MNIST tokenizer)")
    parser.add_argument("--source", choices=SOURCE_KINDS, default="fashion-mnist", help="image source")
    parser.add_argument("--data-dir", help=f"source folder (Fashion-MNIST default: {FASHION_MNIST_DIR}); for "
                        "imagefolder the root holding SPLIT/<class>/, for webdataset the folder of .tar shards")
    parser.add_argument("--split", default="train", help="split to encode; also the shard name prefix")
    parser.add_argument("--output-dir", required=True, help="folder for the token shards and meta.json")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the tokenizer's image_size)")
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard (default 5000)")
    parser.add_argument("--limit", type=int, help="encode only the first LIMIT images of the source")
    parser.add_argument("--batch-size", type=int, default=256, help="images per tokenizer call (default 256)")
    parser.add_argument("--workers", type=int, default=1, help="processes that encode shards in parallel")
    parser.add_argument("--device", default="cpu", help="torch device of the tokenizer (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: the CPU count "
                        "divided by --workers)")
    parser.add_argument("--horizontal-flip", action="store_true", help="also write a flipped copy of every image")
    parser.add_argument("--strict", action="store_true", help="fail on the first corrupt image instead of skipping it")


def run(args: argparse.Namespace) -> int:
    """Entry point of `xdlm-vision encode`."""
    meta = encode_dataset(
        tokenizer=args.tokenizer,
        source=args.source,
        data_dir=args.data_dir,
        split=args.split,
        output_dir=args.output_dir,
        image_size=args.image_size,
        shard_size=args.shard_size,
        limit=args.limit,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        threads=args.threads,
        horizontal_flip=args.horizontal_flip,
        strict=args.strict,
    )
    print(json.dumps({key: meta[key] for key in ("split", "num_samples", "class_counts", "num_corrupt")}))
    return 0


def encode_dataset(
    tokenizer: str | os.PathLike,
    output_dir: str | os.PathLike,
    source: str = "fashion-mnist",
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    image_size: int | None = None,
    shard_size: int = 5000,
    limit: int | None = None,
    batch_size: int = 256,
    workers: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    horizontal_flip: bool = False,
    strict: bool = False,
) -> dict:
    """Encode a source into token shards in `output_dir`, resuming finished shards; returns meta.json's content.

    The returned dict also has `num_corrupt`, the number of images left out because they failed to
    decode (this key is not written to meta.json).
    """
    from xdlm_vision.tokenizer import load_tokenizer

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if shard_size < 1 or batch_size < 1 or workers < 1:
        raise ValueError(f"--shard-size, --batch-size and --workers must be at least 1, got "
                         f"{shard_size}, {batch_size}, {workers}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    output_dir = Path(output_dir)
    tokenizer_model = load_tokenizer(tokenizer)
    config = tokenizer_model.config
    image_size = image_size or config.image_size
    if image_size % config.downsample_factor != 0:
        raise ValueError(f"--image-size {image_size} is not divisible by the tokenizer's downsample factor "
                         f"{config.downsample_factor}")
    images = open_image_source(source, data_dir, split, image_size)
    num_images = len(images) if limit is None else min(limit, len(images))
    grid_size = image_size // config.downsample_factor
    settings = EncodeSettings(
        tokenizer=os.fspath(tokenizer), source=source, data_dir=None if data_dir is None else os.fspath(data_dir),
        split=split, image_size=image_size, num_images=num_images, shard_size=shard_size,
        horizontal_flip=horizontal_flip, grid_size=grid_size, num_embeddings=config.num_embeddings,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_settings(output_dir, settings)

    # Encode the shards that are missing or fail verification, in this process or in worker processes.
    num_shards = math.ceil(num_images / shard_size)
    logger.info("encoding %d %s images (%s) into %d shards of up to %d in %s", num_images, source, split,
                num_shards, shard_size, output_dir)
    results: list[ShardResult] = []
    job = _ShardJob(settings, str(output_dir), batch_size, device, strict, len(images.class_names))
    progress = tqdm(total=num_shards, desc=f"encode {split}", unit="shard")
    if workers == 1 or num_shards == 1:
        previous_threads = torch.get_num_threads()
        _init_worker(tokenizer_model, images, threads)
        try:
            for index in range(num_shards):
                results.append(job(index))
                progress.update(1)
        finally:
            torch.set_num_threads(previous_threads)
            _WORKER.clear()
    else:
        context = multiprocessing.get_context("spawn")
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_worker,
            initargs=(os.fspath(tokenizer), images, threads),
        ) as pool:
            futures = [pool.submit(job, index) for index in range(num_shards)]
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                progress.update(1)
    progress.close()
    results.sort(key=lambda result: result.name)

    skipped = sum(result.skipped for result in results)
    if skipped:
        logger.info("%d of %d shards were already complete and verified", skipped, num_shards)

    class_counts = [sum(counts) for counts in zip(*(result.class_counts for result in results))]
    # A shard whose images were all corrupt stays on disk (so a resume skips it) but is not listed.
    shards = [{"name": result.name, "num_samples": result.num_samples} for result in results if result.num_samples]
    num_samples = sum(shard["num_samples"] for shard in shards)
    copies = 2 if horizontal_flip else 1
    num_corrupt = num_images - num_samples // copies
    if num_corrupt:
        logger.warning("%d of %d images were corrupt and left out", num_corrupt, num_images)
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "split": split,
        "tokenizer": os.fspath(tokenizer),
        "grid_size": grid_size,
        "num_embeddings": config.num_embeddings,
        "num_classes": len(images.class_names),
        "class_names": list(images.class_names),
        "num_samples": num_samples,
        "class_counts": class_counts,
        "horizontal_flip": horizontal_flip,
        "shards": shards,
    }
    write_meta(output_dir, meta)
    logger.info("wrote %d samples in %d shards and %s", num_samples, len(shards), output_dir / "meta.json")
    return {**meta, "num_corrupt": num_corrupt}


def _check_or_write_settings(output_dir: Path, settings: EncodeSettings) -> None:
    path = output_dir / SETTINGS_FILE
    current = asdict(settings)
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(key for key in current if previous.get(key) != current[key])
        if changed:
            details = ", ".join(f"{key}: {previous.get(key)!r} -> {current[key]!r}" for key in changed)
            raise ValueError(
                f"{output_dir} contains shards encoded with other settings ({details}); "
                "use a new --output-dir or delete the old shards"
            )
        return
    temporary = path.with_name(f"{SETTINGS_FILE}.tmp")
    temporary.write_text(json.dumps(current, indent=2) + "\n")
    os.replace(temporary, path)


# Per-process state: the tokenizer and the image source, set once by _init_worker.
_WORKER: dict = {}


def _init_worker(tokenizer, images, threads: int | None) -> None:
    from xdlm_vision.tokenizer import load_tokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    _WORKER["tokenizer"] = tokenizer.eval()
    _WORKER["images"] = images


@dataclass(frozen=True)
class _ShardJob:
    """Encode one shard by index; picklable, so worker processes can run it."""

    settings: EncodeSettings
    output_dir: str
    batch_size: int
    device: str
    strict: bool
    num_classes: int

    def __call__(self, index: int) -> ShardResult:
        settings = self.settings
        name = shard_name(settings.split, index)
        path = Path(self.output_dir) / name
        start = index * settings.shard_size
        stop = min(start + settings.shard_size, settings.num_images)
        expected_keys = set(_sample_keys(range(start, stop), settings.horizontal_flip))

        if path.exists():
            try:
                contents = read_token_shard(path, settings.grid_size, settings.num_embeddings, self.num_classes)
                if not set(contents.keys) <= expected_keys:
                    raise ValueError(f"token shard {path} contains keys outside images {start}..{stop - 1}")
                counts = np.bincount(np.asarray(contents.labels, dtype=np.int64), minlength=self.num_classes).tolist()
                return ShardResult(name, len(contents.keys), 0, skipped=True, class_counts=counts)
            except ValueError as error:
                logger.warning("re-encoding %s: %s", name, error)

        tokenizer = _WORKER["tokenizer"].to(self.device)
        images = _WORKER["images"]
        dtype = token_dtype(settings.num_embeddings)
        samples = []
        num_corrupt = 0
        for batch_start in range(start, stop, self.batch_size):
            batch_indices, batch_images, batch_labels = [], [], []
            for image_index in range(batch_start, min(batch_start + self.batch_size, stop)):
                try:
                    image, label = images.load(image_index)
                except CorruptImageError as error:
                    if self.strict:
                        raise ValueError(f"{error} (image {image_index}); drop --strict to skip corrupt images") from error
                    logger.warning("skipping corrupt image %d: %s", image_index, error)
                    num_corrupt += 1
                    continue
                batch_indices.append(image_index)
                batch_images.append(image)
                batch_labels.append(label)
            if not batch_images:
                continue
            pixels = torch.stack(batch_images)  # (B, 3, S, S)
            grids = _encode_grids(tokenizer, pixels, settings.grid_size, dtype)  # (B, h, w)
            flipped = _encode_grids(tokenizer, pixels.flip(-1), settings.grid_size, dtype) if settings.horizontal_flip else None
            for row, (image_index, label) in enumerate(zip(batch_indices, batch_labels)):
                samples.append((f"{image_index:08d}", grids[row], label))
                if flipped is not None:
                    samples.append((f"{image_index:08d}_flip", flipped[row], label))
        count = write_token_shard(path, samples)
        labels = np.asarray([label for _, _, label in samples], dtype=np.int64)
        counts = np.bincount(labels, minlength=self.num_classes).tolist()
        return ShardResult(name, count, num_corrupt, skipped=False, class_counts=counts)


def _sample_keys(indices: Sequence[int], horizontal_flip: bool):
    for index in indices:
        yield f"{index:08d}"
        if horizontal_flip:
            yield f"{index:08d}_flip"


def _encode_grids(tokenizer, pixels: torch.Tensor, grid_size: int, dtype: np.dtype) -> np.ndarray:
    tokens = tokenizer.encode(pixels.to(tokenizer.device))  # (B, h*w)
    return tokens.view(-1, grid_size, grid_size).cpu().numpy().astype(dtype)  # (B, h, w)


def encode_fashion_mnist_subset(
    output_dir: str | os.PathLike,
    num_images: int = 256,
    split: str = "test",
    tokenizer: str | os.PathLike = DEFAULT_TOKENIZER,
    shard_size: int | None = None,
    data_dir: str | os.PathLike = FASHION_MNIST_DIR,
    threads: int | None = 1,
) -> Path:
    """Encode the first `num_images` real Fashion-MNIST images with the shipped tokenizer; returns the folder.

    Meant for tests of training and evaluation that need real token shards in a few seconds.
    `shard_size` defaults to half the images, so that the folder has two shards. One torch thread is the
    default because this small tokenizer gains little from more, and test processes share the CPU.
    """
    encode_dataset(
        tokenizer=tokenizer,
        output_dir=output_dir,
        source="fashion-mnist",
        data_dir=data_dir,
        split=split,
        shard_size=shard_size or max(1, math.ceil(num_images / 2)),
        limit=num_images,
        threads=threads,
    )
    return Path(output_dir)
