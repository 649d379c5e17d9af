"""Tests of the `encode` job, the token shard format and the image sources it reads."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from xdlm_vision.cli import main
from xdlm_vision.data import encode as encode_module
from xdlm_vision.data.encode import encode_dataset, encode_fashion_mnist_subset
from xdlm_vision.data.images import (
    FASHION_MNIST_DIR,
    FashionMNISTSource,
    ImageFolderSource,
    image_bytes_to_tensor,
    read_idx,
)
from xdlm_vision.data.shards import read_meta, read_token_shard, token_dtype
from xdlm_vision.tokenizer import VQTokenizer

REPO = Path(__file__).resolve().parents[1]
IMAGENET_FIXTURE = REPO / "tests" / "fixtures" / "imagenet"
WNIDS = ["n02123045", "n03773504", "n07920052"]


def read_shards_with_webdataset(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Read every sample with plain webdataset, as a training reader would."""
    urls = [str(path) for path in sorted(folder.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode()
    return {sample["__key__"]: (sample["tokens.npy"], int(sample["cls"])) for sample in dataset}


@pytest.fixture(scope="module")
def tokenizer_256(tmp_path_factory) -> Path:
    """A small random tokenizer for 256 px photographs (16x downsampling, 16 x 16 tokens)."""
    torch.manual_seed(0)
    tokenizer = VQTokenizer(num_embeddings=300, embedding_dim=4, image_size=256, block_out_channels=(8, 8, 8, 8, 8),
                            latent_channels=8, norm_num_groups=4, mid_block_add_attention=False)
    folder = tmp_path_factory.mktemp("tokenizer256")
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# Image sources


def test_fashion_mnist_source_pads_to_32_rgb():
    source = FashionMNISTSource(split="test")
    raw = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")
    assert len(source) == 10000
    image, label = source.load(7)
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[2])
    assert torch.all(image[:, :2, :] == -1.0)
    assert torch.all(image[:, :, -2:] == -1.0)
    expected = torch.from_numpy(raw[7].astype(np.float32)) / 127.5 - 1.0
    torch.testing.assert_close(image[1, 2:30, 2:30], expected)
    assert 0 <= label < 10


def test_read_idx_rejects_truncated_file(tmp_path):
    data = gzip.decompress((Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "labels-idx1-ubyte").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "labels-idx1-ubyte")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")


def test_fashion_mnist_source_missing_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        FashionMNISTSource(tmp_path, split="train")
    with pytest.raises(ValueError, match="split"):
        FashionMNISTSource(split="validation")


def test_imagefolder_fixture_lists_classes_in_order():
    source = ImageFolderSource(IMAGENET_FIXTURE, "train", image_size=256)
    assert source.class_names == WNIDS
    assert len(source) == 6
    image, label = source.load(0)
    assert image.shape == (3, 256, 256)
    assert float(image.min()) >= -1.0
    assert float(image.max()) <= 1.0
    assert float(image.std()) > 0.1  # a photograph, not a flat image
    assert label == 0


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST through the shipped tokenizer


def test_encode_shards_read_back_with_webdataset(tmp_path):
    folder = encode_fashion_mnist_subset(tmp_path / "shards", num_images=96)
    meta = read_meta(folder)
    assert meta["format"] == "xdlm-token-shards"
    assert meta["version"] == 1
    assert meta["split"] == "test"
    assert meta["grid_size"] == 8
    assert meta["num_embeddings"] == 512
    assert meta["num_classes"] == 10
    assert meta["class_names"][7] == "Sneaker"
    assert meta["num_samples"] == 96
    assert meta["horizontal_flip"] is False
    assert meta["shards"] == [{"name": "test-000000.tar", "num_samples": 48},
                              {"name": "test-000001.tar", "num_samples": 48}]
    assert sorted(path.name for path in folder.glob("*.tar")) == ["test-000000.tar", "test-000001.tar"]

    source = FashionMNISTSource(split="test")
    images, labels = source.load_batch(range(96))
    expected = VQTokenizer.from_pretrained(encode_module.DEFAULT_TOKENIZER).encode(images).view(96, 8, 8)
    samples = read_shards_with_webdataset(folder)
    assert len(samples) == 96
    for index in range(96):
        tokens, label = samples[f"{index:08d}"]
        assert tokens.dtype == np.uint16  # 512 codes do not fit in uint8
        assert np.array_equal(tokens, expected[index].numpy())
        assert label == int(labels[index])
    assert meta["class_counts"] == np.bincount(labels.numpy(), minlength=10).tolist()


def test_encode_resume_after_interrupt_gives_identical_shards(tmp_path, monkeypatch):
    arguments = dict(tokenizer=encode_module.DEFAULT_TOKENIZER, split="test", limit=90, shard_size=30,
                     batch_size=16, horizontal_flip=True, threads=1)
    encode_dataset(output_dir=tmp_path / "straight", **arguments)

    # Interrupt while the second shard is written; the first one is complete, the second only a temp file.
    write = encode_module.write_token_shard
    calls = []

    def write_then_interrupt(path, samples):
        calls.append(Path(path).name)
        if len(calls) == 2:
            list(samples)
            raise KeyboardInterrupt
        return write(path, samples)

    monkeypatch.setattr(encode_module, "write_token_shard", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(output_dir=tmp_path / "resumed", **arguments)
    assert sorted(path.name for path in (tmp_path / "resumed").glob("*.tar")) == ["test-000000.tar"]
    assert not (tmp_path / "resumed" / "meta.json").exists()

    # Resume with two worker processes: shard 0 is verified and kept, shards 1 and 2 are encoded.
    monkeypatch.setattr(encode_module, "write_token_shard", write)
    before = (tmp_path / "resumed" / "test-000000.tar").stat().st_mtime_ns
    meta = encode_dataset(output_dir=tmp_path / "resumed", workers=2, **arguments)
    assert (tmp_path / "resumed" / "test-000000.tar").stat().st_mtime_ns == before
    assert meta["num_samples"] == 180
    assert meta["horizontal_flip"] is True

    for name in ("test-000000.tar", "test-000001.tar", "test-000002.tar"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert (tmp_path / "straight" / "meta.json").read_text() == (tmp_path / "resumed" / "meta.json").read_text()


def test_encode_reencodes_damaged_shard(tmp_path):
    arguments = dict(tokenizer=encode_module.DEFAULT_TOKENIZER, output_dir=tmp_path, split="test", limit=40,
                     shard_size=20, threads=1)
    encode_dataset(**arguments)
    shard = tmp_path / "test-000001.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match="damaged|sample"):
        read_token_shard(shard, 8, 512)

    meta = encode_dataset(**arguments)
    assert shard.read_bytes() == good
    assert meta["num_samples"] == 40


def test_encode_rejects_other_settings_in_same_folder(tmp_path):
    arguments = dict(tokenizer=encode_module.DEFAULT_TOKENIZER, output_dir=tmp_path, split="test", limit=20,
                     threads=1)
    encode_dataset(shard_size=10, **arguments)
    with pytest.raises(ValueError, match="shard_size: 10 -> 20"):
        encode_dataset(shard_size=20, **arguments)


def test_token_dtype_is_smallest_unsigned():
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(16384) == np.uint16
    assert token_dtype(65537) == np.uint32


# --------------------------------------------------------------------------------------------------
# Photographs in the ImageNet layout


def test_encode_imagenet_fixture_end_to_end(tmp_path, tokenizer_256):
    output = tmp_path / "tokens"
    code = main(["encode", "--tokenizer", str(tokenizer_256), "--source", "imagefolder", "--data-dir",
                 str(IMAGENET_FIXTURE), "--split", "train", "--output-dir", str(output), "--horizontal-flip",
                 "--threads", "1"])
    assert code == 0
    meta = read_meta(output)
    assert meta["class_names"] == WNIDS
    assert meta["grid_size"] == 16
    assert meta["num_embeddings"] == 300
    assert meta["num_samples"] == 12
    assert meta["class_counts"] == [4, 4, 4]
    assert meta["tokenizer"] == str(tokenizer_256)

    tokenizer = VQTokenizer.from_pretrained(tokenizer_256)
    source = ImageFolderSource(IMAGENET_FIXTURE, "train", 256)
    images = torch.stack([source.load(index)[0] for index in range(6)])
    expected = tokenizer.encode(images).view(6, 16, 16).numpy()
    expected_flipped = tokenizer.encode(images.flip(-1)).view(6, 16, 16).numpy()
    samples = read_shards_with_webdataset(output)
    for index in range(6):
        tokens, label = samples[f"{index:08d}"]
        assert tokens.dtype == np.uint16
        assert np.array_equal(tokens, expected[index])
        assert np.array_equal(samples[f"{index:08d}_flip"][0], expected_flipped[index])
        assert label == source.items[index][1]


def test_encode_counts_corrupt_image_unless_strict(tmp_path, tokenizer_256, capsys):
    data_dir = tmp_path / "imagenet"
    shutil.copytree(IMAGENET_FIXTURE, data_dir)
    photo = data_dir / "train" / "n07920052" / "n07920052_00002.JPEG"
    photo.write_bytes(photo.read_bytes()[:300])

    # One image per shard: the corrupt photo (image 4) leaves an empty shard, which meta.json does not list.
    meta = encode_dataset(tokenizer=tokenizer_256, source="imagefolder", data_dir=data_dir, split="train",
                          output_dir=tmp_path / "lenient", shard_size=1, threads=1)
    assert meta["num_corrupt"] == 1
    assert meta["num_samples"] == 5
    assert meta["class_counts"] == [2, 2, 1]
    assert [shard["name"] for shard in meta["shards"]] == [f"train-00000{index}.tar" for index in (0, 1, 2, 3, 5)]
    assert (tmp_path / "lenient" / "train-000004.tar").is_file()

    code = main(["encode", "--tokenizer", str(tokenizer_256), "--source", "imagefolder", "--data-dir",
                 str(data_dir), "--output-dir", str(tmp_path / "strict"), "--strict", "--threads", "1"])
    assert code == 2
    error = capsys.readouterr().err
    assert "n07920052_00002.JPEG" in error
    assert "--strict" in error


def test_encode_reads_webdataset_image_shards(tmp_path, tokenizer_256):
    source = ImageFolderSource(IMAGENET_FIXTURE, "train", 256)
    shards = tmp_path / "images"
    shards.mkdir()
    with tarfile.open(shards / "train-000000.tar", "w") as archive:
        for index, (path, label) in enumerate(source.items):
            for name, data in ((f"sample{index}.jpg", path.read_bytes()), (f"sample{index}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    (shards / "classes.txt").write_text("\n".join(WNIDS) + "\n")

    meta = encode_dataset(tokenizer=tokenizer_256, source="webdataset", data_dir=shards, split="train",
                          output_dir=tmp_path / "tokens", threads=1)
    assert meta["class_names"] == WNIDS
    assert meta["class_counts"] == [2, 2, 2]
    samples = read_shards_with_webdataset(tmp_path / "tokens")
    tokenizer = VQTokenizer.from_pretrained(tokenizer_256)
    first = image_bytes_to_tensor(source.items[0][0].read_bytes(), 256, "first")
    assert np.array_equal(samples["00000000"][0], tokenizer.encode(first[None]).view(16, 16).numpy())


def test_encode_cli_reports_bad_source(tmp_path, tokenizer_256, capsys):
    code = main(["encode", "--tokenizer", str(tokenizer_256), "--source", "imagefolder", "--data-dir",
                 str(tmp_path / "absent"), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out" / "meta.json").exists()
