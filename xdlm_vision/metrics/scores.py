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
from torch_fidelity.metric_prc import calc_cdist_part

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
        metrics.update(precision_recall(generated, reference_features, reference.radii(options.prc_neighborhood),
                                        options.prc_neighborhood))

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


def nearest_neighbor_radii(features: torch.Tensor, neighborhood: int, batch_size: int = 10000) -> torch.Tensor:
    """Return each point's distance [N] to its `neighborhood`-th nearest other point (the radius of its ball)."""
    return torch.cat([
        calc_cdist_part(batch, features, batch_size).kthvalue(neighborhood + 1).values  # (b,)
        for batch in features.split(batch_size)
    ])


def precision_recall(
    generated: torch.Tensor,
    reference: torch.Tensor,
    reference_radii: torch.Tensor,
    neighborhood: int,
    batch_size: int = 10000,
) -> dict:
    """Return improved precision and recall (Kynkäänniemi et al., 2019) as torch-fidelity 0.4 computes them.

    The reference radii are passed in, so a job computes them once for all its sets. Otherwise this is
    `torch_fidelity.metric_prc.calculate_precision_recall_part`, and a test checks that both agree.
    Precision: the fraction of generated points inside some reference point's ball. Recall: the
    fraction of reference points inside some generated point's ball.
    """
    if len(generated) <= neighborhood:
        logger.warning("precision/recall need more than %d images per set, got %d", neighborhood, len(generated))
        return {"precision": None, "recall": None, "f_score": None}
    generated_radii = nearest_neighbor_radii(generated, neighborhood, batch_size)  # (N,)
    recall = torch.cat([
        (calc_cdist_part(batch, generated, batch_size) <= generated_radii).any(dim=1).float()
        for batch in reference.split(batch_size)
    ]).mean().item()
    precision = torch.cat([
        (calc_cdist_part(batch, reference, batch_size) <= reference_radii).any(dim=1).float()
        for batch in generated.split(batch_size)
    ]).mean().item()
    f_score = 2 * precision * recall / max(1e-5, precision + recall)
    return {"precision": precision, "recall": recall, "f_score": f_score}


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
