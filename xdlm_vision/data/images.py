"""Image sources: Fashion-MNIST IDX files, ImageFolder trees and WebDataset image shards.

Every source is a random-access list of labelled images with deterministic order, so that token
shards can be named by position and an interrupted `encode` can resume shard by shard. `load(index)`
returns a float tensor (3, S, S) in [-1, 1] and the class index.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SOURCE_KINDS = ("fashion-mnist", "imagefolder", "webdataset")

# IDX element types by their code in the header (big-endian), as defined by the MNIST file format.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class CorruptImageError(ValueError):
    """An image file that cannot be decoded; `encode` counts these and goes on unless --strict."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of the shape its header gives."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header_size != expected:
        raise ValueError(
            f"IDX file {path} is truncated or damaged: header gives shape {shape} ({expected} bytes), "
            f"found {len(data) - header_size} bytes"
        )
    # A copy, because arrays over the bytes object are read-only and torch.from_numpy warns about those.
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape).copy()


def fashion_mnist_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """Turn uint8 Fashion-MNIST images (B, 28, 28) into (B, 3, 32, 32) float in [-1, 1], zero-padded (black)."""
    images = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 127.5 - 1.0  # (B, 28, 28)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)  # (B, 32, 32)
    return images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (B, 3, 32, 32)


def image_bytes_to_tensor(data: bytes, image_size: int, name: str) -> torch.Tensor:
    """Decode image bytes, resize the shorter side to image_size, centre-crop; returns (3, S, S) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            width, height = image.size
            scale = image_size / min(width, height)
            new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
            image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)
            left = (new_size[0] - image_size) // 2
            top = (new_size[1] - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
            array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"cannot decode image {name}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, S, S)


class FashionMNISTSource:
    """Fashion-MNIST from its four IDX files, 28x28 grayscale padded to 32x32 and repeated to 3 channels."""

    kind = "fashion-mnist"
    image_size = 32

    def __init__(self, data_dir: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train"):
        if split not in _FASHION_MNIST_FILES:
            raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FASHION_MNIST_FILES)}, got {split!r}")
        self.split = split
        self.class_names = list(FASHION_MNIST_CLASSES)
        images_name, labels_name = _FASHION_MNIST_FILES[split]
        self.pixels = read_idx(_find_idx(data_dir, images_name))  # (N, 28, 28) uint8
        self.labels = read_idx(_find_idx(data_dir, labels_name)).astype(np.int64)  # (N,)
        if self.pixels.ndim != 3 or self.pixels.shape[1:] != (28, 28) or len(self.pixels) != len(self.labels):
            raise ValueError(
                f"Fashion-MNIST {split} files in {data_dir} have image shape {self.pixels.shape} and "
                f"{len(self.labels)} labels; expected (N, 28, 28) and N labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return fashion_mnist_to_tensor(self.pixels[index : index + 1])[0], int(self.labels[index])

    def load_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Return images (B, 3, 32, 32) and labels (B,) for an array of indices, without a per-image loop."""
        indices = np.asarray(indices)
        return fashion_mnist_to_tensor(self.pixels[indices]), torch.from_numpy(self.labels[indices])


def _find_idx(data_dir: str | os.PathLike, name: str) -> Path:
    for candidate in (Path(data_dir) / f"{name}.gz", Path(data_dir) / name):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"Fashion-MNIST file {name}(.gz) not found in {data_dir}; install the Debian package "
        "dataset-fashion-mnist or pass --data-dir with the four IDX files"
    )


class ImageFolderSource:
    """An ImageFolder tree: `<root>/<split>/<class>/<image>` (the ImageNet layout), classes sorted by name."""

    kind = "imagefolder"

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 256):
        folder = Path(root) / split
        if not folder.is_dir():
            raise ValueError(f"ImageFolder split folder {folder} not found; expected {root}/{split}/<class>/<images>")
        self.split = split
        self.image_size = image_size
        self.class_names = sorted(path.name for path in folder.iterdir() if path.is_dir())
        if not self.class_names:
            raise ValueError(f"no class folders in {folder}; expected {folder}/<class>/<image files>")
        self.items: list[tuple[Path, int]] = []
        for label, name in enumerate(self.class_names):
            for path in sorted((folder / name).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    self.items.append((path, label))
        if not self.items:
            raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} under {folder}")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CorruptImageError(f"cannot read image {path}: {error}") from error
        return image_bytes_to_tensor(data, self.image_size, str(path)), label


@dataclass(frozen=True)
class _ShardMember:
    tar_path: Path
    key: str
    offset: int  # byte offset of the image data in the tar file
    size: int
    label: int


class ImageShardSource:
    """WebDataset image shards: tar files whose samples have `.jpg`/`.jpeg`/`.png` and `.cls` members.

    The shards are `<data_dir>/<split>-*.tar` when such files exist, else every `<data_dir>/*.tar`,
    in sorted order. Tar headers are indexed once so that any image can be read by its byte offset.
    Class names come from `<data_dir>/classes.txt` (one per line) when present, else they are "0", "1", ...
    """

    kind = "webdataset"

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", image_size: int = 256):
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"image shard folder {data_dir} not found")
        tar_paths = sorted(data_dir.glob(f"{split}-*.tar")) or sorted(data_dir.glob("*.tar"))
        if not tar_paths:
            raise ValueError(f"no .tar shards in {data_dir}; expected {split}-000000.tar, ...")
        self.split = split
        self.image_size = image_size
        self.members: list[_ShardMember] = []
        for tar_path in tar_paths:
            self.members.extend(_index_image_shard(tar_path))
        if not self.members:
            raise ValueError(f"shards in {data_dir} contain no samples with an image and a .cls member")
        num_classes = max(member.label for member in self.members) + 1
        names_file = data_dir / "classes.txt"
        if names_file.is_file():
            self.class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
            if len(self.class_names) < num_classes:
                raise ValueError(f"{names_file} names {len(self.class_names)} classes but labels go to {num_classes - 1}")
        else:
            self.class_names = [str(label) for label in range(num_classes)]

    def __len__(self) -> int:
        return len(self.members)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        member = self.members[index]
        with open(member.tar_path, "rb") as file:
            file.seek(member.offset)
            data = file.read(member.size)
        return image_bytes_to_tensor(data, self.image_size, f"{member.tar_path}:{member.key}"), member.label


def _index_image_shard(tar_path: Path) -> list[_ShardMember]:
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(tar_path, "r") as archive:
            for info in archive:
                if not info.isfile():
                    continue
                # WebDataset convention: the key is everything before the first dot of the file name.
                directory, _, base = info.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                if extension.lower() in ("jpg", "jpeg", "png", "webp"):
                    images[key] = info
                elif extension == "cls":
                    text = archive.extractfile(info).read().decode("ascii").strip()
                    try:
                        labels[key] = int(text)
                    except ValueError as error:
                        raise ValueError(f"{tar_path}: sample {key} has a non-integer .cls {text!r}") from error
    except tarfile.TarError as error:
        raise ValueError(f"cannot read image shard {tar_path}: {error}") from error
    members = []
    for key, info in images.items():
        if key not in labels:
            logger.warning("%s: sample %s has no .cls member; skipped", tar_path, key)
            continue
        members.append(_ShardMember(tar_path, key, info.offset_data, info.size, labels[key]))
    return members


def open_image_source(kind: str, data_dir: str | os.PathLike | None, split: str, image_size: int | None = None):
    """Open a source by kind: "fashion-mnist", "imagefolder" or "webdataset"."""
    if kind == "fashion-mnist":
        if image_size not in (None, 32):
            raise ValueError(f"Fashion-MNIST images are 32x32 after padding; got image size {image_size}")
        return FashionMNISTSource(data_dir or FASHION_MNIST_DIR, split)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown image source {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if data_dir is None:
        raise ValueError(f"the {kind} source needs --data-dir")
    size = image_size or 256
    if kind == "imagefolder":
        return ImageFolderSource(data_dir, split, size)
    return ImageShardSource(data_dir, split, size)
