"""The `sample` and `demo` commands: labelled image grids from a saved pipeline."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw, ImageFont

from xdlm_vision.atomic import atomic_write

logger = logging.getLogger(__name__)

# The pipeline trained on real Fashion-MNIST and shipped with the repository.
# NOTE: found only from a source checkout or an editable install; a built wheel does not contain pipelines/.
DEFAULT_PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "fashion-mnist-xdlm"


def make_labelled_grid(images: list[list[np.ndarray]], row_labels: list[str], scale: int = 2) -> Image.Image:
    """Lay out one row of images per label, with the label written left of its row.

    Args:
        images: `images[row][column]` is an `H x W x 3` uint8 array; every row has the same length.
        row_labels: one text per row.
        scale: integer upscaling of every image (nearest neighbour), so small images stay readable.
    """
    if not images or not images[0]:
        raise ValueError("the grid needs at least one row with at least one image")
    if len(images) != len(row_labels):
        raise ValueError(f"got {len(images)} rows of images but {len(row_labels)} labels")
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    height, width = images[0][0].shape[:2]
    tile_h, tile_w = height * scale, width * scale
    columns = max(len(row) for row in images)
    font = ImageFont.load_default()
    label_width = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font)) for label in row_labels)
    gap = 2

    canvas = Image.new("RGB", (label_width + columns * (tile_w + gap), len(images) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row_index, (row, label) in enumerate(zip(images, row_labels)):
        top = row_index * (tile_h + gap)
        draw.text((4, top + tile_h // 2 - 6), label, fill="black", font=font)
        for column_index, array in enumerate(row):
            tile = Image.fromarray(array).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_width + column_index * (tile_w + gap), top))
    return canvas


def save_image_atomic(image: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name in the target folder, then rename it into place."""
    with atomic_write(path, "wb") as file:
        image.save(file, format="PNG")


def resolve_device(name: str) -> torch.device:
    """Parse a device name, rejecting devices this machine does not have with a ValueError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested, but CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} not found: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def load_pipeline(path: Path | str, device: str = "cpu"):
    """Load a saved `XDLMPipeline` folder, with a clear error when the folder is missing."""
    from xdlm_vision.pipeline import XDLMPipeline

    device = resolve_device(str(device))
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no pipeline found at {path} (model_index.json is missing); pass --pipeline with a folder "
            "written by `xdlm-vision train` or XDLMPipeline.save_pretrained"
        )
    # diffusers shows a progress bar for loading three small components; it only clutters the output.
    diffusers_logging.disable_progress_bar()
    try:
        pipeline = XDLMPipeline.from_pretrained(path)
    finally:
        diffusers_logging.enable_progress_bar()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def sample_grid(
    pipeline,
    class_labels: list[int | str] | None,
    images_per_class: int,
    num_steps: int,
    guidance_scale: float,
    seed: int,
    scale: int = 2,
) -> Image.Image:
    """Sample `images_per_class` images for each class (all classes when None) and lay them out in a grid.

    Image `j` of class `c` uses the seed `seed + 1000003 * c + j`, so a class's row does not change
    when other classes are added to the grid.
    """
    if images_per_class < 1:
        raise ValueError(f"images per class must be at least 1, got {images_per_class}")
    label_ids = pipeline.get_label_ids(class_labels) if class_labels else list(range(pipeline.transformer.config.num_classes))
    labels = [label for label in label_ids for _ in range(images_per_class)]
    generators = [
        torch.Generator().manual_seed(seed + 1000003 * label + index)
        for label in label_ids
        for index in range(images_per_class)
    ]
    output = pipeline(
        labels, num_steps=num_steps, guidance_scale=guidance_scale, generator=generators, output_type="np"
    )
    images = (np.clip(output.images, 0.0, 1.0) * 255).round().astype(np.uint8)  # (B, H, W, 3)
    names = pipeline.id2label if getattr(pipeline, "id2label", None) else {}
    rows = [list(images[i * images_per_class : (i + 1) * images_per_class]) for i in range(len(label_ids))]
    row_labels = [str(names.get(label, names.get(str(label), label))) for label in label_ids]
    return make_labelled_grid(rows, row_labels, scale=scale)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", type=Path, default=DEFAULT_PIPELINE, help="saved pipeline folder (default: the shipped Fashion-MNIST XDLM pipeline)")
    parser.add_argument("--num-steps", type=_positive_int, default=8, help="sampling steps (default: 8)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 means none (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; image j of class c uses seed + 1000003 * c + j (default: 0)")
    parser.add_argument("--scale", type=_positive_int, default=2, help="integer upscaling of each image in the grid (default: 2)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_sampling_arguments(parser)
    parser.add_argument("--class", dest="classes", action="append", default=None, metavar="LABEL",
                        help="class name or id to sample; repeat for several (default: every class)")
    parser.add_argument("--num-images-per-class", type=_positive_int, default=8, help="images per class, one grid row per class (default: 8)")
    parser.add_argument("--out", type=Path, default=Path("grid.png"), help="output PNG (default: grid.png)")


def _parse_labels(classes: list[str] | None) -> list[int | str] | None:
    if not classes:
        return None
    return [int(label) if label.lstrip("-").isdigit() else label for label in classes]


def run(args: argparse.Namespace) -> int:
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale must be >= 0 (1 means no guidance), got {args.guidance_scale}")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out}")
    pipeline = load_pipeline(args.pipeline, args.device)
    labels = _parse_labels(args.classes)
    if labels is not None:
        pipeline.get_label_ids(labels)  # validates names and ids before any sampling

    start = time.perf_counter()
    grid = sample_grid(pipeline, labels, args.num_images_per_class, args.num_steps, args.guidance_scale, args.seed, args.scale)
    save_image_atomic(grid, args.out)
    logger.info("sampled in %.1f s", time.perf_counter() - start)
    print(f"wrote {args.out} ({grid.width}x{grid.height})")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    _add_sampling_arguments(parser)
    parser.add_argument("--num-images-per-class", type=_positive_int, default=8, help="grid images per class (default: 8)")
    parser.add_argument("--fid-samples", type=int, default=500,
                        help="generated images for the quick FID, a multiple of the class count; 0 skips it (default: 500)")
    parser.add_argument("--out-dir", type=Path, default=Path("demo"), help="folder for grid.png and the FID files (default: demo)")


def run_demo(args: argparse.Namespace) -> int:
    """Sample a labelled grid of every class, then score a quick FID against the Fashion-MNIST test set.

    The FID uses the project's Fashion-MNIST classifier as feature extractor, so it needs no download,
    and it is labelled as such: it is not comparable to Inception FIDs.
    """
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale must be >= 0 (1 means no guidance), got {args.guidance_scale}")
    if args.fid_samples < 0:
        raise ValueError(f"--fid-samples must be >= 0, got {args.fid_samples}")
    pipeline = load_pipeline(args.pipeline, args.device)
    num_classes = pipeline.transformer.config.num_classes
    if args.fid_samples % num_classes != 0:
        raise ValueError(f"--fid-samples must be a multiple of the {num_classes} classes, got {args.fid_samples}")

    start = time.perf_counter()
    grid = sample_grid(pipeline, None, args.num_images_per_class, args.num_steps, args.guidance_scale, args.seed, args.scale)
    grid_path = args.out_dir / "grid.png"
    save_image_atomic(grid, grid_path)
    print(f"wrote {grid_path}: {num_classes} classes x {args.num_images_per_class} images, "
          f"{args.num_steps} steps, in {time.perf_counter() - start:.1f} s")
    if args.fid_samples == 0:
        return 0

    from xdlm_vision.metrics.fid import run_fid_job

    payload = run_fid_job(
        [pipeline], num_steps=[args.num_steps], num_samples=args.fid_samples, guidance_scale=args.guidance_scale,
        reference="fashion-mnist:test", extractor="classifier", out_dir=args.out_dir / "fid", seed=args.seed,
        device=args.device,
    )
    metrics = payload["results"][0]["metrics"]
    accuracy = metrics.get("classifier_accuracy")
    line = f"quick FID ({args.fid_samples} samples, {args.num_steps} steps, classifier features, vs the test set): {metrics['fid']:.2f}"
    if accuracy is not None:
        line += f"; samples classified as their class: {100 * accuracy:.1f}%"
    print(line)
    print(f"total {time.perf_counter() - start:.1f} s; details in {args.out_dir / 'fid' / 'fid.json'}")
    return 0
