"""The `sample` and `demo` commands and the shipped Fashion-MNIST pipeline."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from xdlm_vision.cli import main
from xdlm_vision.sampling import DEFAULT_PIPELINE, load_pipeline, make_labelled_grid

REPOSITORY = DEFAULT_PIPELINE.parent.parent
SHIPPED_CLASSIFIER = REPOSITORY / "classifiers" / "fashion-mnist"


@pytest.fixture(scope="module")
def shipped_pipeline():
    torch.set_num_threads(1)
    return load_pipeline(DEFAULT_PIPELINE)


def test_grid_layout_has_one_row_per_label():
    tile = np.full((4, 6, 3), 200, dtype=np.uint8)
    grid = make_labelled_grid([[tile, tile, tile], [tile, tile, tile]], ["a", "b"], scale=2)
    assert grid.height == 2 * (4 * 2 + 2)
    assert grid.width > 3 * (6 * 2 + 2)


def test_grid_rejects_mismatched_labels():
    tile = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 rows of images but 1 labels"):
        make_labelled_grid([[tile], [tile]], ["only one"])


def test_shipped_pipeline_is_xdlm_with_class_names(shipped_pipeline):
    assert shipped_pipeline.scheduler.config.mixing_ratio == pytest.approx(0.1)
    assert shipped_pipeline.id2label[7] == "Sneaker"
    assert shipped_pipeline.transformer.config.num_embeddings == shipped_pipeline.vqvae.config.num_embeddings


def test_sample_command_writes_labelled_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--class", "Sneaker", "--class", "8", "--num-images-per-class", "3", "--num-steps", "4",
                 "--scale", "1", "--out", str(out)])
    assert code == 0
    image = Image.open(out)
    assert image.height == 2 * (32 + 2)
    assert "wrote" in capsys.readouterr().out


def test_sample_command_rejects_unknown_class(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--class", "Sneakers", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert "unknown class name 'Sneakers'" in error
    assert "Sneaker" in error
    assert len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_sample_command_rejects_missing_pipeline(tmp_path, capsys):
    code = main(["sample", "--pipeline", str(tmp_path / "nowhere"), "--out", str(tmp_path / "grid.png")])
    assert code == 2
    assert "no pipeline found" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_sample_is_reproducible_per_seed(tmp_path):
    first, second, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((first, "3"), (second, "3"), (other, "4")):
        assert main(["sample", "--class", "Bag", "--num-images-per-class", "2", "--num-steps", "4", "--seed", seed,
                     "--out", str(path)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(other)))


def test_demo_writes_grid_and_quick_fid(tmp_path, capsys):
    code = main(["demo", "--num-images-per-class", "2", "--fid-samples", "100", "--num-steps", "4",
                 "--out-dir", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "grid.png").is_file()
    payload = json.loads((tmp_path / "fid" / "fid.json").read_text())
    metrics = payload["results"][0]["metrics"]
    assert math.isfinite(metrics["fid"])
    assert payload["protocol"]["extractor"]["name"]
    assert "quick FID" in capsys.readouterr().out


def test_shipped_samples_recognised_by_classifier(shipped_pipeline):
    from xdlm_vision.metrics.extractor import load_classifier

    classifier = load_classifier(SHIPPED_CLASSIFIER).eval()
    per_class = 20
    labels = [label for label in range(10) for _ in range(per_class)]
    generators = [torch.Generator().manual_seed(10_000 + i) for i in range(len(labels))]
    images = shipped_pipeline(labels, num_steps=8, generator=generators, output_type="pt").images  # (B, 3, 32, 32) in [0, 1]
    with torch.no_grad():
        predicted = classifier(images * 2 - 1).argmax(-1)
    accuracy = float((predicted == torch.tensor(labels)).float().mean())
    # Chance is 10%; the measured accuracy of the shipped pipeline is in its model card.
    assert accuracy > 0.5, f"only {accuracy:.0%} of 8-step samples were classified as their class"
