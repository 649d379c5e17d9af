"""`bench scaling`: scheduler `step` and `loss` cost over codebook size N and sequence length L."""

from __future__ import annotations

import logging

import numpy as np
import torch

from xdlm_vision.bench.measure import measure
from xdlm_vision.scheduler import XDLMScheduler

logger = logging.getLogger(__name__)

CODEBOOK_SIZES = (1024, 4096, 16384, 65536)
SEQUENCE_LENGTHS = (64, 256, 1024)


def fit_log_slope(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size); 1.0 means linear growth."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def run_scaling_bench(batch_size: int = 2, repeats: int = 3, mixing_ratio: float = 0.1,
                      codebook_sizes=CODEBOOK_SIZES, sequence_lengths=SEQUENCE_LENGTHS) -> dict:
    """Measure step and loss forward+backward for every (N, L) pair at a fixed batch size."""
    rows = []
    for n in codebook_sizes:
        for length in sequence_lengths:
            torch.manual_seed(0)
            scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=mixing_ratio)
            scheduler.set_timesteps(8)
            generator = torch.Generator().manual_seed(0)
            logits = torch.randn(batch_size, length, n + 1)  # (B, L, V)
            tokens = torch.randint(0, n, (batch_size, length))
            sample = scheduler.add_noise(tokens, float(scheduler.timesteps[3]), generator=generator)
            t_train = scheduler.sample_t(batch_size, generator=generator)
            noisy = scheduler.add_noise(tokens, t_train, generator=generator)
            trainable = logits.clone().requires_grad_(True)

            def loss_call():
                scheduler.loss(trainable, noisy, tokens, t_train).sum().backward()
                trainable.grad = None

            step = measure(lambda: scheduler.step(logits, scheduler.timesteps[3], sample, generator=generator).prev_sample, repeats)
            loss = measure(loss_call, repeats)
            logits_bytes = logits.numel() * logits.element_size()
            rows.append({
                "num_embeddings": n, "num_tokens": length, "elements": batch_size * length * n,
                "logits_bytes": logits_bytes,
                "step_s": step.median_s, "step_peak_extra_bytes": step.peak_extra_bytes,
                "loss_s": loss.median_s, "loss_peak_extra_bytes": loss.peak_extra_bytes,
            })
            logger.info("N=%d L=%d: step %.1f ms, loss %.1f ms", n, length, step.median_s * 1e3, loss.median_s * 1e3)
            del logits, trainable

    elements = [row["elements"] for row in rows]
    # Small shapes are dominated by fixed per-call overhead, so the slope is fitted on the larger half.
    large = [i for i, size in enumerate(elements) if size >= sorted(elements)[len(elements) // 2]]
    pick = lambda key: [rows[i][key] for i in large]  # noqa: E731
    sizes = [elements[i] for i in large]
    slopes = {
        "step_time": fit_log_slope(sizes, pick("step_s")),
        "loss_time": fit_log_slope(sizes, pick("loss_s")),
        "step_peak_memory": fit_log_slope(sizes, [max(v, 1) for v in pick("step_peak_extra_bytes")]),
        "loss_peak_memory": fit_log_slope(sizes, [max(v, 1) for v in pick("loss_peak_extra_bytes")]),
    }
    return {"batch_size": batch_size, "mixing_ratio": mixing_ratio, "rows": rows, "fitted_log_log_slopes": slopes,
            "slope_fit_points": len(large)}


def format_scaling_table(results: dict) -> str:
    """Render the scaling benchmark as a plain-text table with the fitted slopes."""
    lines = [f"{'N':>7}{'L':>6}{'B*L*N':>12}{'step ms':>10}{'step mem/logits':>17}{'loss ms':>10}{'loss mem/logits':>17}"]
    for row in results["rows"]:
        lines.append(
            f"{row['num_embeddings']:>7}{row['num_tokens']:>6}{row['elements']:>12}{row['step_s'] * 1e3:>10.1f}"
            f"{row['step_peak_extra_bytes'] / row['logits_bytes']:>16.2f}x{row['loss_s'] * 1e3:>10.1f}"
            f"{row['loss_peak_extra_bytes'] / row['logits_bytes']:>16.2f}x"
        )
    slopes = results["fitted_log_log_slopes"]
    lines.append("log-log slope against B*L*N (1.0 = linear): " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()))
    return "\n".join(lines)


def plot_scaling(results: dict, path) -> None:
    """Save a log-log plot of time against B*L*N for step and loss (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the scaling plot needs matplotlib: pip install matplotlib") from error
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in ((axes[0], "step_s", "step"), (axes[1], "loss_s", "loss forward+backward")):
        for length in sorted({row["num_tokens"] for row in results["rows"]}):
            points = [row for row in results["rows"] if row["num_tokens"] == length]
            axis.loglog([p["elements"] for p in points], [p[key] for p in points], "o-", label=f"L={length}")
        low = min(row["elements"] for row in results["rows"])
        high = max(row["elements"] for row in results["rows"])
        reference = max(row[key] for row in results["rows"] if row["elements"] == high)
        axis.loglog([low, high], [reference * low / high, reference], "k--", linewidth=0.8, label="linear")
        axis.set_xlabel("B * L * N (logit elements)")
        axis.set_ylabel("seconds")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("wrote %s", path)
