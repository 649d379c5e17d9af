"""Training checkpoints: the folder layout, atomic writes, discovery of the latest one, and pruning.

A checkpoint is a folder `checkpoints/step-00001000/` holding

    transformer/            the trained weights (a diffusers model folder, safetensors)
    ema/                    the EMA weights (same format; what a pipeline export uses)
    optimizer.pt            AdamW state (tensors only; read with torch.load(weights_only=True))
    training_state.json     step, data position, learning-rate schedule state, batch layout
    rng-<rank>.pt           random number generator states of each process
    config.yaml             the training config of the run
    data_meta.json          a copy of the token shards' meta.json (class names, tokenizer)
    COMPLETE                written last

It is written under `.step-00001000.tmp` and renamed when complete, so a folder without the
`.tmp` suffix and with `COMPLETE` is always whole. All processes must share the output folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
TRAINING_STATE_FILE = "training_state.json"
DATA_META_FILE = "data_meta.json"
_STEP_FOLDER = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(folder: Path) -> bool:
    return _STEP_FOLDER.match(folder.name) is not None and (folder / COMPLETE_MARKER).is_file()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [path for path in root.iterdir() if path.is_dir() and is_complete(path)]
    return sorted(folders, key=lambda path: int(_STEP_FOLDER.match(path.name).group(1)))


def resolve_checkpoint(spec: str | os.PathLike, run_dir: str | os.PathLike) -> Path | None:
    """Find the checkpoint named by `spec`: "latest" (newest in `run_dir`), a run folder, or a checkpoint folder.

    Returns None for "latest" when the run has no complete checkpoint yet; raises ValueError when an
    explicit path is missing or incomplete.
    """
    if str(spec) == "latest":
        found = list_checkpoints(Path(run_dir) / "checkpoints")
        return found[-1] if found else None

    path = Path(spec)
    if is_complete(path):
        return path
    if (path / "checkpoints").is_dir():
        found = list_checkpoints(path / "checkpoints")
        if found:
            return found[-1]
        raise ValueError(f"run folder {str(path)!r} has no complete checkpoint")
    if path.is_dir() and _STEP_FOLDER.match(path.name):
        raise ValueError(f"checkpoint {str(path)!r} lacks its {COMPLETE_MARKER} marker (an interrupted write); "
                         "use an earlier checkpoint")
    raise ValueError(f"checkpoint {str(path)!r} not found; pass a checkpoints/step-NNNNNNNN folder, a run folder or 'latest'")


def rng_state() -> dict[str, Any]:
    """Return the states of the global Python, NumPy and torch generators, in types that torch.load(weights_only=True) reads."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_folder(root: Path, step: int) -> Path:
    return root / f".{checkpoint_name(step)}.tmp"


def finalize(root: Path, step: int) -> Path:
    """Mark the temporary folder of `step` complete and rename it to its final name (main process only)."""
    temporary = temporary_folder(root, step)
    marker = temporary / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as file:
        file.write(f"{step}\n")
        file.flush()
        os.fsync(file.fileno())

    final = root / checkpoint_name(step)
    if final.exists():
        # A checkpoint of the same step from an earlier attempt: replace it.
        shutil.rmtree(final)
    os.replace(temporary, final)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints, and leftover temporary folders."""
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        logger.debug("deleted old checkpoint %s", old)


def read_training_state(folder: Path) -> dict[str, Any]:
    with open(folder / TRAINING_STATE_FILE, encoding="utf-8") as file:
        return json.load(file)


def write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2)
    os.replace(temporary, path)
