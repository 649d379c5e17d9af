"""Export of a trained pipeline folder (tokenizer + EMA transformer + scheduler + class names).

The folder loads with `XDLMPipeline.from_pretrained`. `xdlm-vision train` exports one at the end of a
run; `xdlm-vision train --export CHECKPOINT` exports any checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from xdlm_vision.training.checkpoint import DATA_META_FILE, resolve_checkpoint
from xdlm_vision.training.config import TrainConfig, load_config

logger = logging.getLogger(__name__)


def resolve_tokenizer_path(config: TrainConfig, meta: dict[str, Any]) -> str:
    """Return the tokenizer of a run: `training.tokenizer` if set, else the one named in the shards' meta.json."""
    spec = config.training.tokenizer or meta.get("tokenizer")
    if not spec:
        raise ValueError("no tokenizer: meta.json names none; set training.tokenizer=PATH (a VQTokenizer folder)")
    if os.path.exists(spec):
        return str(spec)
    # A relative path in meta.json may be relative to the shard folder rather than the working directory.
    beside_shards = Path(config.data.shards) / spec
    if beside_shards.exists():
        return str(beside_shards)
    raise ValueError(f"tokenizer {spec!r} not found; set training.tokenizer=PATH (a VQTokenizer folder or LlamaGen .pt)")


def load_checked_tokenizer(path: str, meta: dict[str, Any]):
    """Load the tokenizer and check that its codebook and grid agree with the token shards."""
    from xdlm_vision.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    for name in ("num_embeddings", "grid_size"):
        if int(getattr(tokenizer.config, name)) != int(meta[name]):
            raise ValueError(
                f"{name} of the tokenizer {path!r} is {getattr(tokenizer.config, name)} but the token shards' "
                f"meta.json has {meta[name]}; set training.tokenizer to the tokenizer that encoded the shards"
            )
    return tokenizer


def build_pipeline(tokenizer, transformer, config: TrainConfig, class_names: list[str] | None):
    """Assemble an XDLMPipeline around in-memory components (no copies)."""
    from xdlm_vision.pipeline import XDLMPipeline
    from xdlm_vision.scheduler import XDLMScheduler

    scheduler = XDLMScheduler(
        num_embeddings=transformer.config.num_embeddings,
        mixing_ratio=config.scheduler.mixing_ratio,
        noise_schedule=config.scheduler.noise_schedule,
        eps=config.scheduler.eps,
    )
    return XDLMPipeline(vqvae=tokenizer, transformer=transformer, scheduler=scheduler, id2label=class_names or None)


def save_pipeline(pipeline, output_dir: str | os.PathLike) -> Path:
    """Write the pipeline under a temporary name beside `output_dir`, then swap it in place."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_dir.with_name(f".{output_dir.name}.tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    pipeline.save_pretrained(temporary, safe_serialization=True)

    # os.replace cannot overwrite a folder, so an older export is moved aside first.
    previous = output_dir.with_name(f".{output_dir.name}.old")
    if previous.exists():
        shutil.rmtree(previous)
    if output_dir.exists():
        os.replace(output_dir, previous)
    os.replace(temporary, output_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return output_dir


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    run_dir: str | os.PathLike | None = None,
) -> Path:
    """Export the EMA weights of a checkpoint as a pipeline folder.

    Args:
        checkpoint: a `checkpoints/step-NNNNNNNN` folder, a run folder (its newest checkpoint), or "latest".
        output_dir: the pipeline folder; defaults to `{run}/pipeline-step-NNNNNNNN`.
        tokenizer: tokenizer folder; defaults to the run's `training.tokenizer` or the shards' meta.json.
        run_dir: the run folder that "latest" refers to.
    """
    from xdlm_vision.training.token_data import read_meta
    from xdlm_vision.transformer import XDLMTransformer

    folder = resolve_checkpoint(checkpoint, run_dir or ".")
    if folder is None:
        raise ValueError(f"no complete checkpoint in {str(Path(run_dir or '.') / 'checkpoints')!r}")
    config = load_config(folder / "config.yaml")
    if tokenizer is not None:
        config.training.tokenizer = tokenizer
    # The checkpoint keeps a copy of the shards' meta.json, so the shards need not exist any more.
    meta_copy = folder / DATA_META_FILE
    meta = json.loads(meta_copy.read_text(encoding="utf-8")) if meta_copy.is_file() else read_meta(config.data.shards)
    tokenizer_model = load_checked_tokenizer(resolve_tokenizer_path(config, meta), meta)
    transformer = XDLMTransformer.from_pretrained(folder / "ema").eval()

    pipeline = build_pipeline(tokenizer_model, transformer, config, meta.get("class_names"))
    output_dir = Path(output_dir) if output_dir is not None else folder.parent.parent / f"pipeline-{folder.name}"
    save_pipeline(pipeline, output_dir)
    logger.info("exported the EMA weights of %s to %s", folder, output_dir)
    return output_dir
