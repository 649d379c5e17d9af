"""FID jobs: Fréchet distance, sampling protocol, feature extractors, Inception weights errors, resume."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import Dataset

from xdlm_vision.cli import main
from xdlm_vision.data.images import FASHION_MNIST_CLASSES, FashionMNISTSource
from xdlm_vision.metrics.classifier import DEFAULT_CLASSIFIER_DIR, evaluate_accuracy
from xdlm_vision.metrics.extractor import (
    CLASSIFIER_EXTRACTOR,
    FeatureExtractorWeightsError,
    build_extractor,
    extract_features,
    inception_weights_location,
    load_classifier,
    resolve_inception_weights,
)
from xdlm_vision.metrics.fid import run_fid_job
from xdlm_vision.metrics.generation import SamplePlan, image_seed
from xdlm_vision.metrics.reference import ReferenceFeatures
from xdlm_vision.metrics.scores import feature_statistics, frechet_distance

NUM_CLASSES = len(FASHION_MNIST_CLASSES)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Run this module with one torch thread: on a CPU shared with other jobs, two threads ran ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def real_images():
    """The first 600 Fashion-MNIST test images as uint8 [600, 3, 32, 32] and their labels."""
    source = FashionMNISTSource(split="test")
    images, labels = source.load_batch(np.arange(600))
    return ((images + 1) * 127.5).round().to(torch.uint8), labels


@pytest.fixture(scope="module")
def classifier_extractor():
    return build_extractor("classifier")


def frechet_distance_scipy(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """Independent reference: the FID formula with scipy's matrix square root."""
    mu_1, mu_2 = features_1.mean(0), features_2.mean(0)
    sigma_1, sigma_2 = np.cov(features_1, rowvar=False), np.cov(features_2, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_1 @ sigma_2).real
    return float(((mu_1 - mu_2) ** 2).sum() + np.trace(sigma_1 + sigma_2 - 2 * covmean))


def test_fid_self_zero_shifted_larger(real_images, classifier_extractor):
    extractor, info = classifier_extractor
    images, _ = real_images
    brightened = (images.int() + 60).clamp(0, 255).to(torch.uint8)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 40
    noised = (images.float() + noise).clamp(0, 255).round().to(torch.uint8)

    layer = info.feature_layer_fid
    clean = extract_features(extractor, [images])[layer]
    statistics = feature_statistics(clean)
    fid_self = frechet_distance(statistics, statistics)
    fid_bright = frechet_distance(feature_statistics(extract_features(extractor, [brightened])[layer]), statistics)
    fid_noised = frechet_distance(feature_statistics(extract_features(extractor, [noised])[layer]), statistics)
    fid_halves = frechet_distance(feature_statistics(clean[:300]), feature_statistics(clean[300:]))

    assert abs(fid_self) < 1e-6 * max(1.0, float(np.trace(statistics["sigma"])))
    assert fid_bright > 3 * fid_halves
    assert fid_noised > 3 * fid_halves
    assert fid_halves > 0


def test_frechet_distance_matches_scipy():
    generator = np.random.default_rng(0)
    features_1 = generator.normal(size=(400, 16))
    features_2 = generator.normal(size=(300, 16)) @ generator.normal(size=(16, 16)) * 0.5 + 0.3
    ours = frechet_distance(feature_statistics(torch.from_numpy(features_1)),
                            feature_statistics(torch.from_numpy(features_2)))
    assert ours == pytest.approx(frechet_distance_scipy(features_1, features_2), rel=1e-6)


def test_precision_recall_matches_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    from xdlm_vision.metrics.scores import nearest_neighbor_radii, precision_recall

    generator = torch.Generator().manual_seed(0)
    generated = torch.randn(150, 8, generator=generator) * 1.3 + 0.4
    reference = torch.randn(200, 8, generator=generator)
    expected = prc_features_to_metric(generated, reference, prc_neighborhood=3, save_cpu_ram=True, verbose=False)
    ours = precision_recall(generated, reference, nearest_neighbor_radii(reference, 3, batch_size=64), 3, batch_size=64)
    assert ours["precision"] == pytest.approx(expected["precision"])
    assert ours["recall"] == pytest.approx(expected["recall"])
    assert ours["f_score"] == pytest.approx(expected["f_score"])
    assert 0 < ours["precision"] < 1


class _TensorImages(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def test_classifier_registered_with_torch_fidelity(real_images, classifier_extractor):
    import torch_fidelity

    extractor, info = classifier_extractor
    images, _ = real_images
    first, second = images[:300], images[300:]
    metrics = torch_fidelity.calculate_metrics(
        input1=_TensorImages(first), input2=_TensorImages(second), fid=True, feature_extractor=CLASSIFIER_EXTRACTOR,
        feature_extractor_weights_path=str(DEFAULT_CLASSIFIER_DIR), cuda=False, cache=False, save_cpu_ram=True,
        verbose=False, batch_size=100,
    )
    layer = info.feature_layer_fid
    ours = frechet_distance(feature_statistics(extract_features(extractor, [first])[layer]),
                            feature_statistics(extract_features(extractor, [second])[layer]))
    assert metrics["frechet_inception_distance"] == pytest.approx(ours, rel=1e-4)


def test_shipped_classifier_accuracy_high(real_images):
    classifier = load_classifier(DEFAULT_CLASSIFIER_DIR)
    images, labels = real_images
    accuracy = evaluate_accuracy(classifier, images.float() / 127.5 - 1, labels)
    assert accuracy > 0.85
    assert list(classifier.config.id2label) == FASHION_MNIST_CLASSES


def test_sample_plan_uniform_counts_distinct_seeds():
    plan = SamplePlan(num_samples=60, num_classes=NUM_CLASSES, seed=3, chunk_size=7)
    labels, indices, seeds = plan.entries(0, plan.num_samples)
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [6] * NUM_CLASSES
    assert len(set(seeds.tolist())) == 60
    assert sorted(zip(labels.tolist(), indices.tolist())) == [(c, i) for c in range(NUM_CLASSES) for i in range(6)]
    chunks = [plan.entries(*plan.chunk_range(chunk))[2] for chunk in range(plan.num_chunks)]
    assert np.concatenate(chunks).tolist() == seeds.tolist()


def test_sample_plan_seeds_extend_and_depend_on_base():
    small = SamplePlan(num_samples=20, num_classes=NUM_CLASSES, seed=0, chunk_size=5).entries(0, 20)[2]
    large = SamplePlan(num_samples=40, num_classes=NUM_CLASSES, seed=0, chunk_size=5).entries(0, 40)[2]
    other = SamplePlan(num_samples=20, num_classes=NUM_CLASSES, seed=1, chunk_size=5).entries(0, 20)[2]
    assert large[:20].tolist() == small.tolist()
    assert not set(other.tolist()) & set(small.tolist())
    assert image_seed(0, 2, 1) == image_seed(0, 2, 1) < 2**63


def test_sample_plan_rejects_uneven_count():
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        SamplePlan(num_samples=25, num_classes=NUM_CLASSES, seed=0, chunk_size=5)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_inception_damaged_weights_error(tmp_path, no_network):
    damaged = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    damaged.write_bytes(b"this is not a checkpoint" * 100)
    folder, name = inception_weights_location()
    with pytest.raises(FeatureExtractorWeightsError) as raised:
        resolve_inception_weights(damaged)
    message = str(raised.value)
    assert "damaged" in message
    assert name in message
    assert str(folder) in message
    assert "--inception-weights" in message


def test_inception_foreign_state_dict_error(tmp_path, no_network):
    foreign = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 4)}, foreign)
    with pytest.raises(FeatureExtractorWeightsError, match=r"not torch-fidelity's Inception-v3"):
        resolve_inception_weights(foreign)


def test_inception_missing_cache_error(tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FeatureExtractorWeightsError) as raised:
        resolve_inception_weights(None)
    message = str(raised.value)
    assert "not found" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message


def test_fid_command_damaged_weights_one_line(tmp_path, no_network, capsys):
    damaged = tmp_path / "inception.pth"
    damaged.write_bytes(b"\x00garbage")
    code = main(["fid", "--real-floor", "--inception-weights", str(damaged), "--out-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1
    assert "damaged" in error
    assert "weights-inception-2015-12-05-6726825d.pth" in error
    assert not (tmp_path / "out" / "fid.json").exists()


# ---------------------------------------------------------------------- end-to-end jobs on a tiny random pipeline


def make_tiny_pipeline(folder: Path, mixing_ratio: float, seed: int = 0) -> Path:
    """Save a random 32x32 pipeline (tiny VQ tokenizer and transformer) for the 10 Fashion-MNIST classes."""
    from xdlm_vision import VQTokenizer, XDLMPipeline, XDLMScheduler, XDLMTransformer

    torch.manual_seed(seed)
    vqvae = VQTokenizer(num_embeddings=16, embedding_dim=4, image_size=32, block_out_channels=(8, 8, 8),
                        latent_channels=8, norm_num_groups=4, mid_block_add_attention=False)
    transformer = XDLMTransformer(num_embeddings=16, grid_size=vqvae.config.grid_size, num_classes=NUM_CLASSES,
                                  hidden_size=32, depth=1, num_heads=2)
    with torch.no_grad():  # random output layers, so that samples depend on the class
        for name, parameter in transformer.named_parameters():
            if "adaln_modulation" in name or "final_layer.linear" in name:
                parameter.copy_(torch.randn(parameter.shape) * 0.3)
    pipe = XDLMPipeline(vqvae=vqvae, transformer=transformer,
                        scheduler=XDLMScheduler(num_embeddings=16, mixing_ratio=mixing_ratio),
                        id2label=FASHION_MNIST_CLASSES)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return [make_tiny_pipeline(root / "xdlm", 0.1, seed=0), make_tiny_pipeline(root / "mdlm", 0.0, seed=1)]


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory, real_images, classifier_extractor):
    """Classifier features of 600 real test images, saved as a reference .npz (keeps jobs fast)."""
    extractor, info = classifier_extractor
    images, labels = real_images
    features = extract_features(extractor, [images])[info.feature_layer_fid]
    meta = {"format": "xdlm-reference-features", "version": 1, "spec": "fashion-mnist:test[:600]",
            "num_images": 600, "class_names": FASHION_MNIST_CLASSES, "resize": "28x28 zero-padded to 32x32",
            "extractor": info.to_dict()}
    return ReferenceFeatures(meta, features, labels).save(tmp_path_factory.mktemp("reference") / "reference.npz")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (magic 0x08 = unsigned byte, then the dimensions)."""
    import gzip
    import struct

    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_fashion_mnist(tmp_path_factory):
    """The first 300 test and 300 training images of Fashion-MNIST as IDX files, for fast reference sets."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    for split, prefix in (("test", "t10k"), ("train", "train")):
        source = FashionMNISTSource(split=split)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", source.pixels[:300])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", source.labels[:300].astype(np.uint8))
    return folder


def test_fid_command_sweep_writes_protocol(tmp_path, tiny_pipelines, small_fashion_mnist, no_network):
    out_dir = tmp_path / "job"
    code = main([
        "fid", "--pipeline", *map(str, tiny_pipelines), "--num-steps", "1", "2", "--num-samples", "20",
        "--extractor", "classifier", "--reference", "fashion-mnist:test", "--data-dir", str(small_fashion_mnist),
        "--cache-dir", str(tmp_path / "cache"), "--rfid", "--rfid-samples", "20", "--real-floor",
        "--batch-size", "10", "--seed", "5", "--out-dir", str(out_dir),
    ])
    assert code == 0
    payload = json.loads((out_dir / "fid.json").read_text())

    assert [(result["name"], result["protocol"]["num_steps"]) for result in payload["results"]] == [
        ("xdlm", 1), ("xdlm", 2), ("mdlm", 1), ("mdlm", 2)]
    protocol = payload["results"][1]["protocol"]
    assert protocol["num_steps"] == 2
    assert protocol["guidance_scale"] == 1.0
    assert protocol["k"] == 0.1
    assert payload["results"][2]["protocol"]["k"] == 0.0
    assert protocol["num_samples"] == 20
    assert protocol["samples_per_class"] == 2
    assert protocol["seed"] == 5
    assert protocol["reference"] == "fashion-mnist:test"
    assert protocol["extractor"] == CLASSIFIER_EXTRACTOR
    assert protocol["resize"]["samples"] == "32x32 as decoded, no resize"
    assert payload["protocol"]["reference"]["num_images"] == 300

    metrics = payload["results"][0]["metrics"]
    for key in ("fid", "inception_score_mean", "kid_mean", "precision", "recall", "classifier_accuracy"):
        assert isinstance(metrics[key], float), key
    assert sorted(metrics["per_class_fid"]) == sorted(FASHION_MNIST_CLASSES)
    assert payload["rfid"][0]["num_images"] == 20
    assert payload["rfid"][0]["tokenizer"] == "xdlm/vqvae"
    assert len(payload["rfid"]) == 2  # the two pipelines have different tokenizers
    assert payload["real_floor"]["data"].startswith("fashion-mnist:train")
    # Real training images are much closer to the test set than samples of a random pipeline.
    assert payload["real_floor"]["metrics"]["fid"] < metrics["fid"]
    assert payload["real_floor"]["metrics"]["classifier_accuracy"] > 0.6

    table = (out_dir / "fid.md").read_text()
    assert "| pipeline | k | 1 steps | 2 steps |" in table
    assert "| xdlm | 0.1 |" in table
    assert "| mdlm | 0 |" in table
    assert len(list((tmp_path / "cache").glob("reference-*.npz"))) == 1


def test_fid_job_resume_matches_uninterrupted(tmp_path, tiny_pipelines, small_reference, monkeypatch):
    from xdlm_vision.pipeline import XDLMPipeline

    options = dict(pipelines=[str(tiny_pipelines[0])], num_steps=[2], num_samples=40, reference=str(small_reference),
                   extractor="classifier", seed=1, batch_size=10, cache_dir=None)
    complete = run_fid_job(out_dir=tmp_path / "complete", **options)

    calls = []
    original_call = XDLMPipeline.__call__

    def crash_on_third_chunk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(XDLMPipeline, "__call__", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_fid_job(out_dir=tmp_path / "resumed", **options)
    monkeypatch.setattr(XDLMPipeline, "__call__", original_call)
    samples_dir = tmp_path / "resumed" / "samples" / "xdlm" / "steps-2-guidance-1"
    assert sorted(path.name for path in samples_dir.glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000001.npz"]
    assert not list(samples_dir.glob(".*tmp"))

    resumed = run_fid_job(out_dir=tmp_path / "resumed", **options)
    assert resumed["results"][0]["chunks_resumed"] == 2
    assert resumed["results"][0]["metrics"] == complete["results"][0]["metrics"]
    for chunk in range(4):
        name = f"chunk-{chunk:06d}.npz"
        with np.load(samples_dir / name) as resumed_chunk, \
                np.load(tmp_path / "complete" / "samples" / "xdlm" / "steps-2-guidance-1" / name) as complete_chunk:
            assert np.array_equal(resumed_chunk["images"], complete_chunk["images"])


def test_fid_job_rejects_changed_protocol(tmp_path, tiny_pipelines, small_reference):
    options = dict(pipelines=[str(tiny_pipelines[0])], num_steps=[1], num_samples=10, reference=str(small_reference),
                   extractor="classifier", batch_size=10, cache_dir=None, out_dir=tmp_path)
    run_fid_job(seed=0, **options)
    with pytest.raises(ValueError, match="another protocol"):
        run_fid_job(seed=1, **options)


def test_reference_file_wrong_extractor_rejected(tmp_path, small_reference, classifier_extractor):
    from xdlm_vision.metrics.reference import load_reference_file

    _, info = classifier_extractor
    other = type(info)(**{**info.to_dict(), "weights_sha256": "0" * 64})
    with pytest.raises(ValueError, match="computed with extractor"):
        load_reference_file(small_reference, other)
    mu_sigma = tmp_path / "stats.npz"
    np.savez(mu_sigma, mu=np.zeros(4), sigma=np.eye(4))
    reference = load_reference_file(mu_sigma, info)
    assert reference.features is None
    assert reference.class_statistics(0) is None


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state dict with the keys and shapes of torch-fidelity's Inception-v3 and random values (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        model = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), path)
    return path


def test_inception_extractor_offline_from_file(random_inception_weights, real_images, no_network):
    extractor, info = build_extractor("inception", random_inception_weights)
    features = extract_features(extractor, [real_images[0][:2]])
    assert info.name == "inception-v3-compat"
    assert info.weights == str(random_inception_weights)
    assert (info.feature_layer_fid, info.feature_layer_isc) == ("2048", "logits_unbiased")
    assert features["2048"].shape == (2, 2048)
    assert features["logits_unbiased"].shape == (2, 1008)


def test_fid_job_imagefolder_reference(tmp_path, tiny_pipelines, no_network):
    from PIL import Image

    source = FashionMNISTSource(split="test")
    for index in range(30):
        image, label = source.load(index)
        folder = tmp_path / "val" / f"{label:02d}"  # sorted folder names keep the class ids
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")

    payload = run_fid_job(
        pipelines=[str(tiny_pipelines[0])], num_steps=[1], num_samples=10, reference=str(tmp_path / "val"),
        extractor="classifier", out_dir=tmp_path / "job", batch_size=10, cache_dir=None,
    )
    reference = payload["protocol"]["reference"]
    assert reference["spec"] == f"imagefolder:{tmp_path / 'val'}"
    assert reference["num_images"] == 30
    assert "centre-cropped to 32x32" in reference["resize"]
    metrics = payload["results"][0]["metrics"]
    assert np.isfinite(metrics["fid"])
    assert metrics["fid"] > 0
    assert metrics["kid_subset_size"] == 10
