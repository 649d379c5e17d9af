"""Real image sets for FID jobs: the reference, the real-data floor and the images behind rFID.

A set is named by a spec:

- `fashion-mnist:test` or `fashion-mnist:train`: the IDX files, 28x28 padded to 32x32, 3 channels;
- `imagefolder:PATH`, or just PATH when it is a folder: `PATH/<class>/<images>` (such as an ImageNet
  val folder sorted into class folders), classes sorted by name, each image resized on its shorter
  side (bicubic) and centre-cropped to the sample size;
- a `.npz` file: reference features written by `--save-reference` (or by the cache), or plain
  statistics `mu`, `sigma` (the pytorch-fid and ADM format), which give FID only.

Reference features are cached per (spec, data fingerprint, image size, extractor weights digest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xdlm_vision.atomic import atomic_write
from xdlm_vision.metrics.scores import feature_statistics, nearest_neighbor_radii

logger = logging.getLogger(__name__)

REFERENCE_FORMAT = "xdlm-reference-features"
REFERENCE_VERSION = 1


def default_cache_dir() -> Path:
    """Return `$XDG_CACHE_HOME/xdlm-vision/fid` (default `~/.cache/xdlm-vision/fid`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "xdlm-vision" / "fid"


# ---------------------------------------------------------------------- image sets


@dataclass
class ImageSet:
    """A labelled set of real images, read in batches as uint8 [b, 3, S, S]."""

    spec: str
    source: object  # a source from xdlm_vision.data.images, with load() or load_batch()
    indices: np.ndarray  # positions in the source, in reading order
    labels: np.ndarray  # class id per position of `indices`
    resize: str
    fingerprint: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def iter_batches(self, batch_size: int = 500) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images [b, 3, S, S], labels [b]) in order."""
        for start in range(0, len(self.indices), batch_size):
            positions = self.indices[start : start + batch_size]
            if hasattr(self.source, "load_batch"):
                images, _ = self.source.load_batch(positions)  # (b, 3, S, S) in [-1, 1]
            else:
                images = torch.stack([self.source.load(int(position))[0] for position in positions])
            labels = torch.from_numpy(self.labels[start : start + batch_size])
            yield _unit_to_uint8(images), labels

    def subset_per_class(self, per_class: int, seed: int) -> ImageSet:
        """Return a subset with exactly `per_class` images of every class, drawn with a seeded permutation."""
        order = np.random.default_rng(seed).permutation(len(self.indices))
        chosen = []
        for class_id in range(len(self.class_names)):
            members = order[self.labels[order] == class_id][:per_class]
            if len(members) < per_class:
                raise ValueError(f"{self.spec} has only {len(members)} images of class {self.class_names[class_id]!r}, "
                                 f"fewer than the {per_class} per class requested; lower --num-samples")
            chosen.append(members)
        # Index-major order, like generated samples: class 0..C-1 for index 0, then index 1, ...
        selected = np.stack(chosen, axis=1).reshape(-1)
        return ImageSet(f"{self.spec} ({per_class} per class, seed {seed})", self.source, self.indices[selected],
                        self.labels[selected], self.resize, {**self.fingerprint, "subset_seed": seed,
                                                             "per_class": per_class})


def _unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] to uint8 0..255, the inverse of the readers' `pixel / 127.5 - 1`."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def open_image_set(spec: str, image_size: int | None = None, data_dir: str | None = None) -> ImageSet:
    """Open a real image set by its spec (see the module docstring); `image_size` applies to ImageFolder sets."""
    from xdlm_vision.data.images import FASHION_MNIST_DIR, FashionMNISTSource, ImageFolderSource

    kind, _, rest = spec.partition(":")
    if kind == "fashion-mnist":
        split = rest or "test"
        folder = data_dir or FASHION_MNIST_DIR
        source = FashionMNISTSource(folder, split)
        fingerprint = {"kind": "fashion-mnist", "split": split, "files": _files_fingerprint(Path(folder), split)}
        return ImageSet(f"fashion-mnist:{split}", source, np.arange(len(source)), source.labels.copy(),
                        "28x28 zero-padded to 32x32, grey repeated to 3 channels", fingerprint)

    path = Path(rest) if kind == "imagefolder" else Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"reference {spec!r} is neither fashion-mnist:test|train, a folder of class folders, nor a .npz file"
        )
    size = image_size or 256
    source = ImageFolderSource(path.parent, path.name, size)
    labels = np.array([label for _, label in source.items], dtype=np.int64)
    stats = [item_path.stat() for item_path, _ in source.items]
    fingerprint = {"kind": "imagefolder", "path": str(path.resolve()), "files": len(stats),
                   "bytes": sum(stat.st_size for stat in stats), "mtime": max(stat.st_mtime for stat in stats)}
    return ImageSet(f"imagefolder:{path}", source, np.arange(len(source)), labels,
                    f"shorter side resized to {size} (bicubic), centre-cropped to {size}x{size}", fingerprint)


def _files_fingerprint(folder: Path, split: str) -> list:
    prefix = "train" if split == "train" else "t10k"
    files = sorted(folder.glob(f"{prefix}-*"))
    return [[file.name, file.stat().st_size, int(file.stat().st_mtime)] for file in files]


def default_floor_spec(reference_spec: str) -> str | None:
    """Return the training split that pairs with a reference: fashion-mnist:train, or a `train` sibling folder."""
    if reference_spec.startswith("fashion-mnist"):
        return "fashion-mnist:train"
    path = Path(reference_spec.partition(":")[2] if reference_spec.startswith("imagefolder:") else reference_spec)
    sibling = path.parent / "train"
    if path.is_dir() and sibling.is_dir() and sibling.resolve() != path.resolve():
        return f"imagefolder:{sibling}"
    return None


# ---------------------------------------------------------------------- reference features


@dataclass
class ReferenceFeatures:
    """Features of the FID layer [N, D] and labels [N] of a reference set, or its statistics only."""

    meta: dict
    features: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    _class_statistics: dict = field(default_factory=dict, repr=False)
    _radii: dict = field(default_factory=dict, repr=False)

    def statistics(self) -> dict:
        if self.mu is None:
            statistics = feature_statistics(self.features)
            self.mu, self.sigma = statistics["mu"], statistics["sigma"]
        return {"mu": self.mu, "sigma": self.sigma}

    def radii(self, neighborhood: int) -> torch.Tensor:
        """Return the k-nearest-neighbour radii [N] of the reference features used by precision/recall."""
        if neighborhood not in self._radii:
            self._radii[neighborhood] = nearest_neighbor_radii(self.features, neighborhood)
        return self._radii[neighborhood]

    def class_statistics(self, class_id: int) -> dict | None:
        """Return the statistics of one class's reference images, or None without features and labels."""
        if self.features is None or self.labels is None:
            return None
        if class_id not in self._class_statistics:
            selected = self.features[self.labels == class_id]
            self._class_statistics[class_id] = feature_statistics(selected) if len(selected) >= 2 else None
        return self._class_statistics[class_id]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the features (or statistics) and their description to an .npz file, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"meta": np.array(json.dumps(self.meta))}
        if self.features is not None:
            arrays["features"] = self.features.numpy()
            arrays["labels"] = self.labels.numpy()
        else:
            arrays["mu"], arrays["sigma"] = self.mu, self.sigma
        with atomic_write(path, "wb") as file:
            np.savez(file, **arrays)
        return path


def load_reference_file(path: str | os.PathLike, extractor_info) -> ReferenceFeatures:
    """Load a reference .npz: this project's features file or plain `mu`/`sigma` statistics.

    Raises:
        ValueError: the file is unreadable, or it names another extractor or feature layer.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read reference statistics file {path}: {error}") from error

    if "meta" in arrays:
        meta = json.loads(str(arrays["meta"]))
        if meta.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"{path} is not an {REFERENCE_FORMAT} file (format {meta.get('format')!r})")
        extractor = meta.get("extractor", {})
        if (extractor.get("name"), extractor.get("weights_sha256"), extractor.get("feature_layer_fid")) != (
            extractor_info.name, extractor_info.weights_sha256, extractor_info.feature_layer_fid
        ):
            raise ValueError(
                f"{path} was computed with extractor {extractor.get('name')} (weights sha256 "
                f"{str(extractor.get('weights_sha256'))[:12]}, layer {extractor.get('feature_layer_fid')}), but this "
                f"job uses {extractor_info.name} (sha256 {extractor_info.weights_sha256[:12]}, layer "
                f"{extractor_info.feature_layer_fid}); use the matching --extractor or recompute the reference"
            )
        if "features" in arrays:
            return ReferenceFeatures(meta, torch.from_numpy(arrays["features"]), torch.from_numpy(arrays["labels"]))
        return ReferenceFeatures(meta, mu=arrays["mu"], sigma=arrays["sigma"])

    if "mu" in arrays and "sigma" in arrays:
        logger.warning("%s holds plain statistics without a record of its extractor; it is assumed to be %s, "
                       "layer %s. Only FID can be computed from it.", path, extractor_info.name,
                       extractor_info.feature_layer_fid)
        meta = {"format": "mu-sigma", "spec": str(path), "num_images": None,
                "extractor": {"name": extractor_info.name, "assumed": True}}
        return ReferenceFeatures(meta, mu=arrays["mu"], sigma=arrays["sigma"])
    raise ValueError(f"{path} holds neither this project's reference features (meta, features) nor mu and sigma "
                     f"arrays; found {sorted(arrays)}")


def compute_reference(
    image_set: ImageSet,
    extractor,
    extractor_info,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 500,
) -> ReferenceFeatures:
    """Extract the reference features of an image set, reading and writing the cache when `cache_dir` is set."""
    from xdlm_vision.metrics.extractor import extract_features

    key = {"fingerprint": image_set.fingerprint, "resize": image_set.resize, "num_images": len(image_set),
           "extractor": extractor_info.name, "weights_sha256": extractor_info.weights_sha256,
           "layer": extractor_info.feature_layer_fid}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache_path = Path(cache_dir) / f"reference-{digest}.npz" if cache_dir is not None else None
    if cache_path is not None and cache_path.is_file():
        try:
            cached = load_reference_file(cache_path, extractor_info)
            logger.info("loaded cached reference features %s (%s)", cache_path, image_set.spec)
            return cached
        except ValueError as error:
            logger.warning("ignoring the damaged reference cache %s: %s", cache_path, error)

    features = extract_features(extractor, (images for images, _ in image_set.iter_batches(batch_size)),
                                total=len(image_set), description=f"reference {image_set.spec}")
    meta = {"format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, "spec": image_set.spec,
            "num_images": len(image_set), "class_names": image_set.class_names, "resize": image_set.resize,
            "fingerprint": image_set.fingerprint, "extractor": extractor_info.to_dict()}
    reference = ReferenceFeatures(meta, features[extractor_info.feature_layer_fid], torch.from_numpy(image_set.labels))
    if cache_path is not None:
        reference.save(cache_path)
        logger.info("cached reference features in %s", cache_path)
    return reference
