"""`xdlm-vision bench`: speed and memory measurements, each printed as a table and written as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BENCHMARKS = ("scheduler", "scaling")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark to run")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results (default: bench-<name>.json)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default: 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="scheduler: batch size B (default: 8)")
    parser.add_argument("--num-tokens", type=int, default=256, help="scheduler: tokens per image L (default: 256)")
    parser.add_argument("--num-embeddings", type=int, default=16384, help="scheduler: codebook size N (default: 16384)")
    parser.add_argument("--plot", type=Path, default=None, help="scaling: also save a log-log PNG plot here")


def machine_description() -> dict:
    """Facts about the machine that a benchmark record needs."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=2)
        temporary = handle.name
    os.replace(temporary, path)


def run(args: argparse.Namespace) -> int:
    for name in ("repeats", "batch_size", "num_tokens", "num_embeddings"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    out = args.out or Path(f"bench-{args.benchmark}.json")

    if args.benchmark == "scheduler":
        from xdlm_vision.bench.scheduler_bench import format_scheduler_table, run_scheduler_bench

        results = run_scheduler_bench(args.batch_size, args.num_tokens, args.num_embeddings, repeats=args.repeats)
        table = format_scheduler_table(results)
    elif args.benchmark == "scaling":
        from xdlm_vision.bench.scaling_bench import format_scaling_table, plot_scaling, run_scaling_bench

        results = run_scaling_bench(repeats=args.repeats)
        table = format_scaling_table(results)
        if args.plot is not None:
            plot_scaling(results, args.plot)

    results["machine"] = machine_description()
    results["command"] = f"xdlm-vision bench {args.benchmark}"
    write_json_atomic(out, results)
    print(table)
    print(f"wrote {out}")
    return 0
