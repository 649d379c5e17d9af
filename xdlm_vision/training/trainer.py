"""`xdlm-vision train`: train the XDLM transformer on token shards, on one CPU process or many GPUs.

    xdlm-vision train --config configs/fashion-mnist-xdlm.yaml training.max_steps=100
    accelerate launch --num_processes 8 -m xdlm_vision train --config configs/imagenet256-xdlm.yaml --resume
    xdlm-vision train --export runs/fashion-mnist-xdlm/checkpoints/step-00002000 --export-dir pipelines/fm

The loop below is the whole training step, in the order it runs. Every random draw of a step (times,
noise, label dropout) comes from a generator seeded by (seed, step, block), where a block is one
micro-batch of one process. A run therefore depends only on the data order and the batch layout, and
resuming from a checkpoint continues it bit for bit on the same hardware and layout.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from xdlm_vision.training import checkpoint as ckpt
from xdlm_vision.training.config import TrainConfig, load_config, save_config
from xdlm_vision.training.token_data import (
    TokenShardDataset,
    check_meta_matches_model,
    make_loader,
    read_meta,
    verify_shards,
)

logger = logging.getLogger(__name__)

NUM_T_BUCKETS = 4  # the loss is also logged per quarter of the time range (0 = clean, 1 = pure noise)
CSV_FILE = "metrics.csv"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # the file diffusers' save_pretrained writes


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite; the weights of that step were not updated."""


@dataclass
class TrainResult:
    """Outcome of a call of `train`."""

    step: int  # optimizer steps completed
    checkpoint: Path | None  # the newest checkpoint: the last one written, else the one resumed from
    pipeline: Path | None  # the exported pipeline folder, when the run reached max_steps
    stop_signal: int | None  # the signal that stopped the run early, if any
    damaged_shards: list[str] = field(default_factory=list)  # token shards skipped because they are damaged


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `train`."""
    parser.add_argument("--config", help="YAML recipe, such as configs/fashion-mnist-xdlm.yaml (default: built-in defaults)")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optimizer.lr=1e-4 (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="more overrides, e.g. training.max_steps=100 data.shards=out/fm-train")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from the newest complete checkpoint of training.output_dir (no value; starts "
                        "afresh when there is none) or from a given checkpoint or run folder")
    parser.add_argument("--export", metavar="CHECKPOINT",
                        help="do not train: export the EMA weights of this checkpoint (or run folder, or 'latest' "
                        "of training.output_dir) as a pipeline folder and exit")
    parser.add_argument("--export-dir", help="pipeline folder for --export (default: {run}/pipeline-step-NNNNNNNN)")


def run(args: argparse.Namespace) -> int:
    """Entry point of `xdlm-vision train`."""
    overrides = [*args.set_values, *args.overrides]
    if args.export is not None:
        from xdlm_vision.training.export import export_checkpoint

        # Only training.output_dir matters here, so a config without data.shards is fine.
        run_dir = load_config(args.config, overrides, validate=False).training.output_dir if args.export == "latest" else None
        folder = export_checkpoint(args.export, args.export_dir, run_dir=run_dir)
        print(folder)
        return 0

    config = load_config(args.config, overrides)
    try:
        result = train(config, resume=args.resume)
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return 1
    if result.stop_signal is not None:
        # The shell convention for a process ended by a signal, so job schedulers see the interruption.
        return 128 + result.stop_signal
    if result.damaged_shards:
        print(f"skipped {len(result.damaged_shards)} damaged token shards: {', '.join(result.damaged_shards)}")
    if result.pipeline is not None:
        print(result.pipeline)
    return 0


# ------------------------------------------------------------------ pieces of the loop


def resolve_model_sizes(config: TrainConfig, meta: dict[str, Any]) -> dict[str, int]:
    """Codebook, grid and class counts of the model: from the config where set (checked against meta.json), else from it."""
    sizes = {}
    for name in ("num_embeddings", "grid_size", "num_classes"):
        value = getattr(config.model, name)
        sizes[name] = int(meta[name]) if value is None else int(value)
    check_meta_matches_model(meta, **sizes)
    return sizes


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step`: linear warm-up, then constant or cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, parameter by parameter."""
    for ema_parameter, parameter in zip(ema.parameters(), model.parameters()):
        ema_parameter.lerp_(parameter.detach().to(ema_parameter.dtype), 1.0 - decay)


def seed_for(*values: int) -> int:
    """Mix integers into a 63-bit seed that differs for every (seed, step, block)."""
    return int(np.random.SeedSequence([int(value) for value in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StopRequest:
    """Turns SIGTERM and SIGINT into a request to checkpoint and stop after the current step.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once. Handlers can only be set in the
    main thread; elsewhere the request never fires.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading_is_main():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("received %s: saving a checkpoint after the current step, then stopping",
                       signal.Signals(signum).name)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class MetricsLog:
    """Appends one row per log interval to `metrics.csv` (main process only)."""

    def __init__(self, path: Path, columns: list[str], resume_step: int):
        self.path = path
        self.columns = columns
        if path.is_file():
            # Rows past the checkpoint come from the interrupted attempt and are logged again.
            with open(path, newline="", encoding="utf-8") as file:
                rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resume_step]
        else:
            rows = []
        temporary = path.with_name(f".{path.name}.tmp")
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, path)

    def write(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def bucket_columns() -> list[str]:
    edges = np.linspace(0.0, 1.0, NUM_T_BUCKETS + 1)
    return [f"loss_t{low:.2f}-{high:.2f}" for low, high in zip(edges[:-1], edges[1:])]


def save_sample_grid(pipeline, path: Path, class_ids: list[int], samples_per_class: int, num_steps: int, seed: int):
    """Sample `samples_per_class` images of each class with a fixed seed; write one labelled row per class as PNG."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(seed)
    images = pipeline(class_ids, num_steps=num_steps, generator=generator,
                      num_images_per_label=samples_per_class, output_type="pil").images
    width, height = images[0].size
    scale = max(1, 64 // max(width, height))  # small images (32 px) are enlarged so the grid is readable
    width, height = width * scale, height * scale
    margin = 110
    grid = Image.new("RGB", (margin + samples_per_class * width, len(class_ids) * height), "white")
    draw = ImageDraw.Draw(grid)
    names = pipeline.id2label
    for row, class_id in enumerate(class_ids):
        draw.text((4, row * height + height // 2 - 6), f"{class_id} {names.get(class_id, '')}"[:18], fill="black")
        for column in range(samples_per_class):
            image = images[row * samples_per_class + column].resize((width, height), Image.NEAREST)
            grid.paste(image, (margin + column * width, row * height))

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    grid.save(temporary, format="PNG")
    os.replace(temporary, path)


def check_resume_config(saved: TrainConfig, current: TrainConfig, folder: Path) -> None:
    """Reject a resume whose model or noise differ from the checkpoint's; warn when the batch layout changed."""
    for section in ("model", "scheduler"):
        if getattr(saved, section) != getattr(current, section):
            raise ValueError(f"the {section} section differs from the one of checkpoint {folder}: "
                             f"{getattr(saved, section)} != {getattr(current, section)}; resume with the same values")


def save_checkpoint(accelerator, root: Path, step: int, model, ema, optimizer, lr_schedule, config: TrainConfig,
                    meta: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically from all processes (see `checkpoint.py` for the layout); returns its folder."""
    temporary = ckpt.temporary_folder(root, step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            import shutil

            shutil.rmtree(temporary)
        temporary.mkdir()
    accelerator.wait_for_everyone()

    torch.save(ckpt.rng_state(), temporary / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(temporary / "transformer", safe_serialization=True)
        ema.save_pretrained(temporary / "ema", safe_serialization=True)
        torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        ckpt.write_json(temporary / ckpt.TRAINING_STATE_FILE, {**state, "lr_schedule": lr_schedule.state_dict()})
        ckpt.write_json(temporary / ckpt.DATA_META_FILE, meta)
        save_config(config, temporary / "config.yaml")
    accelerator.wait_for_everyone()

    final = root / ckpt.checkpoint_name(step)
    if accelerator.is_main_process:
        ckpt.finalize(root, step)
        ckpt.prune(root, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, model, ema, optimizer, lr_schedule, process_index: int, num_processes: int):
    """Restore weights, EMA, optimizer, schedule and RNG states in place; returns the saved training state."""
    state = ckpt.read_training_state(folder)
    model.load_state_dict(_load_weights(folder / "transformer" / WEIGHTS_FILE))
    ema.load_state_dict(_load_weights(folder / "ema" / WEIGHTS_FILE))
    optimizer.load_state_dict(_load_tensors(folder / "optimizer.pt"))
    lr_schedule.load_state_dict(state["lr_schedule"])

    rng_path = folder / f"rng-{process_index}.pt"
    if state["layout"]["num_processes"] == num_processes and rng_path.is_file():
        ckpt.set_rng_state(_load_tensors(rng_path))
    return state


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file of a checkpoint; a missing or damaged file is a ValueError naming it."""
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"checkpoint file {path} is missing or damaged ({error}); resume from an earlier checkpoint") from error


def _load_tensors(path: Path) -> Any:
    """Load a checkpoint file with `torch.load(weights_only=True)`.

    Anything but tensors and plain values, or a damaged file, raises a ValueError naming the file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for damaged or unsafe files
        # torch's message for an unsafe pickle is a page long. Its WeightsUnpickler line names the rejected object.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "WeightsUnpickler" in line), lines[-1])
        raise ValueError(f"checkpoint file {path} is damaged or contains objects other than tensors ({reason}); "
                         "resume from an earlier checkpoint") from error


# ------------------------------------------------------------------ training


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train the transformer with the settings of `config` (see the module docstring); call it in every process.

    Args:
        config: the recipe; see `TrainConfig`.
        resume: None to start afresh, "latest" for the newest complete checkpoint of the run (a new run
            when there is none), or the path of a checkpoint or run folder.
    """
    config.validate()
    previous_threads = torch.get_num_threads()
    if config.training.num_threads is not None:
        torch.set_num_threads(config.training.num_threads)
    try:
        return _train(config, resume)
    finally:
        torch.set_num_threads(previous_threads)


def _train(config: TrainConfig, resume: str | None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from xdlm_vision.scheduler import XDLMScheduler
    from xdlm_vision.training.export import build_pipeline, load_checked_tokenizer, resolve_tokenizer_path, save_pipeline
    from xdlm_vision.transformer import XDLMTransformer

    training = config.training
    # Without cpu=True accelerate runs processes started by torchrun on a machine without accelerators
    # as independent single processes; with it they join one gloo process group.
    accelerator = Accelerator(mixed_precision=training.mixed_precision, cpu=not torch.accelerator.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process

    # 1. Data description, batch layout and the checkpoint to resume from.
    meta = read_meta(config.data.shards)
    sizes = resolve_model_sizes(config, meta)
    meta, damaged_shards = verify_shards(config.data.shards, meta, strict=config.data.strict)
    micro_batch = training.micro_batch_size
    if training.global_batch_size % (micro_batch * world) != 0:
        raise ValueError(
            f"training.global_batch_size={training.global_batch_size} is not a multiple of micro_batch_size x processes "
            f"= {micro_batch} x {world}; change one of them"
        )
    accumulation = training.global_batch_size // (micro_batch * world)
    num_blocks = accumulation * world  # micro-batches per optimizer step over all processes
    num_tokens = sizes["grid_size"] ** 2
    output_dir = Path(training.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    resume_from = ckpt.resolve_checkpoint(resume, output_dir) if resume is not None else None
    if resume is not None and resume_from is None:
        logger.info("no checkpoint in %s yet; starting a new run", checkpoint_root)
    if resume_from is not None:
        check_resume_config(load_config(resume_from / "config.yaml"), config, resume_from)

    # The tokenizer is loaded now, so that a wrong path fails before training rather than at the export.
    tokenizer_path = resolve_tokenizer_path(config, meta)
    tokenizer = load_checked_tokenizer(tokenizer_path, meta).to(device).eval() if is_main else None

    # 2. Model, EMA, noise scheduler, optimizer and learning-rate schedule; the same seed gives the same init everywhere.
    torch.manual_seed(training.seed)
    transformer = XDLMTransformer.from_preset(
        config.model.preset, **sizes,
        class_dropout_prob=config.model.class_dropout_prob, time_conditioning=config.model.time_conditioning,
    )
    ema = copy.deepcopy(transformer).requires_grad_(False).eval()
    noise_scheduler = XDLMScheduler(
        num_embeddings=sizes["num_embeddings"], mixing_ratio=config.scheduler.mixing_ratio,
        noise_schedule=config.scheduler.noise_schedule, eps=config.scheduler.eps,
    )
    optimizer_config = config.optimizer
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=optimizer_config.lr,
                                  betas=tuple(optimizer_config.betas), weight_decay=optimizer_config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_factor(step, optimizer_config.warmup_steps, training.max_steps,
                                          optimizer_config.lr_schedule, optimizer_config.min_lr_ratio),
    )

    step, batches_consumed = 0, 0
    layout = {"num_processes": world, "num_workers": config.data.num_workers, "micro_batch_size": micro_batch,
              "seed": training.seed, "shuffle_buffer": config.data.shuffle_buffer}
    if resume_from is not None:
        state = load_checkpoint(resume_from, transformer, ema, optimizer, lr_schedule, rank, world)
        step, batches_consumed = int(state["step"]), int(state["batches_consumed"])
        if state["layout"] != layout:
            logger.warning("the batch layout changed since the checkpoint (%s, now %s): the data order continues "
                           "approximately, not exactly", state["layout"], layout)
        logger.info("resumed from %s at step %d", resume_from, step)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    ema.to(device)
    logger.info("transformer %s: %s parameters; %d processes x %d micro-batch x %d accumulation = %d samples per step",
                config.model.preset, f"{sum(p.numel() for p in ema.parameters()):,}", world, micro_batch,
                accumulation, training.global_batch_size)

    # 3. The data stream, resumed after the batches this process already consumed.
    dataset = TokenShardDataset(
        config.data.shards, micro_batch, rank=rank, world_size=world, seed=training.seed,
        shuffle_buffer=config.data.shuffle_buffer, start_batch=batches_consumed, meta=meta,
    )
    batches = iter(make_loader(dataset, config.data.num_workers, pin_memory=device.type == "cuda"))

    # 4. Logs: console, progress bar, metrics.csv, sample grids.
    columns = ["step", "loss", *bucket_columns(), "grad_norm", "lr", "tokens_per_s", "elapsed_s"]
    metrics = None
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        metrics = MetricsLog(output_dir / CSV_FILE, columns, step)
    progress = tqdm(total=training.max_steps, initial=step, desc="train", unit="step", disable=not is_main)
    sample_classes = list(range(min(training.sample_classes, sizes["num_classes"])))
    bucket_sum = torch.zeros(NUM_T_BUCKETS, device=device, dtype=torch.float64)
    bucket_count = torch.zeros(NUM_T_BUCKETS, device=device, dtype=torch.float64)
    grad_norm_sum, interval_steps, interval_start = 0.0, 0, time.perf_counter()
    last_checkpoint: Path | None = resume_from  # named when the loss fails before the next save

    # 5. The loop.
    with StopRequest() as stop_request:
        try:
            while step < training.max_steps:
                transformer.train()
                step_keys: list[str] = []
                nonfinite = torch.zeros((), device=device)
                # Times for the whole global batch, stratified; block b takes every num_blocks-th of them.
                step_generator = torch.Generator().manual_seed(seed_for(training.seed, step))
                t_global = noise_scheduler.sample_t(training.global_batch_size, generator=step_generator,
                                                    antithetic=config.scheduler.antithetic)  # (G,)

                for micro_step in range(accumulation):
                    batch = next(batches)
                    step_keys.extend(batch["keys"])
                    tokens = batch["tokens"].to(device, non_blocking=True)  # (B, L)
                    class_labels = batch["class_labels"].to(device, non_blocking=True)  # (B,)
                    block = micro_step * world + rank
                    generator = torch.Generator().manual_seed(seed_for(training.seed, step, block + 1))
                    t = t_global[block::num_blocks].to(device)  # (B,)
                    noisy = noise_scheduler.add_noise(tokens, t, generator=generator)  # (B, L)
                    drop_labels = torch.rand(micro_batch, generator=generator) < config.model.class_dropout_prob

                    # Gradients are all-reduced only on the last micro-step of the accumulation.
                    last = micro_step == accumulation - 1
                    with nullcontext() if last else accelerator.no_sync(transformer):
                        with accelerator.autocast():
                            logits = transformer(noisy, class_labels, timestep=t,
                                                 force_drop_ids=drop_labels.to(device))  # (B, L, V)
                        token_loss = noise_scheduler.loss(logits.float(), noisy, tokens, t)  # (B, L)
                        sample_loss = token_loss.mean(dim=1)  # (B,)
                        accelerator.backward(sample_loss.mean() / accumulation)

                    sample_loss = sample_loss.detach().double()
                    nonfinite += (~torch.isfinite(sample_loss)).sum()
                    bucket = (t * NUM_T_BUCKETS).long().clamp(0, NUM_T_BUCKETS - 1)  # (B,)
                    bucket_sum.index_add_(0, bucket, sample_loss)
                    bucket_count.index_add_(0, bucket, torch.ones_like(sample_loss))

                # All processes agree on a NaN/inf loss and on a stop request before any weight changes.
                flags = accelerator.reduce(torch.stack([nonfinite.float(),
                                                        torch.tensor(float(stop_request.signal is not None),
                                                                     device=device)]), reduction="sum")
                if flags[0] > 0:
                    bad_keys = gather_object([step_keys] if nonfinite > 0 else [[]])
                    bad_keys = [key for keys in bad_keys for key in keys]
                    raise NonFiniteLossError(
                        f"the loss became NaN or infinite at step {step + 1} in a batch with keys "
                        f"{bad_keys[:16]}{' ...' if len(bad_keys) > 16 else ''}; the weights of this step were not "
                        f"updated and no checkpoint was written for it (last: {last_checkpoint or 'none'}). Inspect "
                        "these samples, or resume from the last checkpoint with a lower optimizer.lr"
                    )

                grad_norm = accelerator.clip_grad_norm_(transformer.parameters(),
                                                        optimizer_config.grad_clip or float("inf"))
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"the gradient norm became {float(grad_norm)} at step {step + 1} (batch keys "
                        f"{step_keys[:16]}); the weights of this step were not updated. Resume from the last checkpoint "
                        "with a lower optimizer.lr or optimizer.grad_clip"
                    )
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
                # A short warm-up of the EMA decay keeps early EMA weights from staying at the initialization.
                decay = min(training.ema_decay, (1 + step) / (10 + step))
                update_ema(ema, accelerator.unwrap_model(transformer), decay)
                step += 1
                batches_consumed += accumulation
                grad_norm_sum += float(grad_norm)
                interval_steps += 1
                progress.update(1)

                if step % training.log_every == 0 or step == training.max_steps:
                    totals = accelerator.reduce(torch.stack([bucket_sum, bucket_count]), reduction="sum")  # (2, K)
                    elapsed = time.perf_counter() - interval_start
                    row = {
                        "step": step,
                        "loss": float(totals[0].sum() / totals[1].sum().clamp_min(1)),
                        "grad_norm": grad_norm_sum / interval_steps,
                        "lr": lr_schedule.get_last_lr()[0],
                        "tokens_per_s": interval_steps * training.global_batch_size * num_tokens / max(elapsed, 1e-9),
                        "elapsed_s": elapsed,
                    }
                    for column, total, count in zip(bucket_columns(), totals[0].tolist(), totals[1].tolist()):
                        row[column] = total / count if count else float("nan")
                    if is_main:
                        metrics.write(row)
                        progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                        logger.info("step %d: loss %.4f, grad norm %.3f, lr %.2e, %.0f tokens/s", step, row["loss"],
                                    row["grad_norm"], row["lr"], row["tokens_per_s"])
                    bucket_sum.zero_()
                    bucket_count.zero_()
                    grad_norm_sum, interval_steps, interval_start = 0.0, 0, time.perf_counter()

                if is_main and training.sample_every and step % training.sample_every == 0:
                    pipeline = build_pipeline(tokenizer, ema, config, meta.get("class_names"))
                    pipeline.set_progress_bar_config(disable=True)
                    grid_path = output_dir / "samples" / f"{ckpt.checkpoint_name(step)}.png"
                    save_sample_grid(pipeline, grid_path, sample_classes, training.samples_per_class,
                                     training.sample_steps, training.seed)
                    logger.info("wrote sample grid %s", grid_path)

                stopping = bool(flags[1] > 0)
                if step % training.checkpoint_every == 0 or step == training.max_steps or stopping:
                    state = {"step": step, "batches_consumed": batches_consumed, "layout": layout}
                    last_checkpoint = save_checkpoint(accelerator, checkpoint_root, step, transformer, ema, optimizer,
                                                      lr_schedule, config, meta, state, training.keep_checkpoints)
                if stopping:
                    logger.warning("stopped at step %d; continue with --resume", step)
                    break
        finally:
            progress.close()
            # Stop the DataLoader workers now: they ignore SIGTERM, so interpreter exit cannot end them.
            del batches

    # 6. Export the pipeline once the run is complete.
    pipeline_dir = None
    if step >= training.max_steps and is_main:
        pipeline_dir = Path(training.export_dir) if training.export_dir else output_dir / "pipeline"
        save_pipeline(build_pipeline(tokenizer, ema, config, meta.get("class_names")), pipeline_dir)
        logger.info("exported the EMA pipeline to %s", pipeline_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group, so that the processes exit promptly
    if damaged_shards:
        logger.warning("summary: %d damaged token shards were skipped: %s", len(damaged_shards), ", ".join(damaged_shards))
    return TrainResult(step=step, checkpoint=last_checkpoint, pipeline=pipeline_dir, stop_signal=stop_request.signal,
                       damaged_shards=damaged_shards)
