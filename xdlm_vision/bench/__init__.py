"""`xdlm-vision bench`: speed and memory measurements, each printed as a table and written as JSON."""

from __future__ import annotations

import argparse
import logging
import os
import platform
from pathlib import Path

import torch

from xdlm_vision.atomic import write_json_atomic

logger = logging.getLogger(__name__)

BENCHMARKS = ("scheduler", "sample", "train", "scaling")

# Timed repeats when --repeats is not given: sampling the `small` preset takes about a minute per call
# on two CPU cores, so it is repeated less than the scheduler's millisecond operations.
DEFAULT_REPEATS = {"scheduler": 5, "scaling": 5, "sample": 2, "train": 3}
PRECISION_CHOICES = {"float32": ("float32",), "bfloat16": ("bfloat16",), "both": ("float32", "bfloat16")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark to run")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results (default: bench-<name>.json)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement; for train, timed steps after one warm-up step "
                        f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_REPEATS.items())})")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="scheduler and sample: batch size B; train: batch size of the small setup (default: 8)")
    parser.add_argument("--num-tokens", type=int, default=256, help="scheduler: tokens per image L (default: 256)")
    parser.add_argument("--num-embeddings", type=int, default=16384, help="scheduler: codebook size N (default: 16384)")
    parser.add_argument("--plot", type=Path, default=None, help="scaling: also save a log-log PNG plot here")
    parser.add_argument("--num-steps", type=int, default=8, help="sample: reverse steps per image (default: 8)")
    parser.add_argument("--guidance-scale", type=float, default=2.0,
                        help="sample: guidance weight of the guided runs; unguided runs use 1 (default: 2.0)")
    parser.add_argument("--precision", choices=sorted(PRECISION_CHOICES), default="both",
                        help="sample and train: float32, bfloat16 autocast, or both for the speed-up (default: both)")
    parser.add_argument("--pipeline", default=None,
                        help="sample: trained pipeline folder to measure beside `small` (default: "
                        "pipelines/fashion-mnist-xdlm, else the shipped tokenizer with a random tiny transformer)")
    parser.add_argument("--fid-samples", type=int, default=0,
                        help="sample: also score FID of the Fashion-MNIST pipeline in float32 and bfloat16 on this "
                        "many samples with the shipped classifier as extractor (default: 0, skip)")
    parser.add_argument("--tiny-batch-size", type=int, default=64, help="train: batch size of the tiny setup (default: 64)")
    parser.add_argument("--setups", nargs="+", choices=("tiny", "small"), default=["tiny", "small"],
                        help="train: which setups to run (default: tiny small)")
    parser.add_argument("--device", default="cpu", help="sample and train: torch device, e.g. cuda (default: cpu)")


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (as lscpu prints it), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    """Facts about the machine that a benchmark record needs, with the 1-minute load average when called."""
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "load_average_1m": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run(args: argparse.Namespace) -> int:
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS[args.benchmark]
    for name in ("repeats", "batch_size", "num_tokens", "num_embeddings", "num_steps", "tiny_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.fid_samples < 0:
        raise ValueError(f"--fid-samples must be >= 0, got {args.fid_samples}")
    out = args.out or Path(f"bench-{args.benchmark}.json")
    machine_at_start = machine_description()

    if args.benchmark == "scheduler":
        from xdlm_vision.bench.scheduler_bench import format_scheduler_table, run_scheduler_bench

        results = run_scheduler_bench(args.batch_size, args.num_tokens, args.num_embeddings, repeats=args.repeats)
        table = format_scheduler_table(results)
    elif args.benchmark == "sample":
        from xdlm_vision.bench.sample_bench import format_sample_table, run_sample_bench

        results = run_sample_bench(args.batch_size, args.num_steps, args.guidance_scale, repeats=args.repeats,
                                   precisions=PRECISION_CHOICES[args.precision], fid_samples=args.fid_samples,
                                   device=args.device, shipped_path=args.pipeline)
        table = format_sample_table(results)
    elif args.benchmark == "train":
        from xdlm_vision.bench.train_bench import format_train_table, run_train_bench

        results = run_train_bench(steps=args.repeats, tiny_batch_size=args.tiny_batch_size,
                                  small_batch_size=args.batch_size, precisions=PRECISION_CHOICES[args.precision],
                                  device=args.device, setups=tuple(args.setups))
        table = format_train_table(results)
    elif args.benchmark == "scaling":
        from xdlm_vision.bench.scaling_bench import format_scaling_table, plot_scaling, run_scaling_bench

        results = run_scaling_bench(repeats=args.repeats)
        table = format_scaling_table(results)
        if args.plot is not None:
            plot_scaling(results, args.plot)

    results["machine"] = machine_at_start
    results["load_average_1m_at_end"] = os.getloadavg()[0]
    results["command"] = f"xdlm-vision bench {args.benchmark}"
    results["options"] = {name: value if isinstance(value, (int, float, str, list, type(None))) else str(value)
                          for name, value in vars(args).items() if name not in ("command", "benchmark")}
    write_json_atomic(out, results)
    print(table)
    print(f"wrote {out}")
    return 0
