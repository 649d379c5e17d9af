"""`bench sample`: end-to-end sampling time split into transformer forward, scheduler, tokenizer decode and the rest.

Two pipelines are measured in the same run:

- `small`: the published 12 x 768 transformer (256 tokens, N = 16384, 1000 classes) with random
  weights, and a random-weight tokenizer of LlamaGen VQ-16's shape for the decode (256 px images);
- the shipped Fashion-MNIST pipeline (`pipelines/fashion-mnist-xdlm`); while it is absent, the shipped
  tokenizer `tokenizers/fashion-mnist-vq512` with a random `tiny` transformer replaces it.

Each is sampled with and without classifier-free guidance, in float32 and under bfloat16 autocast.
The component times come from timers wrapped around `transformer.forward`, `scheduler.apply_guidance`,
`scheduler.step` and `vqvae.decode` of that pipeline object; "rest" is the remaining wall time of the
pipeline call (input checks, prior draw, image post-processing).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from pathlib import Path

import torch

from xdlm_vision.bench.measure import ComponentTimer, matmul_peaks, synchronize, transformer_forward_flops
from xdlm_vision.pipeline import XDLMPipeline
from xdlm_vision.scheduler import XDLMScheduler
from xdlm_vision.tokenizer import VQTokenizer, llamagen_vq16_config
from xdlm_vision.transformer import XDLMTransformer

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[2]
SHIPPED_PIPELINE = REPOSITORY / "pipelines" / "fashion-mnist-xdlm"
SHIPPED_TOKENIZER = REPOSITORY / "tokenizers" / "fashion-mnist-vq512"
COMPONENTS = ("transformer_forward", "guidance", "scheduler_step", "tokenizer_decode", "rest")
PRECISIONS = ("float32", "bfloat16")


def random_pipeline(preset: str = "small", num_embeddings: int = 16384, grid_size: int = 16, num_classes: int = 1000,
                    tokenizer_config: dict | None = None, seed: int = 0) -> XDLMPipeline:
    """Build a pipeline with random weights; the tokenizer has LlamaGen VQ-16's layers unless a config is given."""
    torch.manual_seed(seed)
    transformer = XDLMTransformer.from_preset(preset, num_embeddings=num_embeddings, grid_size=grid_size,
                                              num_classes=num_classes).eval()
    if tokenizer_config is None:
        # Only the codebook's shape is read from the state dict; LlamaGen VQ-16 uses 8-dimensional codes.
        shape_only = {"quantize.embedding.weight": torch.empty(num_embeddings, 8)}
        tokenizer_config = llamagen_vq16_config(shape_only, image_size=grid_size * 16)
    vqvae = VQTokenizer(**tokenizer_config).eval()
    scheduler = XDLMScheduler(num_embeddings=num_embeddings)
    pipeline = XDLMPipeline(vqvae=vqvae, transformer=transformer, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def shipped_pipeline(path: str | Path | None = None) -> tuple[XDLMPipeline, str]:
    """Load the shipped Fashion-MNIST pipeline; without it, pair the shipped tokenizer with a random `tiny` transformer."""
    folder = Path(path) if path is not None else SHIPPED_PIPELINE
    if (folder / "model_index.json").is_file():
        pipeline = XDLMPipeline.from_pretrained(folder)
        description = f"{folder.name} (trained)"
    else:
        if path is not None:
            raise ValueError(f"pipeline folder {folder} has no model_index.json; pass a folder saved by save_pretrained")
        torch.manual_seed(0)
        vqvae = VQTokenizer.from_pretrained(SHIPPED_TOKENIZER).eval()
        transformer = XDLMTransformer.from_preset("tiny", num_embeddings=vqvae.config.num_embeddings,
                                                  grid_size=vqvae.config.grid_size, num_classes=10).eval()
        scheduler = XDLMScheduler(num_embeddings=vqvae.config.num_embeddings)
        pipeline = XDLMPipeline(vqvae=vqvae, transformer=transformer, scheduler=scheduler)
        description = f"{SHIPPED_TOKENIZER.name} + random tiny transformer (no trained pipeline at {folder})"
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, description


def precision_context(precision: str, device: torch.device):
    """Autocast context of a precision name: bfloat16 autocast, or nothing for float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; use one of {list(PRECISIONS)}")
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_sampling(pipeline: XDLMPipeline, batch_size: int, num_steps: int, guidance_scale: float, precision: str,
                  repeats: int, seed: int = 0) -> dict:
    """Sample `repeats` batches and return the median total and per-component times (seconds per pipeline call)."""
    device = pipeline.transformer.device
    num_classes = pipeline.transformer.config.num_classes
    labels = [i % num_classes for i in range(batch_size)]
    timer = ComponentTimer(device)

    def sample_once(steps: int):
        generator = torch.Generator().manual_seed(seed)
        with precision_context(precision, device):
            return pipeline(labels, num_steps=steps, guidance_scale=guidance_scale, generator=generator,
                            output_type="pt").images

    sample_once(1)  # warm-up: kernel selection and first-touch memory, at the cost of one step
    totals, parts = [], {name: [] for name in COMPONENTS}
    with contextlib.ExitStack() as stack:
        stack.enter_context(timer.wrap(pipeline.transformer, "forward", "transformer_forward"))
        stack.enter_context(timer.wrap(pipeline.scheduler, "apply_guidance", "guidance"))
        stack.enter_context(timer.wrap(pipeline.scheduler, "step", "scheduler_step"))
        stack.enter_context(timer.wrap(pipeline.vqvae, "decode", "tokenizer_decode"))
        for _ in range(repeats):
            timer.reset()
            synchronize(device)
            start = time.perf_counter()
            images = sample_once(num_steps)
            synchronize(device)
            total = time.perf_counter() - start
            assert torch.isfinite(images).all(), "sampled images contain NaN or inf"
            totals.append(total)
            for name in COMPONENTS[:-1]:
                parts[name].append(timer.seconds.get(name, 0.0))
            parts["rest"].append(total - sum(timer.seconds.values()))
            forward_calls = timer.calls.get("transformer_forward", 0)

    total = statistics.median(totals)
    components = {name: statistics.median(values) for name, values in parts.items()}
    return {
        "precision": precision,
        "guidance_scale": guidance_scale,
        "total_s": total,
        "times_s": totals,
        "components_s": components,
        "share": {name: value / total for name, value in components.items()},
        "non_forward_share": 1.0 - components["transformer_forward"] / total,
        "non_forward_share_without_decode": (total - components["transformer_forward"] - components["tokenizer_decode"])
        / (total - components["tokenizer_decode"]),
        "forward_calls": forward_calls,
        "forward_s_per_call": components["transformer_forward"] / max(forward_calls, 1),
        "images_per_s": batch_size / total,
    }


def measure_pipeline(pipeline: XDLMPipeline, name: str, batch_size: int, num_steps: int, guidance_scale: float,
                     precisions: tuple[str, ...], repeats: int, peaks: dict) -> dict:
    """Time one pipeline with and without guidance in every precision; add the forward's achieved FLOP/s."""
    flops = {rows: transformer_forward_flops(pipeline.transformer.config, rows * batch_size) for rows in (1, 2)}
    runs = []
    for precision in precisions:
        for scale in (1.0, guidance_scale):
            logger.info("bench sample: %s, %s, guidance %.1f", name, precision, scale)
            run = time_sampling(pipeline, batch_size, num_steps, scale, precision, repeats)
            rows_per_forward = 1 if scale == 1.0 else 2
            achieved = flops[rows_per_forward] / run["forward_s_per_call"]
            peak = peaks[precision]["flop_per_s"]
            run["forward_flop"] = flops[rows_per_forward]
            run["forward_flop_per_s"] = achieved
            run["forward_fraction_of_matmul_peak"] = achieved / peak
            runs.append(run)

    # Speed-up of bfloat16 autocast over float32 at equal guidance, from the same run.
    for run in runs:
        if run["precision"] == "bfloat16":
            reference = next(r for r in runs if r["precision"] == "float32" and r["guidance_scale"] == run["guidance_scale"])
            run["speedup_vs_float32"] = reference["total_s"] / run["total_s"]
            run["forward_speedup_vs_float32"] = reference["forward_s_per_call"] / run["forward_s_per_call"]
    config = pipeline.transformer.config
    return {
        "name": name,
        "transformer": {"hidden_size": config.hidden_size, "depth": config.depth, "num_heads": config.num_heads,
                        "num_embeddings": config.num_embeddings, "grid_size": config.grid_size,
                        "num_classes": config.num_classes,
                        "parameters": sum(p.numel() for p in pipeline.transformer.parameters())},
        "tokenizer_image_size": pipeline.vqvae.config.image_size,
        "runs": runs,
    }


def fid_by_precision(pipeline: XDLMPipeline, num_samples: int, num_steps: int, out_dir: Path, seed: int = 0) -> dict:
    """FID of the pipeline's samples in float32 and with the transformer under bfloat16 autocast, same seeds.

    The extractor is the shipped Fashion-MNIST classifier and the reference the Fashion-MNIST test split,
    so the numbers compare precisions with each other, not with published Inception FIDs.
    """
    from xdlm_vision.metrics.fid import run_fid_job

    results = {}
    forward = pipeline.transformer.forward
    for precision in PRECISIONS:
        if precision == "bfloat16":
            # Only the transformer runs in bfloat16, so the classifier's features stay comparable.
            def forward_in_bfloat16(*args, **kwargs):
                with torch.autocast(pipeline.transformer.device.type, dtype=torch.bfloat16):
                    return forward(*args, **kwargs)

            pipeline.transformer.forward = forward_in_bfloat16
        try:
            payload = run_fid_job([pipeline], num_steps=[num_steps], num_samples=num_samples, extractor="classifier",
                                  out_dir=out_dir / precision, seed=seed, batch_size=min(100, num_samples),
                                  cache_dir=out_dir / "reference-cache")
        finally:
            if "forward" in vars(pipeline.transformer):
                del pipeline.transformer.forward
        results[precision] = payload["results"][0]["metrics"]["fid"]
    return {"num_samples": num_samples, "num_steps": num_steps, "seed": seed, "extractor": "classifier",
            "reference": "fashion-mnist:test", "fid": results, "fid_change": results["bfloat16"] - results["float32"]}


def run_sample_bench(batch_size: int = 8, num_steps: int = 8, guidance_scale: float = 2.0, repeats: int = 1,
                     precisions: tuple[str, ...] = PRECISIONS, fid_samples: int = 0, device: str = "cpu",
                     small: XDLMPipeline | None = None, shipped: XDLMPipeline | None = None,
                     shipped_path: str | None = None, work_dir: Path | None = None, matmul_size: int | None = None) -> dict:
    """Measure the `small` and the shipped pipeline; `small`/`shipped` replace them (tests pass toy pipelines)."""
    device = torch.device(device)
    # A 2048 matmul saturates a CPU; a GPU needs larger products to approach its peak.
    matmul_size = matmul_size or (8192 if device.type == "cuda" else 2048)
    peaks = matmul_peaks(matmul_size, device)
    small = small if small is not None else random_pipeline()
    if shipped is None:
        shipped, shipped_description = shipped_pipeline(shipped_path)
    else:
        shipped_description = "given pipeline"
    small.to(device)
    shipped.to(device)

    results = {
        "batch_size": batch_size, "num_steps": num_steps, "guidance_scale": guidance_scale, "repeats": repeats,
        "device": str(device), "matmul_peak": peaks,
        "pipelines": [
            measure_pipeline(small, "small (random weights, LlamaGen VQ-16 shape)", batch_size, num_steps,
                             guidance_scale, precisions, repeats, peaks),
            measure_pipeline(shipped, shipped_description, batch_size, num_steps, guidance_scale, precisions,
                             repeats, peaks),
        ],
    }
    # The peak is measured again after the runs; the fractions use the better of the two measurements.
    results["matmul_peak"] = matmul_peaks(matmul_size, device, previous=peaks)
    for pipeline in results["pipelines"]:
        for run in pipeline["runs"]:
            run["forward_fraction_of_matmul_peak"] = run["forward_flop_per_s"] / results["matmul_peak"][run["precision"]]["flop_per_s"]
    if fid_samples:
        import tempfile

        with tempfile.TemporaryDirectory(dir=work_dir) as folder:
            results["fid_by_precision"] = fid_by_precision(shipped, fid_samples, num_steps, Path(folder))
        results["fid_by_precision"]["pipeline"] = shipped_description
    return results


def format_sample_table(results: dict) -> str:
    """Render the sampling benchmark as a plain-text table (milliseconds per pipeline call)."""
    header = (f"{'pipeline':<10}{'precision':<10}{'w':>4}{'total ms':>10}{'forward':>10}{'guidance':>10}{'step':>9}"
              f"{'decode':>9}{'rest':>8}{'non-fwd':>9}{'no-dec':>8}{'GFLOP/s':>9}{'of peak':>9}")
    lines = [header]
    for pipeline in results["pipelines"]:
        short = pipeline["name"].split(" ")[0][:9]
        for run in pipeline["runs"]:
            parts = run["components_s"]
            lines.append(
                f"{short:<10}{run['precision']:<10}{run['guidance_scale']:>4.1f}{run['total_s'] * 1e3:>10.0f}"
                f"{parts['transformer_forward'] * 1e3:>10.0f}{parts['guidance'] * 1e3:>10.0f}"
                f"{parts['scheduler_step'] * 1e3:>9.0f}{parts['tokenizer_decode'] * 1e3:>9.0f}{parts['rest'] * 1e3:>8.0f}"
                f"{run['non_forward_share']:>9.1%}{run['non_forward_share_without_decode']:>8.1%}"
                f"{run['forward_flop_per_s'] / 1e9:>9.1f}{run['forward_fraction_of_matmul_peak']:>9.1%}"
            )
    peaks = results["matmul_peak"]
    lines.append("matmul peak: " + ", ".join(f"{p['dtype']} {p['flop_per_s'] / 1e9:.1f} GFLOP/s" for p in peaks.values()))
    for pipeline in results["pipelines"]:
        for run in pipeline["runs"]:
            if "speedup_vs_float32" in run:
                lines.append(f"{pipeline['name'].split(' ')[0]}: bfloat16 autocast speed-up at w={run['guidance_scale']:g}: "
                             f"{run['speedup_vs_float32']:.2f}x total, {run['forward_speedup_vs_float32']:.2f}x forward")
    if "fid_by_precision" in results:
        fid = results["fid_by_precision"]
        lines.append(f"FID ({fid['num_samples']} samples, classifier features): float32 {fid['fid']['float32']:.2f}, "
                     f"bfloat16 {fid['fid']['bfloat16']:.2f}, change {fid['fid_change']:+.2f}")
    return "\n".join(lines)
