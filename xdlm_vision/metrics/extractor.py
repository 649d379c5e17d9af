"""Feature extractors for FID, KID, precision/recall and IS, all through torch-fidelity.

Two extractors:

- `inception-v3-compat`, torch-fidelity's port of the TensorFlow Inception-v3 that FID is defined with.
  Its weights are never downloaded here: they come from `--inception-weights PATH` or from
  torch-fidelity's cache file (see `inception_weights_location`).
- `xdlm-classifier`, the project's small CNN (`ImageClassifier`), registered with torch-fidelity so
  `torch_fidelity.calculate_metrics(feature_extractor="xdlm-classifier",
  feature_extractor_weights_path=FOLDER)` also works. Trained on Fashion-MNIST it is the offline
  extractor for small data. Its scores are comparable only with scores from the same weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from tqdm.auto import tqdm

from xdlm_vision.metrics.classifier import DEFAULT_CLASSIFIER_DIR, ImageClassifier

logger = logging.getLogger(__name__)

INCEPTION_EXTRACTOR = "inception-v3-compat"
CLASSIFIER_EXTRACTOR = "xdlm-classifier"
EXTRACTOR_KINDS = {"inception": INCEPTION_EXTRACTOR, "classifier": CLASSIFIER_EXTRACTOR}


class FeatureExtractorWeightsError(OSError):
    """Feature-extractor weights that are missing or damaged; the message names the folder the file belongs in."""


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of `ImageClassifier`: `penultimate` features for FID/KID/PRC, `logits` for IS.

    Inputs are uint8 images [B, 3, H, W], torch-fidelity's convention; sizes other than the classifier's
    are resized to it with bilinear interpolation and antialiasing.

    Args:
        name (`str`): the registered name.
        features_list (`list[str]`): the requested features, among "penultimate" and "logits".
        feature_extractor_weights_path (`str`, *optional*): a folder saved by `train-classifier`;
            defaults to the shipped `classifiers/fashion-mnist`.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        folder = Path(feature_extractor_weights_path or DEFAULT_CLASSIFIER_DIR)
        self.classifier = load_classifier(folder)
        self.weights_folder = folder

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, images):
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError("expected uint8 images of shape [B, 3, H, W], got "
                            f"{getattr(images, 'dtype', type(images).__name__)} {list(getattr(images, 'shape', []))}")
        penultimate, logits = self.classifier.forward_features(self.classifier.preprocess(images))  # (B, D), (B, K)
        available = {"penultimate": penultimate, "logits": logits}
        return tuple(available[name] for name in self.features_list)


def register_extractors() -> None:
    """Register `xdlm-classifier` with torch-fidelity (once per process)."""
    if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)


register_extractors()


def load_classifier(folder: str | os.PathLike) -> ImageClassifier:
    """Load a classifier folder saved by `train-classifier`, in eval mode; raise one clear error if it is unusable."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FeatureExtractorWeightsError(
            f"classifier folder {folder} not found or without config.json; train one with "
            f"`xdlm-vision train-classifier --out {folder}` or pass --classifier with a folder it wrote"
        )
    # Strict loading: diffusers' from_pretrained would initialise missing weights at random and only warn.
    try:
        classifier = ImageClassifier.from_config(ImageClassifier.load_config(folder))
        state_dict = safetensors.torch.load_file(_classifier_weights_file(folder))
        classifier.load_state_dict(state_dict, strict=True)
    except (OSError, ValueError, RuntimeError, KeyError, safetensors.SafetensorError) as error:
        raise FeatureExtractorWeightsError(f"cannot load the classifier in {folder}: "
                                           f"{' '.join(str(error).split())[:400]}") from error
    return classifier.eval().requires_grad_(False)


# ---------------------------------------------------------------------- Inception weights


def inception_weights_location() -> tuple[Path, str]:
    """Return the folder and file name where torch-fidelity 0.4 looks for (and would download) the Inception weights.

    torch-fidelity loads `URL_INCEPTION_V3` with `torch.hub.load_state_dict_from_url`, which keeps the
    file under `<torch hub dir>/checkpoints/` by its URL's file name (`$TORCH_HOME/hub/checkpoints`).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints", URL_INCEPTION_V3.rsplit("/", 1)[-1]


def _where_to_put_inception() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    folder, name = inception_weights_location()
    return (f"put torch-fidelity's Inception weights file {name} in {folder} (published at {URL_INCEPTION_V3}), "
            "or pass --inception-weights PATH; nothing is downloaded at run time")


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Find and check the Inception-v3 weights: `path` if given, else torch-fidelity's cache file.

    The file is loaded with `torch.load(weights_only=True)` and must be a state dict with Inception's
    1008-way `fc` layer, so a damaged or foreign file fails here, before any sampling.

    Raises:
        FeatureExtractorWeightsError: the file is missing or damaged; the message names where to put it.
    """
    if path is None:
        folder, name = inception_weights_location()
        path = folder / name
        if not path.is_file():
            raise FeatureExtractorWeightsError(f"Inception weights not found at {path}: {_where_to_put_inception()}")
    path = Path(path)
    if not path.is_file():
        raise FeatureExtractorWeightsError(f"Inception weights file {path} not found: {_where_to_put_inception()}")

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise FeatureExtractorWeightsError(
            f"Inception weights file {path} is damaged or not a PyTorch state dict ({type(error).__name__}); "
            f"{_where_to_put_inception()}"
        ) from error
    fc_weight = state_dict.get("fc.weight") if isinstance(state_dict, dict) else None
    if not torch.is_tensor(fc_weight) or tuple(fc_weight.shape) != (1008, 2048):
        raise FeatureExtractorWeightsError(
            f"{path} is not torch-fidelity's Inception-v3 state dict (no fc.weight of shape [1008, 2048]); "
            f"{_where_to_put_inception()}"
        )
    return path


# ---------------------------------------------------------------------- building and running extractors


@dataclass
class ExtractorInfo:
    """The extractor's identity, recorded in every result: registered name, weights, digest and feature layers."""

    name: str
    weights: str
    weights_sha256: str
    feature_layer_fid: str
    feature_layer_isc: str
    input: str
    class_names: list[str] | None = field(default=None)

    def to_dict(self) -> dict:
        return asdict(self)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_extractor(
    kind: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[FeatureExtractorBase, ExtractorInfo]:
    """Create a torch-fidelity feature extractor that returns the FID layer and the IS layer, in that order.

    Args:
        kind (`str`): "classifier" or "inception".
        weights (`str`, *optional*): the classifier folder, or the Inception weights file.
        device: where the extractor runs.
    """
    from torch_fidelity.utils import create_feature_extractor

    if kind not in EXTRACTOR_KINDS:
        raise ValueError(f"unknown feature extractor {kind!r}; choose one of {sorted(EXTRACTOR_KINDS)}")
    name = EXTRACTOR_KINDS[kind]
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layer_fid = cls.get_default_feature_layer_for_metric("fid")
    layer_isc = cls.get_default_feature_layer_for_metric("isc")

    if kind == "inception":
        weights_path = resolve_inception_weights(weights)
        sha256 = file_sha256(weights_path)
        description = "uint8 RGB, resized inside the extractor to 299x299 (TensorFlow-1 compatible bilinear)"
        class_names = None
    else:
        weights_path = Path(weights or DEFAULT_CLASSIFIER_DIR)
        classifier = load_classifier(weights_path)
        sha256 = file_sha256(_classifier_weights_file(weights_path))
        size = classifier.config.image_size
        description = f"uint8 RGB mapped to [-1, 1], resized to {size}x{size} (bilinear, antialiased) when another size"
        class_names = list(classifier.config.id2label or [])

    # The file was just checked with weights_only=True, so torch-fidelity's own full torch.load of it is safe.
    try:
        extractor = create_feature_extractor(
            name, [layer_fid, layer_isc], cuda=False, feature_extractor_weights_path=str(weights_path), verbose=False
        )
    except RuntimeError as error:  # load_state_dict with missing or unexpected keys
        raise FeatureExtractorWeightsError(f"cannot load {name} weights from {weights_path}: "
                                           f"{str(error).splitlines()[0]}") from error
    extractor = extractor.to(device)
    info = ExtractorInfo(
        name=name,
        weights=str(weights_path),
        weights_sha256=sha256,
        feature_layer_fid=layer_fid,
        feature_layer_isc=layer_isc,
        input=description,
        class_names=class_names,
    )
    return extractor, info


def _classifier_weights_file(folder: Path) -> Path:
    candidates = sorted(folder.glob("*.safetensors"))
    if not candidates:
        raise FeatureExtractorWeightsError(f"no .safetensors weights in classifier folder {folder}")
    return candidates[0]


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractorBase,
    batches: Iterable[torch.Tensor],
    total: int | None = None,
    batch_size: int = 250,
    description: str = "features",
) -> dict[str, torch.Tensor]:
    """Run the extractor over uint8 image batches [b, 3, H, W]; return float32 features [N, D] per layer, on CPU.

    Batches are re-split to `batch_size` so memory does not depend on how the caller chunks its images.
    """
    device = next(extractor.parameters()).device
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in extractor.get_requested_features_list()}
    with tqdm(total=total, desc=description, unit="img", leave=False) as progress:
        for batch in batches:
            for part in batch.split(batch_size):
                features = extractor.convert_features_tuple_to_dict(extractor(part.to(device)))
                for name, value in features.items():
                    outputs[name].append(value.float().cpu())  # (b, D)
                progress.update(len(part))
    if not any(outputs.values()):
        raise ValueError("no images to extract features from")
    return {name: torch.cat(values) for name, values in outputs.items()}
