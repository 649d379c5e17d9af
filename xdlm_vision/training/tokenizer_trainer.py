"""`xdlm-vision train-tokenizer`: train a VQTokenizer on Fashion-MNIST, an ImageFolder tree or image shards.

One visible loop: build the tokenizer, optimizer and data, then for each step reconstruct a batch,
take an optimizer step, restart dead codes, log loss / PSNR / codebook usage, and checkpoint. The
losses need no downloaded weights: mean squared error plus an optional L1 term, the codebook loss
and the commitment loss. Dead-code restarts move every code unused since the last restart onto a
random encoder output of the current batch, which keeps most of the codebook in use.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from xdlm_vision.data.images import SOURCE_KINDS, CorruptImageError, FashionMNISTSource, open_image_source
from xdlm_vision.tokenizer import VQTokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
# Options that may change when a run resumes; any other change would mix two different trainings.
RESUMABLE_CHANGES = {"steps", "max_minutes", "threads", "log_every", "checkpoint_every", "eval_images", "eval_split"}
TRAINING_STATE = "training_state.pt"

# Defaults of every option that a YAML recipe may set; command-line values override the recipe.
DEFAULTS = {
    "source": "fashion-mnist",
    "data_dir": None,
    "split": "train",
    "eval_split": "test",
    "image_size": None,
    "num_embeddings": 512,
    "embedding_dim": 8,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 64,
    "norm_num_groups": 8,
    "mid_block_add_attention": True,
    "steps": 3000,
    "batch_size": 64,
    "learning_rate": 1e-3,
    "warmup_steps": 200,
    "weight_decay": 0.0,
    "commitment_weight": 0.25,
    "l1_weight": 0.5,
    "restart_every": 100,
    "horizontal_flip": False,
    "log_every": 50,
    "checkpoint_every": 500,
    "eval_images": 10000,
    "seed": 0,
    "max_minutes": None,
    "threads": None,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `train-tokenizer`; unset options take the recipe's value, then DEFAULTS."""
    parser.add_argument("--config", help="YAML recipe with any of the options below (underscores for dashes)")
    parser.add_argument("--output-dir", required=True, help="folder for checkpoints and the trained tokenizer")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    parser.add_argument("--source", choices=SOURCE_KINDS, help="image source (default fashion-mnist)")
    parser.add_argument("--data-dir", help="source folder (Fashion-MNIST default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--split", help="training split (default train)")
    parser.add_argument("--eval-split", help="split for the final PSNR and codebook usage (default test)")
    parser.add_argument("--image-size", type=int, help="training image side in pixels (Fashion-MNIST: 32)")
    parser.add_argument("--num-embeddings", type=int, help="codebook size (default 512)")
    parser.add_argument("--embedding-dim", type=int, help="code dimension (default 8)")
    parser.add_argument("--block-out-channels", type=int, nargs="+", help="channels per level (default 16 32 64)")
    parser.add_argument("--layers-per-block", type=int, help="resnet blocks per encoder level (default 1)")
    parser.add_argument("--latent-channels", type=int, help="channels before quant_conv (default 64)")
    parser.add_argument("--norm-num-groups", type=int, help="GroupNorm groups (default 8)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 3000)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 64)")
    parser.add_argument("--learning-rate", type=float, help="peak AdamW learning rate (default 1e-3)")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps before cosine decay (default 200)")
    parser.add_argument("--commitment-weight", type=float, help="weight beta of the commitment loss (default 0.25)")
    parser.add_argument("--l1-weight", type=float, help="weight of the L1 reconstruction term (default 0.5)")
    parser.add_argument("--restart-every", type=int, help="steps between dead-code restarts, 0 for none (default 100)")
    parser.add_argument("--horizontal-flip", action="store_true", default=None, help="flip training images at random")
    parser.add_argument("--log-every", type=int, help="steps between log lines (default 50)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    parser.add_argument("--eval-images", type=int, help="images of the eval split to score at the end (default 10000)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--max-minutes", type=float, help="stop early after this much training time (default none)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def resolve_options(args: argparse.Namespace) -> dict:
    """Merge DEFAULTS, the YAML recipe and the command line, in increasing priority."""
    options = dict(DEFAULTS)
    if args.config:
        try:
            with open(args.config) as file:
                recipe = yaml.safe_load(file) or {}
        except OSError as error:
            raise ValueError(f"cannot read recipe {args.config}: {error}") from error
        if not isinstance(recipe, dict):
            raise ValueError(f"recipe {args.config} must be a mapping of option names to values")
        unknown = sorted(set(recipe) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"recipe {args.config} has unknown options {unknown}; known: {sorted(DEFAULTS)}")
        options.update(recipe)
    for name in DEFAULTS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
        if int(options[name]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {options[name]}")
    return options


class TrainingBatches:
    """Endless shuffled batches (images (B, 3, S, S) in [-1, 1], labels (B,)) whose position can be saved."""

    def __init__(self, source, batch_size: int, seed: int, horizontal_flip: bool = False):
        self.source = source
        self.batch_size = batch_size
        self.horizontal_flip = horizontal_flip
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_order = torch.randperm(len(source), generator=self.generator)
        self.position = 0

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch_order": self.epoch_order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch_order = state["epoch_order"]
        self.position = int(state["position"])

    def next_indices(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.epoch_order):
            self.epoch_order = torch.randperm(len(self.source), generator=self.generator)
            self.position = 0
        indices = self.epoch_order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._load(self.next_indices())
        if self.horizontal_flip:
            # Drawn from the saved generator, so a resumed run flips the same images.
            flip = torch.rand(images.shape[0], generator=self.generator) < 0.5
            images[flip] = images[flip].flip(-1)
        return images, labels

    def _load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # NOTE: ImageFolder and shard images are decoded one at a time in the training process, which is
        # slow for large photographs. A DataLoader with worker processes would be faster.
        if isinstance(self.source, FashionMNISTSource):
            return self.source.load_batch(indices.numpy())
        images, labels = [], []
        for index in indices.tolist():
            try:
                image, label = self.source.load(index)
            except CorruptImageError as error:
                logger.warning("skipping a corrupt training image: %s", error)
                continue
            images.append(image)
            labels.append(label)
        if not images:
            raise ValueError("a whole training batch failed to decode; check the image files")
        return torch.stack(images), torch.tensor(labels)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image for images in [-1, 1] (peak = the range of [0, 1] pixels)."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2.0).pow(2).flatten(1).mean(dim=1)  # (B,)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_tokenizer(tokenizer: VQTokenizer, source, max_images: int | None = None, batch_size: int = 256) -> dict:
    """Return mean PSNR (dB) and codebook usage (fraction of codes used at least once) on a source."""
    tokenizer.eval()
    count = len(source) if max_images is None else min(max_images, len(source))
    used = torch.zeros(tokenizer.config.num_embeddings, dtype=torch.bool)
    psnr_sum = 0.0
    for start in tqdm(range(0, count, batch_size), desc="evaluate", unit="batch", leave=False):
        indices = np.arange(start, min(start + batch_size, count))
        if isinstance(source, FashionMNISTSource):
            images, _ = source.load_batch(indices)
        else:
            images = torch.stack([source.load(int(index))[0] for index in indices])
        tokens = tokenizer.encode(images)  # (B, L)
        reconstruction = tokenizer.decode(tokens).float().cpu()  # (B, 3, H, W)
        used[tokens.flatten().cpu()] = True
        psnr_sum += psnr(reconstruction, images).sum().item()
    return {
        "num_images": count,
        "psnr_db": psnr_sum / max(count, 1),
        "codebook_usage": used.float().mean().item(),
        "codes_used": int(used.sum()),
        "num_embeddings": tokenizer.config.num_embeddings,
    }


def reconstruction_loss(output, images: torch.Tensor, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the total training loss and the mean squared error of one batch."""
    mse = F.mse_loss(output.sample, images)
    loss = mse + output.codebook_loss + options["commitment_weight"] * output.commitment_loss
    if options["l1_weight"]:
        loss = loss + options["l1_weight"] * F.l1_loss(output.sample, images)
    return loss, mse


@torch.no_grad()
def restart_dead_codes(tokenizer: VQTokenizer, usage: torch.Tensor, latents: torch.Tensor, optimizer, generator) -> int:
    """Move codes with zero `usage` onto random latents (B, D, h, w) of the batch; returns how many moved."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    candidates = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, D)
    picks = torch.randint(len(candidates), (dead.numel(),), generator=generator)
    weight = tokenizer.quantize.embedding.weight
    weight[dead] = candidates[picks].to(weight.dtype)

    # Stale Adam moments would push a restarted code back where it was.
    state = optimizer.state.get(weight, {})
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            state[name][dead] = 0.0
    return int(dead.numel())


def learning_rate_at(step: int, options: dict) -> float:
    """Linear warm-up to the peak rate, then cosine decay to a tenth of it at the last step."""
    peak = options["learning_rate"]
    if step < options["warmup_steps"]:
        return peak * (step + 1) / options["warmup_steps"]
    progress = (step - options["warmup_steps"]) / max(1, options["steps"] - options["warmup_steps"])
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def save_checkpoint(output_dir: Path, tokenizer, optimizer, batches, step, usage, restart_generator, options) -> None:
    """Write OUTPUT_DIR/checkpoint atomically: fill a temporary folder, then swap it in."""
    final = output_dir / CHECKPOINT_DIR
    temporary = output_dir / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer.save_pretrained(temporary)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "batches": batches.state_dict(),
        "usage": usage,
        "restart_generator": restart_generator.get_state(),
        "options_json": json.dumps(options, sort_keys=True),
    }
    torch.save(state, temporary / TRAINING_STATE)
    previous = output_dir / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(temporary, final)
    shutil.rmtree(previous, ignore_errors=True)
    logger.info("step %d: checkpoint written to %s", step, final)


def save_tokenizer_atomically(tokenizer: VQTokenizer, folder: Path) -> None:
    """Save the trained tokenizer's files into `folder`, each written under a temporary name first."""
    temporary = folder.parent / f".{folder.name}.tmp-save"
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer.save_pretrained(temporary)
    folder.mkdir(parents=True, exist_ok=True)
    for path in temporary.iterdir():
        os.replace(path, folder / path.name)
    temporary.rmdir()


def _check_resumed_options(saved: dict, options: dict) -> None:
    changed = sorted(name for name in options if saved.get(name) != options[name] and name not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{name}: {saved.get(name)!r} -> {options[name]!r}" for name in changed)
        raise ValueError(f"--resume with changed options ({details}); use the checkpoint's options or a new --output-dir")
    if saved.get("steps") != options["steps"]:
        logger.warning("resuming with --steps %s instead of %s; the learning-rate schedule changes from here",
                       options["steps"], saved.get("steps"))


def build_tokenizer(options: dict, image_size: int) -> VQTokenizer:
    levels = len(options["block_out_channels"])
    return VQTokenizer(
        num_embeddings=options["num_embeddings"],
        embedding_dim=options["embedding_dim"],
        codebook_l2_norm=True,
        image_size=image_size,
        block_out_channels=tuple(options["block_out_channels"]),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=options["layers_per_block"],
        latent_channels=options["latent_channels"],
        norm_num_groups=options["norm_num_groups"],
        mid_block_add_attention=options["mid_block_add_attention"],
    )


def train_tokenizer(options: dict, output_dir: str | os.PathLike, resume: bool = False) -> dict:
    """Train a tokenizer with resolved `options`; returns the final evaluation metrics."""
    previous_threads = torch.get_num_threads()
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    try:
        return _train(options, Path(output_dir), resume)
    finally:
        torch.set_num_threads(previous_threads)


def _train(options: dict, output_dir: Path, resume: bool) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options["seed"])

    # Data
    source = open_image_source(options["source"], options["data_dir"], options["split"], options["image_size"])
    image_size = source.image_size
    batches = TrainingBatches(source, options["batch_size"], options["seed"], options["horizontal_flip"])
    logger.info("training on %d %s images (%s), %dx%d", len(source), options["source"], options["split"],
                image_size, image_size)

    # Model, optimizer, state
    tokenizer = build_tokenizer(options, image_size)
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=options["learning_rate"],
                                  weight_decay=options["weight_decay"], betas=(0.9, 0.99))
    usage = torch.zeros(options["num_embeddings"], dtype=torch.long)
    restart_generator = torch.Generator().manual_seed(options["seed"] + 1)
    step = 0
    checkpoint = output_dir / CHECKPOINT_DIR
    if resume:
        if not (checkpoint / TRAINING_STATE).is_file():
            raise ValueError(f"--resume given but no checkpoint in {checkpoint}; run once without --resume")
        tokenizer = VQTokenizer.from_pretrained(checkpoint)
        optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=options["learning_rate"],
                                      weight_decay=options["weight_decay"], betas=(0.9, 0.99))
        state = torch.load(checkpoint / TRAINING_STATE, map_location="cpu", weights_only=True)
        _check_resumed_options(json.loads(state["options_json"]), options)
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        usage = state["usage"]
        restart_generator.set_state(state["restart_generator"])
        step = int(state["step"])
        logger.info("resumed from %s at step %d", checkpoint, step)
    elif checkpoint.exists():
        raise ValueError(f"{checkpoint} exists; pass --resume to continue it or choose another --output-dir")
    num_parameters = sum(parameter.numel() for parameter in tokenizer.parameters())
    logger.info("tokenizer: %.2fM parameters, %d codes of dim %d, %dx%d tokens", num_parameters / 1e6,
                options["num_embeddings"], options["embedding_dim"], tokenizer.config.grid_size,
                tokenizer.config.grid_size)

    # Training loop
    tokenizer.train()
    window = {"loss": 0.0, "psnr": 0.0, "count": 0, "used": torch.zeros_like(usage, dtype=torch.bool)}
    start_time = time.time()
    progress = tqdm(total=options["steps"], initial=step, desc="train-tokenizer", unit="step")
    while step < options["steps"]:
        images, _ = batches.next()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, options)

        output = tokenizer(images)
        loss, mse = reconstruction_loss(output, images, options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1

        usage += torch.bincount(output.tokens.flatten(), minlength=options["num_embeddings"])
        window["used"][output.tokens.flatten()] = True
        window["loss"] += loss.item()
        window["psnr"] += (10.0 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))).item()
        window["count"] += 1
        if options["restart_every"] and step % options["restart_every"] == 0:
            restarted = restart_dead_codes(tokenizer, usage, output.latents.detach(), optimizer, restart_generator)
            if restarted:
                logger.debug("step %d: restarted %d dead codes", step, restarted)
            usage.zero_()

        if step % options["log_every"] == 0 or step == options["steps"]:
            count = window["count"]
            logger.info(
                "step %d/%d loss %.4f psnr %.2f dB codebook usage %.1f%% lr %.2e (%.1f min)", step, options["steps"],
                window["loss"] / count, window["psnr"] / count, 100.0 * window["used"].float().mean().item(),
                optimizer.param_groups[0]["lr"], (time.time() - start_time) / 60.0,
            )
            window = {"loss": 0.0, "psnr": 0.0, "count": 0, "used": torch.zeros_like(usage, dtype=torch.bool)}
        if step % options["checkpoint_every"] == 0 or step == options["steps"]:
            save_checkpoint(output_dir, tokenizer, optimizer, batches, step, usage, restart_generator, options)
        progress.update(1)
        if options["max_minutes"] and time.time() - start_time > 60.0 * options["max_minutes"] and step < options["steps"]:
            logger.warning("stopping at step %d of %d: --max-minutes %s reached", step, options["steps"],
                           options["max_minutes"])
            save_checkpoint(output_dir, tokenizer, optimizer, batches, step, usage, restart_generator, options)
            break
    progress.close()

    # Final tokenizer and its scores on the evaluation split
    tokenizer.eval()
    save_tokenizer_atomically(tokenizer, output_dir)
    metrics = {"steps": step, "training_minutes": round((time.time() - start_time) / 60.0, 2)}
    if options["eval_images"]:
        eval_source = open_image_source(options["source"], options["data_dir"], options["eval_split"], image_size)
        metrics.update(evaluate_tokenizer(tokenizer, eval_source, options["eval_images"]))
        metrics["eval_split"] = options["eval_split"]
        logger.info("%s: PSNR %.2f dB, codebook usage %.1f%% (%d of %d codes) on %d images",
                    options["eval_split"], metrics["psnr_db"], 100 * metrics["codebook_usage"],
                    metrics["codes_used"], metrics["num_embeddings"], metrics["num_images"])
    temporary = output_dir / ".metrics.json.tmp"
    temporary.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(temporary, output_dir / "metrics.json")
    return metrics


def run(args: argparse.Namespace) -> int:
    """Entry point of `xdlm-vision train-tokenizer`."""
    options = resolve_options(args)
    metrics = train_tokenizer(options, args.output_dir, resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0
