"""The sampling protocol of FID jobs: uniform class counts, one seed per image, resumable chunk files.

A job of N images over C classes draws exactly N / C images per class. Image `i` of class `c` is
sampled with its own `torch.Generator` seeded from (base seed, c, i), so an image does not depend on
which batch or chunk it falls in, and a larger N extends a smaller one. Images are ordered
index-major (class 0..C-1 for index 0, then for index 1, ...), so every chunk covers all classes.

Each chunk is written to `chunk-{k:06d}.npz` (uint8 images [b, 3, H, W], labels, seeds) through a
temporary file and `os.replace`. The `plan.json` beside the chunks fixes the protocol. An
interrupted job run again with the same protocol skips the finished chunks.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xdlm_vision.atomic import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

PLAN_FORMAT = "xdlm-fid-samples"
PLAN_VERSION = 1


def image_seed(base_seed: int, class_id: int, index: int) -> int:
    """Return the 63-bit seed of image `index` of class `class_id`, a hash of the three numbers."""
    if min(base_seed, class_id, index) < 0:
        raise ValueError(f"seed, class id and index must be >= 0, got {base_seed}, {class_id}, {index}")
    state = np.random.SeedSequence([base_seed, class_id, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


@dataclass(frozen=True)
class SamplePlan:
    """The order, classes and seeds of a job's N images: C classes, N / C per class, seeds from `image_seed`."""

    num_samples: int
    num_classes: int
    seed: int
    chunk_size: int

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 1")
        if self.num_samples < self.num_classes or self.num_samples % self.num_classes != 0:
            raise ValueError(
                f"--num-samples {self.num_samples} must be a positive multiple of the {self.num_classes} classes "
                f"so that every class gets the same count; use for example {max(1, round(self.num_samples / self.num_classes)) * self.num_classes}"
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk size {self.chunk_size} must be >= 1")

    @property
    def samples_per_class(self) -> int:
        return self.num_samples // self.num_classes

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def entries(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return class ids, per-class indices and seeds of plan positions start..stop-1 (int64, int64, uint64)."""
        positions = np.arange(start, min(stop, self.num_samples))
        labels = positions % self.num_classes
        indices = positions // self.num_classes
        seeds = np.array([image_seed(self.seed, int(c), int(i)) for c, i in zip(labels, indices)], dtype=np.uint64)
        return labels.astype(np.int64), indices.astype(np.int64), seeds

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Turn images [B, 3, H, W] in [0, 1] into uint8 0..255 by rounding, as diffusers' `numpy_to_pil` does."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    with atomic_write(path, "wb") as file:
        np.savez(file, **arrays)


def load_chunk(path: Path) -> dict[str, np.ndarray] | None:
    """Read a chunk file; return None if it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {name: data[name] for name in ("images", "labels", "seeds")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("chunk %s is unreadable (%s); it will be sampled again", path, error)
        return None


def generate_samples(
    pipeline,
    plan: SamplePlan,
    out_dir: str | os.PathLike,
    num_steps: int,
    guidance_scale: float,
    protocol: dict,
    device: str | torch.device = "cpu",
) -> dict:
    """Sample the plan's images with `pipeline` into chunk files in `out_dir`, skipping finished chunks.

    Args:
        pipeline: an `XDLMPipeline` (anything whose call takes class ids, `num_steps`, `guidance_scale`,
            a list of generators and `output_type="pt"` and returns images [B, 3, H, W] in [0, 1]).
        plan (`SamplePlan`): counts, seed and chunk size.
        out_dir: the folder of `plan.json` and the chunks.
        protocol (`dict`): facts that must match for a resume (pipeline, steps, guidance, ...), stored in `plan.json`.

    Returns:
        A dict with the number of chunks sampled now and skipped, and the sampling seconds.

    Raises:
        ValueError: `out_dir` contains chunks of a different protocol.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_file = out_dir / "plan.json"
    payload = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "plan": asdict(plan), "protocol": protocol}
    if plan_file.is_file():
        existing = json.loads(plan_file.read_text(encoding="utf-8"))
        if existing != json.loads(json.dumps(payload)):
            raise ValueError(
                f"{out_dir} contains samples of another protocol ({plan_file} differs: "
                f"{_describe_difference(existing, payload)}); choose another --out-dir or delete that folder"
            )
    else:
        write_json_atomic(plan_file, payload)

    sampled = skipped = 0
    start_time = time.perf_counter()
    for chunk in tqdm(range(plan.num_chunks), desc=f"sampling {num_steps} steps", unit="chunk"):
        path = out_dir / f"chunk-{chunk:06d}.npz"
        start, stop = plan.chunk_range(chunk)
        existing_chunk = load_chunk(path)
        if existing_chunk is not None and len(existing_chunk["labels"]) == stop - start:
            skipped += 1
            continue

        labels, _, seeds = plan.entries(start, stop)
        generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        output = pipeline(
            labels.tolist(), num_steps=num_steps, guidance_scale=guidance_scale, generator=generators, output_type="pt"
        )
        images = to_uint8(output.images.cpu())  # (b, 3, H, W)
        _write_npz_atomic(path, images=images.numpy(), labels=labels, seeds=seeds)
        sampled += 1
    if skipped:
        logger.info("resumed %s: %d chunks were already sampled, %d sampled now", out_dir, skipped, sampled)
    return {"chunks_sampled": sampled, "chunks_skipped": skipped, "sampling_seconds": time.perf_counter() - start_time}


def _describe_difference(existing: dict, expected: dict) -> str:
    differences = []
    for section in ("plan", "protocol"):
        old, new = existing.get(section, {}), expected.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                differences.append(f"{key} {old.get(key)!r} != {new.get(key)!r}")
    return "; ".join(differences) or "format or version"


def iter_sample_chunks(out_dir: str | os.PathLike, plan: SamplePlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images [b, 3, H, W], labels [b]) chunk by chunk; raise if a chunk is missing."""
    out_dir = Path(out_dir)
    for chunk in range(plan.num_chunks):
        path = out_dir / f"chunk-{chunk:06d}.npz"
        data = load_chunk(path)
        if data is None:
            raise ValueError(f"sample chunk {path} is missing or damaged; run the fid job again to sample it")
        yield torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])
