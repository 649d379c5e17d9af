"""A small CNN classifier for 32x32 RGB images in [-1, 1], and the `train-classifier` command.

Trained on Fashion-MNIST (padded to 32x32, 3 channels) it is an offline feature extractor: its
penultimate layer serves FID, KID and precision/recall, its logits the Inception Score. It also
measures how often a sample is recognised as the class it was generated for.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# The shipped classifier: a folder at the repository root, beside tokenizers/ and pipelines/.
# NOTE: found only from a source checkout or editable install; a built wheel does not include it.
DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parents[2] / "classifiers" / "fashion-mnist"


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class ImageClassifier(ModelMixin, ConfigMixin):
    """Four conv blocks (the first with stride 2), two max-pools, a hidden layer and a linear head.

    The hidden layer's activations (after ReLU) are the `penultimate` features used for FID.

    Args:
        num_classes (`int`): number of classes.
        image_size (`int`, defaults to 32): the side of the square input; other sizes are resized to it
            by `preprocess`.
        in_channels (`int`, defaults to 3): input channels.
        channels (`tuple[int, int, int]`, defaults to (16, 32, 64)): widths of the conv blocks at 1/2, 1/2
            and 1/4 of the input size (the last width is used by two blocks).
        feature_dim (`int`, defaults to 128): width of the penultimate layer.
        dropout (`float`, defaults to 0.2): dropout between the penultimate layer and the head, in training.
        id2label (`list[str]`, *optional*): class names by class id.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        in_channels: int = 3,
        channels: tuple[int, int, int] = (16, 32, 64),
        feature_dim: int = 128,
        dropout: float = 0.2,
        id2label: list[str] | None = None,
    ):
        super().__init__()
        if image_size % 8 != 0:
            raise ValueError(f"image_size={image_size} must be a multiple of 8 (one stride-2 conv, two max-pools)")
        if id2label is not None and len(id2label) != num_classes:
            raise ValueError(f"id2label names {len(id2label)} classes but num_classes={num_classes}")
        width_1, width_2, width_3 = channels
        # Stride 2 first: with a full-resolution first block a CPU training step (batch 256) took about 2.7x longer.
        self.backbone = nn.Sequential(
            *_conv_block(in_channels, width_1, stride=2),
            *_conv_block(width_1, width_2),
            nn.MaxPool2d(2),
            *_conv_block(width_2, width_3),
            *_conv_block(width_3, width_3),
            nn.MaxPool2d(2),
        )
        grid = image_size // 8
        self.hidden = nn.Linear(width_3 * grid * grid, feature_dim)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the penultimate features [B, feature_dim] and the logits [B, num_classes] of images [B, C, S, S]."""
        x = self.backbone(images)  # (B, C3, S/8, S/8)
        penultimate = F.relu(self.hidden(x.flatten(1)))  # (B, D)
        logits = self.head(self.head_dropout(penultimate))  # (B, K)
        return penultimate, logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the logits [B, num_classes] of images [B, C, S, S] in [-1, 1]."""
        return self.forward_features(images)[1]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn uint8 images [B, C, H, W] in 0..255 into floats in [-1, 1] at the model's image size.

        Other sizes are resized with bilinear interpolation and antialiasing.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got dtype {images.dtype}")
        size = self.config.image_size
        x = images.float() / 127.5 - 1.0  # (B, C, H, W)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x  # (B, C, S, S)


# ---------------------------------------------------------------------- training


def _fashion_mnist(data_dir: str | os.PathLike | None, split: str):
    from xdlm_vision.data.images import FASHION_MNIST_DIR, FashionMNISTSource

    return FashionMNISTSource(data_dir or FASHION_MNIST_DIR, split)


@torch.no_grad()
def evaluate_accuracy(
    classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Return the fraction of images [N, C, S, S] in [-1, 1] whose predicted class equals the label."""
    was_training = classifier.training
    classifier.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = classifier(images[start : start + batch_size])  # (b, K)
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    classifier.train(was_training)
    return correct / len(images)


def train_classifier(
    data_dir: str | os.PathLike | None = None,
    epochs: int = 4,
    batch_size: int = 256,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_shift: int = 0,
) -> tuple[ImageClassifier, dict]:
    """Train an `ImageClassifier` on the Fashion-MNIST training split and measure it on the test split.

    Training uses AdamW with a one-cycle learning-rate schedule and, with `max_shift > 0`, random shifts of
    the images by up to that many pixels.

    Returns:
        The trained classifier (in eval mode) and a dict of the run's facts: data, epochs, batch size,
        learning rate, seed, number of training images, training seconds and test accuracy.
    """
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must be >= 1 and "
                         f"learning_rate={learning_rate} must be > 0")
    train_source = _fashion_mnist(data_dir, "train")
    test_source = _fashion_mnist(data_dir, "test")
    num_train = len(train_source) if max_train_samples is None else min(max_train_samples, len(train_source))
    train_images, train_labels = train_source.load_batch(np.arange(num_train))  # (N, 3, 32, 32), (N,)
    test_images, test_labels = test_source.load_batch(np.arange(len(test_source)))

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = ImageClassifier(num_classes=len(train_source.class_names), id2label=train_source.class_names)
    # channels_last made a one-thread CPU training step (batch 256) about 2x faster in a benchmark.
    classifier = classifier.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(num_train / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )

    start_time = time.perf_counter()
    classifier.train()
    for epoch in range(epochs):
        order = torch.randperm(num_train, generator=generator)
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        running_loss = 0.0
        for step in progress:
            indices = order[step * batch_size : (step + 1) * batch_size]
            images = train_images[indices].contiguous(memory_format=torch.channels_last)  # (b, 3, 32, 32)
            if max_shift > 0:
                images = _random_shift(images, max_shift, generator)
            loss = F.cross_entropy(classifier(images), train_labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += loss.item()
            if step % 20 == 19:
                progress.set_postfix(loss=f"{running_loss / 20:.3f}")
                running_loss = 0.0
        accuracy = evaluate_accuracy(classifier, test_images, test_labels)
        logger.info("epoch %d/%d: test accuracy %.4f", epoch + 1, epochs, accuracy)
    train_seconds = time.perf_counter() - start_time

    classifier = classifier.to(memory_format=torch.contiguous_format).eval()  # safetensors stores contiguous tensors
    facts = {
        "data": f"Fashion-MNIST train split ({num_train} images), padded to 32x32, 3 channels, [-1, 1]",
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "seed": seed,
        "max_shift": max_shift,
        "num_train_samples": num_train,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "test_accuracy": evaluate_accuracy(classifier, test_images, test_labels),
        "num_test_samples": len(test_images),
    }
    return classifier, facts


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift a batch [B, C, S, S] by one random offset of up to max_shift pixels in x and y, filling with -1."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)  # (B, C, S + 2m, S + 2m)
    offsets = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    # One offset per batch keeps this a single slice; each epoch puts an image in another batch and offset.
    return padded[:, :, offsets[0] : offsets[0] + size, offsets[1] : offsets[1] + size]


def save_classifier(classifier: ImageClassifier, folder: str | os.PathLike, facts: dict, command: str) -> Path:
    """Save the classifier, a `training.json` of facts and a README to `folder`, replacing it atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    temporary.chmod(0o755)  # mkdtemp creates the folder private to the user
    try:
        classifier.save_pretrained(temporary, safe_serialization=True)
        (temporary / "training.json").write_text(json.dumps({"command": command, **facts}, indent=2) + "\n")
        (temporary / "README.md").write_text(_model_card(classifier, facts, command))
        previous = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(folder, previous)
        os.replace(temporary, folder)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _model_card(classifier: ImageClassifier, facts: dict, command: str) -> str:
    config = classifier.config
    num_parameters = sum(parameter.numel() for parameter in classifier.parameters())
    shift = facts["max_shift"]
    augmentation = f"random shifts of up to {shift} pixels" if shift > 0 else "no augmentation"
    return f"""# Fashion-MNIST classifier (feature extractor for FID, KID, precision/recall and IS)

A small CNN (`xdlm_vision.metrics.classifier.ImageClassifier`, {num_parameters:,} parameters) for
{config.image_size}x{config.image_size} RGB images in [-1, 1]: four 3x3 conv blocks of widths
{list(config.channels) + [config.channels[-1]]} (the first with stride 2), two max-pools, a {config.feature_dim}-wide hidden
layer (the `penultimate` features, after ReLU) and a {config.num_classes}-way linear head (the `logits`).
`xdlm-vision fid --extractor classifier` registers it with torch-fidelity as `xdlm-classifier`.

Scores computed with it are comparable only with other scores computed with these exact weights.
They are not comparable with Inception FIDs. The classifier was trained on the training split, so a
real-data floor drawn from that split is scored by an extractor that has seen those images, and the
classifier accuracy reported there is a training accuracy.

## How it was made

```
{command}
```

- Data: {facts["data"]}; the test split (10k images) was used only for the accuracy below.
- Training: {facts["epochs"]} epochs, batch {facts["batch_size"]}, AdamW (learning rate {facts["learning_rate"]},
  one-cycle schedule, weight decay {facts["weight_decay"]}), {augmentation}, seed {facts["seed"]}.
- Training time: {facts["train_seconds"]:.0f} s on a 2-core CPU shared with other jobs (torch threads: {facts["torch_threads"]}).
- Test accuracy: **{facts["test_accuracy"]:.4f}** on the {facts["num_test_samples"]} Fashion-MNIST test images.

Classes: {", ".join(config.id2label or [])}.
"""


# ---------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="folder with the four Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", default="runs/classifier",
                        help="output folder, replaced atomically (default: runs/classifier; pass "
                             "classifiers/fashion-mnist to replace the shipped classifier)")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training split (default: 4)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per optimizer step (default: 256)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and shifts (default: 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is faster on a CPU shared with other jobs")
    parser.add_argument("--max-shift", type=int, default=0,
                        help="augment by shifting each batch by up to this many pixels (default: 0, none)")
    parser.add_argument("--max-train-samples", type=int, default=None,
                        help="train on only the first N training images (for quick checks)")


def run(args: argparse.Namespace) -> int:
    options = ["--epochs", args.epochs, "--batch-size", args.batch_size, "--learning-rate", args.learning_rate,
               "--seed", args.seed, "--max-shift", args.max_shift]
    options += ["--out", args.out]
    if args.data_dir is not None:
        options += ["--data-dir", args.data_dir]
    if args.max_train_samples is not None:
        options += ["--max-train-samples", args.max_train_samples]
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
        options += ["--threads", args.threads]
    command = "xdlm-vision train-classifier " + shlex.join(str(option) for option in options)
    classifier, facts = train_classifier(
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        max_shift=args.max_shift,
    )
    folder = save_classifier(classifier, args.out, facts, command)
    print(f"saved {folder}: test accuracy {facts['test_accuracy']:.4f} after {facts['train_seconds']:.0f} s of training")
    return 0
