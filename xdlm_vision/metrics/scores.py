"""Scores from extracted features, with torch-fidelity's implementations: FID, IS, KID, precision/recall.

Features are computed once per image set; overall and per-class scores all come from them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreOptions:
    """torch-fidelity's metric settings (its defaults), except that KID's subset shrinks to fit small sets."""

    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = 3
    rng_seed: int = 2020


def feature_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Return the mean `mu` [D] and covariance `sigma` [D, D] of features [N, D], in float64."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {features.shape[0]}")
    array = features.double().numpy()
    return {"mu": array.mean(axis=0), "sigma": np.cov(array, rowvar=False)}


def frechet_distance(statistics_1: dict, statistics_2: dict) -> float:
    """Return the Fréchet distance between two Gaussians given as {"mu", "sigma"} (torch-fidelity's formula)."""
    first = {name: np.asarray(statistics_1[name], dtype=np.float64) for name in ("mu", "sigma")}
    second = {name: np.asarray(statistics_2[name], dtype=np.float64) for name in ("mu", "sigma")}
    if first["mu"].shape != second["mu"].shape:
        raise ValueError(f"feature sizes differ: {first['mu'].shape[0]} and {second['mu'].shape[0]}; "
                         "both sets must come from the same extractor and layer")
    return float(fid_statistics_to_metric(first, second, verbose=False)["frechet_inception_distance"])


def score_features(
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    reference,
    layer_fid: str,
    layer_isc: str,
    class_names: list[str],
    options: ScoreOptions = ScoreOptions(),
    classifier_logits: bool = False,
) -> dict:
    """Score a set of images (features per layer, class labels [N]) against a reference.

    Args:
        reference: a `ReferenceFeatures` (features and labels) or statistics only (then only FID).
        classifier_logits (`bool`): the IS layer is the logits of a classifier of these classes, so the
            fraction of images classified as their label (`classifier_accuracy`) is reported too.

    Returns:
        A dict of metrics: fid, inception_score_mean/std, kid_mean/std, precision, recall, f_score,
        per_class_fid (class name to FID against that class's reference images), classifier_accuracy and
        per_class_accuracy (with a classifier). Metrics that the reference cannot give are None.
    """
    generated = features[layer_fid]  # (N, D)
    metrics: dict = {"num_images": int(generated.shape[0])}
    metrics["fid"] = frechet_distance(feature_statistics(generated), reference.statistics())

    logits = features[layer_isc]  # (N, K)
    inception_score = isc_features_to_metric(logits, splits=min(options.isc_splits, len(logits)),
                                             shuffle=True, rng_seed=options.rng_seed)
    metrics["inception_score_mean"] = inception_score["inception_score_mean"]
    metrics["inception_score_std"] = inception_score["inception_score_std"]

    reference_features = reference.features
    if reference_features is None:
        logger.warning("the reference has statistics only: KID and precision/recall are not computed")
        metrics.update(kid_mean=None, kid_std=None, precision=None, recall=None, f_score=None)
    else:
        metrics.update(kid(generated, reference_features, options))
        prc = prc_features_to_metric(generated, reference_features, prc_neighborhood=options.prc_neighborhood,
                                     save_cpu_ram=True, verbose=False)
        metrics.update(precision=prc["precision"], recall=prc["recall"], f_score=prc["f_score"])

    metrics["per_class_fid"] = per_class_fid(generated, labels, reference, class_names)

    if classifier_logits:
        predictions = logits.argmax(dim=1)  # (N,)
        correct = predictions == labels
        metrics["classifier_accuracy"] = float(correct.float().mean())
        metrics["per_class_accuracy"] = {
            class_names[class_id]: float(correct[labels == class_id].float().mean())
            for class_id in range(len(class_names)) if bool((labels == class_id).any())
        }
    return metrics


def kid(features_1: torch.Tensor, features_2: torch.Tensor, options: ScoreOptions) -> dict:
    """Return KID mean and std; the subset size is the smaller of the configured size and both set sizes."""
    subset_size = min(options.kid_subset_size, len(features_1), len(features_2))
    if subset_size < options.kid_subset_size:
        logger.info("KID subset size reduced from %d to %d to fit the set sizes", options.kid_subset_size, subset_size)
    result = kid_features_to_metric(features_1, features_2, kid_subsets=options.kid_subsets,
                                    kid_subset_size=subset_size, rng_seed=options.rng_seed, verbose=False)
    return {"kid_mean": result["kernel_inception_distance_mean"], "kid_std": result["kernel_inception_distance_std"],
            "kid_subset_size": subset_size}


def per_class_fid(generated: torch.Tensor, labels: torch.Tensor, reference, class_names: list[str]) -> dict | None:
    """Return FID per class name against the reference statistics of that class, or None without reference labels."""
    result = {}
    for class_id, name in enumerate(class_names):
        selected = generated[labels == class_id]  # (n_c, D)
        reference_statistics = reference.class_statistics(class_id)
        if reference_statistics is None:
            return None
        if len(selected) < 2:
            result[name] = None
            continue
        value = frechet_distance(feature_statistics(selected), reference_statistics)
        result[name] = value if math.isfinite(value) else None
    return result
