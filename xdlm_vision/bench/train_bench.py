"""`bench train`: training-step throughput split into data loading, forward, loss, backward and optimizer.

The step is the one of `xdlm-vision train` on one process without accumulation. It reads a
micro-batch and noises it (`add_noise`, label dropout). Then it runs the transformer (under autocast
for bfloat16), the XDLM loss on float32 logits, backward, gradient clipping, AdamW and the EMA update.
Two setups:

- `tiny` on real Fashion-MNIST token shards (the first images of the test split, encoded with the
  shipped tokenizer into a temporary folder), 8 x 8 tokens, N = 512;
- `small` (12 x 768) on synthetic token shards of 16 x 16 tokens, N = 16384, 1000 classes.

Each setup runs twice more: with images encoded on the fly by the tokenizer instead of tokens read
from shards (what pre-tokenizing saves), and under bfloat16 autocast (speed-up and change in loss).
All runs of a setup start from the same weights and see the same batches and noise, so their
losses are comparable step by step.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xdlm_vision.bench.measure import matmul_peaks, synchronize, transformer_forward_flops
from xdlm_vision.bench.sample_bench import SHIPPED_TOKENIZER, precision_context
from xdlm_vision.data.shards import shard_name, token_dtype, write_meta, write_token_shard
from xdlm_vision.scheduler import XDLMScheduler
from xdlm_vision.tokenizer import VQTokenizer, llamagen_vq16_config
from xdlm_vision.training.token_data import TokenShardDataset, make_loader
from xdlm_vision.training.trainer import seed_for, update_ema
from xdlm_vision.transformer import XDLMTransformer

logger = logging.getLogger(__name__)

PHASES = ("data", "noise", "forward", "loss", "backward", "optimizer")
ENCODE_PHASES = ("images", "encode")


def write_synthetic_shards(folder: Path, num_samples: int, grid_size: int, num_embeddings: int, num_classes: int,
                           shard_size: int = 64, seed: int = 0) -> Path:
    """Write token shards of uniformly random tokens and labels, with a `meta.json`, in the encoder's format."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(num_embeddings)
    shards, counts = [], [0] * num_classes
    for index, start in enumerate(range(0, num_samples, shard_size)):
        keys = range(start, min(start + shard_size, num_samples))
        samples = []
        for key in keys:
            label = int(rng.integers(num_classes))
            counts[label] += 1
            samples.append((f"{key:08d}", rng.integers(0, num_embeddings, (grid_size, grid_size)).astype(dtype), label))
        name = shard_name("train", index)
        shards.append({"name": name, "num_samples": write_token_shard(folder / name, samples)})
    write_meta(folder, {
        "format": "xdlm-token-shards", "version": 1, "split": "train", "tokenizer": "synthetic (random tokens)",
        "grid_size": grid_size, "num_embeddings": num_embeddings, "num_classes": num_classes,
        "class_names": [str(i) for i in range(num_classes)], "num_samples": num_samples, "class_counts": counts,
        "horizontal_flip": False, "shards": shards,
    })
    return folder


class ImageStream:
    """Micro-batches of images in [-1, 1] with labels: Fashion-MNIST in file order, or random images of a size."""

    def __init__(self, batch_size: int, image_size: int, num_classes: int, fashion_mnist: bool, seed: int = 0):
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_classes = num_classes
        self.source = None
        if fashion_mnist:
            from xdlm_vision.data.images import FashionMNISTSource

            self.source = FashionMNISTSource(split="test")
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None:
            indices = (np.arange(self.batch_size) + self.position) % len(self.source)
            self.position += self.batch_size
            return self.source.load_batch(indices)  # (B, 3, 32, 32), (B,)
        images = torch.rand(self.batch_size, 3, self.image_size, self.image_size, generator=self.generator) * 2 - 1
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=self.generator)
        return images, labels


def time_training(transformer: XDLMTransformer, scheduler: XDLMScheduler, next_batch, steps: int, precision: str,
                  device: torch.device, seed: int = 0, class_dropout_prob: float = 0.1) -> dict:
    """Run `steps` + 1 training steps (the first is a warm-up); return median phase times and per-step losses."""
    model = copy.deepcopy(transformer).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    phase_times = {name: [] for name in PHASES + ENCODE_PHASES}
    losses, totals = [], []

    for step in range(steps + 1):
        times: dict[str, float] = {}

        def lap(name: str, start: float) -> float:
            synchronize(device)
            now = time.perf_counter()
            times[name] = times.get(name, 0.0) + now - start
            return now

        synchronize(device)
        step_start = clock = time.perf_counter()
        tokens, class_labels, encode_times = next_batch()
        times.update(encode_times)
        tokens, class_labels = tokens.to(device), class_labels.to(device)  # (B, L), (B,)
        clock = lap("data", clock)

        generator = torch.Generator().manual_seed(seed_for(seed, step))
        t = scheduler.sample_t(tokens.shape[0], generator=generator).to(device)  # (B,)
        noisy = scheduler.add_noise(tokens, t, generator=generator)  # (B, L)
        drop_labels = (torch.rand(tokens.shape[0], generator=generator) < class_dropout_prob).to(device)  # (B,)
        clock = lap("noise", clock)

        with precision_context(precision, device):
            logits = model(noisy, class_labels, timestep=t, force_drop_ids=drop_labels)  # (B, L, V)
        clock = lap("forward", clock)
        loss = scheduler.loss(logits.float(), noisy, tokens, t).mean()
        clock = lap("loss", clock)
        loss.backward()
        clock = lap("backward", clock)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.999)
        lap("optimizer", clock)
        total = time.perf_counter() - step_start

        losses.append(float(loss.detach()))
        if step == 0:
            continue  # warm-up
        totals.append(total)
        for name in phase_times:
            phase_times[name].append(times.get(name, 0.0))

    total = statistics.median(totals)
    tokens_per_step = tokens.numel()
    phases = {name: statistics.median(values) for name, values in phase_times.items() if any(values)}
    return {
        "precision": precision,
        "steps_timed": steps,
        "step_s": total,
        "times_s": totals,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / total,
        "phases_s": phases,
        "share": {name: value / total for name, value in phases.items()},
        "losses": losses,
    }


def measure_setup(name: str, transformer: XDLMTransformer, shards: Path, tokenizer: VQTokenizer, batch_size: int,
                  steps: int, precisions: tuple[str, ...], device: torch.device, fashion_mnist_images: bool,
                  peaks: dict) -> dict:
    """Time one model on token shards in every precision, and once (float32) with images encoded on the fly."""
    config = transformer.config
    scheduler = XDLMScheduler(num_embeddings=config.num_embeddings)
    runs = []

    def shard_batches():
        dataset = TokenShardDataset(shards, batch_size, seed=0, shuffle_buffer=64)
        batches = iter(make_loader(dataset, num_workers=0))

        def next_batch():
            batch = next(batches)
            return batch["tokens"], batch["class_labels"], {}

        return next_batch

    def encoded_batches():
        stream = ImageStream(batch_size, tokenizer.config.image_size, config.num_classes, fashion_mnist_images)
        encoder = tokenizer.to(device)

        def next_batch():
            start = time.perf_counter()
            images, labels = next(stream)
            loaded = time.perf_counter()
            tokens = encoder.encode(images.to(device))  # (B, L)
            synchronize(device)
            return tokens, labels, {"images": loaded - start, "encode": time.perf_counter() - loaded}

        return next_batch

    for precision in precisions:
        logger.info("bench train: %s on token shards, %s", name, precision)
        runs.append({"data": "token shards", **time_training(transformer, scheduler, shard_batches(), steps,
                                                              precision, device)})
    logger.info("bench train: %s with images encoded on the fly", name)
    runs.append({"data": "images encoded on the fly", **time_training(transformer, scheduler, encoded_batches(), steps,
                                                                       precisions[0], device)})

    # The backward of every matmul computes two products of the forward's size: the input's and the weight's gradient.
    forward_flop = transformer_forward_flops(config, batch_size)
    flops = {"forward": forward_flop, "backward": 2 * forward_flop}
    shards_float32 = runs[0] if runs[0]["precision"] == "float32" else None
    for run in runs:
        phases = run["phases_s"]
        peak = peaks[run["precision"]]["flop_per_s"]
        run["forward_flop_per_s"] = flops["forward"] / phases["forward"]
        run["backward_flop_per_s"] = flops["backward"] / phases["backward"]
        run["forward_fraction_of_matmul_peak"] = run["forward_flop_per_s"] / peak
        if shards_float32 is None:
            continue
        if run is not shards_float32:
            run["speedup_vs_float32_shards"] = shards_float32["step_s"] / run["step_s"]
        if run["precision"] == "bfloat16":
            reference = np.array(shards_float32["losses"])
            run["loss_relative_change"] = float(np.mean(np.abs(np.array(run["losses"]) - reference) / np.abs(reference)))
    return {
        "name": name,
        "transformer": {"hidden_size": config.hidden_size, "depth": config.depth, "num_embeddings": config.num_embeddings,
                        "grid_size": config.grid_size, "num_classes": config.num_classes,
                        "parameters": sum(p.numel() for p in transformer.parameters())},
        "batch_size": batch_size,
        "flop": flops,
        "runs": runs,
    }


def run_train_bench(steps: int = 3, tiny_batch_size: int = 64, small_batch_size: int = 8,
                    precisions: tuple[str, ...] = ("float32", "bfloat16"), device: str = "cpu",
                    setups: tuple[str, ...] = ("tiny", "small"), small_sizes: dict | None = None,
                    small_preset: str = "small", small_tokenizer_config: dict | None = None,
                    work_dir: Path | None = None, matmul_size: int | None = None) -> dict:
    """Measure the training step of each setup; `small_sizes`, `small_preset` and `small_tokenizer_config` shrink `small` for tests."""
    from xdlm_vision.data.encode import encode_fashion_mnist_subset

    device = torch.device(device)
    # A 2048 matmul saturates a CPU; a GPU needs larger products to approach its peak.
    matmul_size = matmul_size or (8192 if device.type == "cuda" else 2048)
    peaks = matmul_peaks(matmul_size, device)
    results = {"steps_timed": steps, "device": str(device), "matmul_peak": peaks, "setups": []}
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        folder = Path(folder)
        if "tiny" in setups:
            tokenizer = VQTokenizer.from_pretrained(SHIPPED_TOKENIZER).eval()
            shards = encode_fashion_mnist_subset(folder / "fashion-mnist", num_images=4 * tiny_batch_size)
            torch.manual_seed(0)
            transformer = XDLMTransformer.from_preset("tiny", num_embeddings=tokenizer.config.num_embeddings,
                                                      grid_size=tokenizer.config.grid_size, num_classes=10)
            results["setups"].append(measure_setup(
                "tiny", transformer, shards, tokenizer, tiny_batch_size, steps, precisions, device,
                fashion_mnist_images=True, peaks=peaks))
        if "small" in setups:
            sizes = small_sizes or {"num_embeddings": 16384, "grid_size": 16, "num_classes": 1000}
            shards = write_synthetic_shards(folder / "synthetic", 4 * small_batch_size, **sizes)
            if small_tokenizer_config is None:
                shape_only = {"quantize.embedding.weight": torch.empty(sizes["num_embeddings"], 8)}
                small_tokenizer_config = llamagen_vq16_config(shape_only, image_size=sizes["grid_size"] * 16)
            torch.manual_seed(0)
            tokenizer = VQTokenizer(**small_tokenizer_config).eval()
            transformer = XDLMTransformer.from_preset(small_preset, **sizes)
            results["setups"].append(measure_setup(
                "small", transformer, shards, tokenizer, small_batch_size, steps, precisions, device,
                fashion_mnist_images=False, peaks=peaks))

    # The peak is measured again after the runs; the fractions use the better of the two measurements.
    results["matmul_peak"] = matmul_peaks(matmul_size, device, previous=peaks)
    for setup in results["setups"]:
        for run in setup["runs"]:
            run["forward_fraction_of_matmul_peak"] = run["forward_flop_per_s"] / results["matmul_peak"][run["precision"]]["flop_per_s"]
    return results


def format_train_table(results: dict) -> str:
    """Render the training benchmark as a plain-text table (milliseconds per step)."""
    columns = PHASES + ENCODE_PHASES
    lines = [f"{'setup':<7}{'data':<12}{'precision':<10}{'tokens/s':>10}{'step ms':>9}"
             + "".join(f"{name:>10}" for name in columns) + f"{'fwd of peak':>12}{'speed-up':>9}{'d loss':>8}"]
    for setup in results["setups"]:
        for run in setup["runs"]:
            data = "shards" if run["data"] == "token shards" else "on the fly"
            phases = run["phases_s"]
            line = (f"{setup['name']:<7}{data:<12}{run['precision']:<10}{run['tokens_per_s']:>10.0f}"
                    f"{run['step_s'] * 1e3:>9.0f}" + "".join(f"{phases.get(name, 0.0) * 1e3:>10.1f}" for name in columns)
                    + f"{run['forward_fraction_of_matmul_peak']:>12.1%}")
            line += f"{run['speedup_vs_float32_shards']:>8.2f}x" if "speedup_vs_float32_shards" in run else f"{'':>9}"
            line += f"{run['loss_relative_change']:>8.1e}" if "loss_relative_change" in run else ""
            lines.append(line)
    peaks = results["matmul_peak"]
    lines.append("matmul peak: " + ", ".join(f"{p['dtype']} {p['flop_per_s'] / 1e9:.1f} GFLOP/s" for p in peaks.values()))
    lines.append("'data' includes 'images' and 'encode' for on-the-fly runs; 'd loss' is the mean relative change "
                 "of the per-step loss against float32 on the same batches")
    return "\n".join(lines)
