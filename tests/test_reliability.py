"""Faults, bad input and safe loading across the product: each test injects one fault and checks the outcome.

docs/RELIABILITY.md lists every fault tried, what happens, and the test that proves it (here or elsewhere).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import NetworkAccessError
from test_training import REPO, WEIGHTS, subprocess_env, tiny_config, write_random_shards
from xdlm_vision.cli import COMMANDS
from xdlm_vision.cli import main as cli_main
from xdlm_vision.training import checkpoint as ckpt
from xdlm_vision.training.config import save_config
from xdlm_vision.training.trainer import NonFiniteLossError, train

torch.set_num_threads(1)


def test_network_guard_blocks_remote_addresses():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NetworkAccessError):
            sock.connect(("192.0.2.1", 80))  # TEST-NET-1, reserved for documentation
    finally:
        sock.close()


# ------------------------------------------------------------------ helpers


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """Model and EMA weights of a checkpoint folder, with prefixed names."""
    return {**{f"model.{k}": v for k, v in load_file(folder / "transformer" / WEIGHTS).items()},
            **{f"ema.{k}": v for k, v in load_file(folder / "ema" / WEIGHTS).items()}}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; argparse's exit becomes a return code."""
    try:
        code = cli_main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str) -> None:
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 6-step run with a checkpoint after every step, and its shards."""
    root = tmp_path_factory.mktemp("reference")
    shards = write_random_shards(root / "shards", num_samples=20, num_shards=2)
    config = tiny_config(shards, root / "run", "training.checkpoint_every=1", "training.keep_checkpoints=10")
    result = train(config)
    return shards, weights_of(result.checkpoint)


# ------------------------------------------------------------------ training killed, stopped, poisoned, disk full

KILL_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
from xdlm_vision.training import checkpoint as ckpt
from xdlm_vision.training.config import load_config
from xdlm_vision.training.trainer import train

finalize = ckpt.finalize

def slow_finalize(root, step):
    time.sleep(float(sys.argv[2]))  # every file of the checkpoint is written, the COMPLETE marker is not
    return finalize(root, step)

ckpt.finalize = slow_finalize
train(load_config(sys.argv[1]), resume="latest")
"""


@pytest.mark.parametrize("kill_point", ["during-checkpoint-write", "random-step"])
def test_sigkill_resume_matches_uninterrupted_run(tmp_path, reference_run, kill_point):
    shards, expected = reference_run
    run_dir = tmp_path / "run"
    config = tiny_config(shards, run_dir, "training.checkpoint_every=1", "training.keep_checkpoints=10")
    config_path = tmp_path / "config.yaml"
    save_config(config, config_path)
    rng = random.Random(f"kill/{os.getpid()}/{time.time_ns()}")
    delay = "1.5" if kill_point == "during-checkpoint-write" else "0.3"  # the random kill must land before the end
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(config_path), delay], env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = run_dir / "checkpoints"
    if kill_point == "during-checkpoint-write":
        # Kill once the step-3 checkpoint is fully written under its temporary name but not yet marked complete.
        ready = lambda: (root / ".step-00000003.tmp" / "config.yaml").is_file()  # noqa: E731
    else:
        target_rows, extra_sleep = rng.randint(1, 4), rng.uniform(0.0, 0.3)
        ready = lambda: (run_dir / "metrics.csv").is_file() and \
            len((run_dir / "metrics.csv").read_text().splitlines()) > target_rows  # noqa: E731
    deadline = time.monotonic() + 300  # generous: a loaded machine starts Python and torch slowly
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.02)
    if kill_point == "random-step":
        time.sleep(extra_sleep)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    assert ready(), f"the run did not reach the kill point ({kill_point}) in time"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()

    complete = [path.name for path in ckpt.list_checkpoints(root)]
    if kill_point == "during-checkpoint-write":
        assert complete == ["step-00000001", "step-00000002"]
        assert (root / ".step-00000003.tmp").is_dir()  # the half-made checkpoint is there ...
        assert ckpt.resolve_checkpoint("latest", run_dir) == root / "step-00000002"  # ... and never picked
    for name in complete:  # every checkpoint that counts as complete loads
        assert weights_of(root / name).keys() == expected.keys()

    resumed = train(config, resume="latest")
    assert resumed.step == 6
    assert not list(root.glob(".*.tmp"))
    for name, value in weights_of(resumed.checkpoint).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_sigint_writes_final_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of step 3 (sent to this process): step 3 finishes, is saved, and the CLI returns 130."""
    from xdlm_vision.scheduler import XDLMScheduler

    shards = write_random_shards(tmp_path / "shards", num_samples=40, num_shards=2)
    config_path = tmp_path / "config.yaml"
    save_config(tiny_config(shards, tmp_path / "run", "training.max_steps=100", "training.checkpoint_every=100"),
                config_path)
    original_loss = XDLMScheduler.loss
    calls = {"count": 0}

    def loss_then_interrupt(self, *args):
        calls["count"] += 1
        if calls["count"] == 5:  # first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return original_loss(self, *args)

    monkeypatch.setattr(XDLMScheduler, "loss", loss_then_interrupt)
    code, _, err = run_cli(["train", "--config", str(config_path)], capsys)

    assert code == 128 + signal.SIGINT
    assert "Traceback" not in err
    (folder,) = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert folder.name == "step-00000003"
    assert ckpt.read_training_state(folder)["batches_consumed"] == 6
    assert all(torch.isfinite(value).all() for value in weights_of(folder).values())


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")], ids=["inf", "minus-inf"])
def test_infinite_loss_names_step_keys_and_last_checkpoint(tmp_path, monkeypatch, bad):
    from xdlm_vision.scheduler import XDLMScheduler

    shards = write_random_shards(tmp_path / "shards", num_samples=20, num_shards=1)
    original_loss = XDLMScheduler.loss
    calls = {"count": 0}

    def poisoned_loss(self, logits, noisy, tokens, t):
        calls["count"] += 1
        loss = original_loss(self, logits, noisy, tokens, t)
        return loss + bad if calls["count"] == 6 else loss  # second micro-batch of step 3

    monkeypatch.setattr(XDLMScheduler, "loss", poisoned_loss)
    config = tiny_config(shards, tmp_path / "run", "training.checkpoint_every=1")
    with pytest.raises(NonFiniteLossError) as raised:
        train(config)
    message = str(raised.value)
    assert "step 3" in message
    assert re.search(r"keys \['\d{8}'", message)
    assert f"last: {tmp_path / 'run' / 'checkpoints' / 'step-00000002'}" in message
    folders = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [folder.name for folder in folders] == ["step-00000001", "step-00000002"]
    assert all(torch.isfinite(value).all() for value in weights_of(folders[-1]).values())


def test_disk_full_during_checkpoint_keeps_previous(tmp_path, monkeypatch, capsys):
    shards = write_random_shards(tmp_path / "shards", num_samples=20, num_shards=1)
    config = tiny_config(shards, tmp_path / "run")
    config_path = tmp_path / "config.yaml"
    save_config(config, config_path)
    real_save = torch.save

    def save_until_disk_full(obj, path, *args, **kwargs):
        if ".step-00000006.tmp" in str(path) and Path(path).name == "optimizer.pt":
            Path(path).write_bytes(b"\0" * 100)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    code, _, err = run_cli(["train", "--config", str(config_path)], capsys)

    assert_one_line_error(code, err)
    assert code == 2
    assert "No space left on device" in err
    root = tmp_path / "run" / "checkpoints"
    assert [folder.name for folder in ckpt.list_checkpoints(root)] == ["step-00000003"]
    assert ckpt.resolve_checkpoint("latest", tmp_path / "run") == root / "step-00000003"
    assert ckpt.read_training_state(root / "step-00000003")["step"] == 3
    weights_of(root / "step-00000003")  # loads

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes and finishes
    assert train(config, resume="latest").step == 6


# ------------------------------------------------------------------ damaged input


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garble_member(path: Path) -> None:
    """Keep the tar structure but replace the first tokens.npy by bytes that are no .npy file."""
    import tarfile

    with tarfile.open(path) as archive:
        members = [(info, archive.extractfile(info).read()) for info in archive.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for index, (info, data) in enumerate(members):
            if index == 0:
                data = b"not a numpy file" * 4
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("damage", [truncate, empty, garble_member], ids=["truncated", "empty", "bad-member"])
def test_train_strict_damaged_shard_one_line_error(tmp_path, capsys, damage):
    shards = write_random_shards(tmp_path / "shards", num_samples=20, num_shards=2)
    damage(shards / "train-000001.tar")
    config_path = tmp_path / "config.yaml"
    save_config(tiny_config(shards, tmp_path / "run", "data.strict=true"), config_path)
    code, _, err = run_cli(["train", "--config", str(config_path)], capsys)

    assert_one_line_error(code, err)
    assert code == 2
    assert "train-000001.tar" in err
    assert "damaged" in err or "cannot be parsed" in err
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints") == []


@pytest.mark.parametrize("damage", [truncate, empty, garble_member], ids=["truncated", "empty", "bad-member"])
def test_train_skips_and_counts_damaged_shard(tmp_path, capsys, caplog, damage):
    shards = write_random_shards(tmp_path / "shards", num_samples=30, num_shards=3)
    damage(shards / "train-000001.tar")
    config_path = tmp_path / "config.yaml"
    save_config(tiny_config(shards, tmp_path / "run"), config_path)
    with caplog.at_level(logging.WARNING):
        code, out, _ = run_cli(["train", "--config", str(config_path)], capsys)

    assert code == 0
    assert "skipped 1 damaged token shards: train-000001.tar" in out
    skipped = [record.getMessage() for record in caplog.records if "skipping damaged token shard" in record.getMessage()]
    assert len(skipped) == 1
    assert "train-000001.tar" in skipped[0]
    assert any("summary: 1 damaged token shards" in record.getMessage() for record in caplog.records)
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints") != []


def test_train_rejects_all_shards_damaged(tmp_path, capsys):
    shards = write_random_shards(tmp_path / "shards", num_samples=20, num_shards=2)
    truncate(shards / "train-000000.tar")
    empty(shards / "train-000001.tar")
    config_path = tmp_path / "config.yaml"
    save_config(tiny_config(shards, tmp_path / "run"), config_path)
    code, _, err = run_cli(["train", "--config", str(config_path)], capsys)

    assert_one_line_error(code, err)
    assert "every token shard" in err


def test_encode_disk_full_keeps_finished_shard(tmp_path, monkeypatch, capsys):
    from xdlm_vision.data import shards as shards_module

    real_add = shards_module._add_member
    calls = {"count": 0}

    def add_until_disk_full(archive, name, data):
        calls["count"] += 1
        if calls["count"] > 2 * 20 + 7:  # shard 0 (20 images, 2 members each) is done, shard 1 is part-way
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_add(archive, name, data)

    monkeypatch.setattr(shards_module, "_add_member", add_until_disk_full)
    out = tmp_path / "tokens"
    code, out_text, err = run_cli(["encode", "--output-dir", str(out), "--split", "test", "--limit", "40",
                                   "--shard-size", "20", "--threads", "1"], capsys)

    assert_one_line_error(code, err)
    assert "No space left on device" in err
    assert out_text == ""
    assert sorted(path.name for path in out.iterdir() if path.suffix == ".tar") == ["test-000000.tar"]
    assert not list(out.glob(".*.tmp"))
    assert not (out / "meta.json").exists()
    contents = shards_module.read_token_shard(out / "test-000000.tar", grid_size=8, num_embeddings=512)
    assert len(contents.keys) == 20


def test_token_shard_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    from xdlm_vision.data import shards as shards_module

    path = tmp_path / "train-000000.tar"
    grid = np.zeros((2, 2), dtype=np.uint8)
    shards_module.write_token_shard(path, [("00000000", grid, 1)])
    before = path.read_bytes()

    def failing_samples():
        yield "00000000", grid, 2
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):
        shards_module.write_token_shard(path, failing_samples())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def test_nan_after_resume_names_resumed_checkpoint(tmp_path, monkeypatch, reference_run):
    from xdlm_vision.scheduler import XDLMScheduler

    shards, _ = reference_run
    config = tiny_config(shards, tmp_path / "run", "training.max_steps=2", "training.checkpoint_every=2")
    first = train(config)
    original_loss = XDLMScheduler.loss
    monkeypatch.setattr(XDLMScheduler, "loss",
                        lambda self, *args: original_loss(self, *args) * float("nan"))
    config = tiny_config(shards, tmp_path / "run", "training.checkpoint_every=2")
    with pytest.raises(NonFiniteLossError, match=re.escape(f"last: {first.checkpoint}")):
        train(config, resume="latest")


# ------------------------------------------------------------------ safe loading


class WritesMarker:
    """A pickled object whose unpickling creates a file: the stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_pickle(path: Path, marker: Path) -> Path:
    torch.save({"model": {"weight": torch.zeros(2)}, "state": WritesMarker(marker)}, path)
    return path


def test_crafted_pickle_runs_code_without_weights_only(tmp_path):
    """Control: the crafted file really executes code when unpickled in full, so the tests below can fail."""
    marker = tmp_path / "marker"
    path = crafted_pickle(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_crafted_pickle_rejected_by_llamagen_loader(tmp_path):
    from xdlm_vision.tokenizer import VQTokenizer, load_tokenizer

    marker = tmp_path / "marker"
    path = crafted_pickle(tmp_path / "vq_ds16_c2i.pt", marker)
    with pytest.raises(ValueError, match="objects other than tensors"):
        VQTokenizer.from_llamagen_checkpoint(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_tokenizer(path)
    assert not marker.exists()


def test_crafted_pickle_rejected_by_inception_loader(tmp_path):
    from xdlm_vision.metrics.extractor import FeatureExtractorWeightsError, resolve_inception_weights

    marker = tmp_path / "marker"
    path = crafted_pickle(tmp_path / "weights-inception.pth", marker)
    with pytest.raises(FeatureExtractorWeightsError, match="damaged or not a PyTorch state dict"):
        resolve_inception_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize("member, damage", [("optimizer.pt", "crafted"), ("rng-0.pt", "crafted"),
                                            ("optimizer.pt", "truncated")])
def test_unsafe_or_damaged_checkpoint_file_rejected_on_resume(tmp_path, reference_run, capsys, member, damage):
    shards, _ = reference_run
    config = tiny_config(shards, tmp_path / "run", "training.max_steps=1", "training.checkpoint_every=1")
    folder = train(config).checkpoint
    marker = tmp_path / "marker"
    if damage == "crafted":
        crafted_pickle(folder / member, marker)
    else:
        truncate(folder / member)
    config_path = tmp_path / "config.yaml"
    save_config(tiny_config(shards, tmp_path / "run", "training.max_steps=2"), config_path)
    code, _, err = run_cli(["train", "--config", str(config_path), "--resume"], capsys)

    assert_one_line_error(code, err)
    assert member in err
    assert not marker.exists()


def test_pickled_bin_weights_never_loaded_into_pipeline(tmp_path, pipeline_folder):
    from xdlm_vision.pipeline import XDLMPipeline

    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    (folder / "transformer" / WEIGHTS).unlink()
    marker = tmp_path / "marker"
    crafted_pickle(folder / "transformer" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(OSError, match=r"transformer/diffusion_pytorch_model.safetensors not found"):
        XDLMPipeline.from_pretrained(folder)
    assert not marker.exists()


def test_source_loads_pickles_only_with_weights_only():
    sources = {path: path.read_text() for path in (REPO / "xdlm_vision").rglob("*.py")}
    for path, text in sources.items():
        for call in re.finditer(r"torch\.load\(", text):
            line = text[text.rfind("\n", 0, call.start()) + 1: text.find("\n", call.start())]
            if line.lstrip().startswith("#") or "`torch.load" in line or '"' in line.split("torch.load")[0]:
                continue  # a comment or docstring that names the call
            arguments = text[call.end(): text.find(")", text.find("\n", call.start()))]
            assert "weights_only=True" in arguments, f"{path}: {line.strip()}"
        assert "trust_remote_code=True" not in text, path
        assert "allow_pickle=True" not in text, path
        assert not re.search(r"\bpickle\.loads?\(", text), path


# ------------------------------------------------------------------ damaged or mismatched pipeline folders

N = 24  # codebook of the tiny pipeline


def tiny_tokenizer(num_embeddings: int = N):
    from xdlm_vision.tokenizer import VQTokenizer

    torch.manual_seed(0)
    return VQTokenizer(num_embeddings=num_embeddings, image_size=8, block_out_channels=(8, 8),
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       latent_channels=8, norm_num_groups=4)


def tiny_pipeline():
    from xdlm_vision import XDLMPipeline, XDLMScheduler, XDLMTransformer

    tokenizer = tiny_tokenizer()
    transformer = XDLMTransformer(num_embeddings=N, grid_size=tokenizer.config.grid_size, num_classes=3,
                                  hidden_size=32, depth=1, num_heads=2)
    pipe = XDLMPipeline(vqvae=tokenizer, transformer=transformer, scheduler=XDLMScheduler(num_embeddings=N),
                        id2label=["a", "b", "c"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "tiny"
    tiny_pipeline().save_pretrained(folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def swap_tokenizer(folder: Path) -> None:
    shutil.rmtree(folder / "vqvae")
    tiny_tokenizer(num_embeddings=32).save_pretrained(folder / "vqvae")


FOLDER_FAULTS = {
    "missing-component": (lambda folder: shutil.rmtree(folder / "transformer"),
                          OSError, r"lacks its transformer component: .*transformer/config.json not found"),
    "missing-index": (lambda folder: (folder / "model_index.json").unlink(),
                      OSError, r"model_index.json not found"),
    "broken-index": (lambda folder: (folder / "model_index.json").write_text("{not json"),
                     ValueError, r"model_index.json is not valid JSON"),
    "truncated-weights": (lambda folder: truncate(folder / "transformer" / WEIGHTS),
                          OSError, r"transformer/diffusion_pytorch_model.safetensors is damaged or truncated"),
    "garbage-weights": (lambda folder: (folder / "vqvae" / WEIGHTS).write_bytes(b"\x00" * 64),
                        OSError, r"vqvae/diffusion_pytorch_model.safetensors is damaged or truncated"),
    "config-sizes-disagree": (lambda folder: edit_json(folder / "transformer" / "config.json", hidden_size=64),
                              ValueError, r"transformer/diffusion_pytorch_model.safetensors does not match "
                              r".*transformer/config.json .*\(32,\) != \(64,\)"),
    "tokenizer-codebook-disagrees": (swap_tokenizer, ValueError,
                                     r"num_embeddings=32 in .*vqvae/config.json disagrees with num_embeddings=24 in "
                                     r".*transformer/config.json"),
    "scheduler-codebook-disagrees": (lambda folder: edit_json(folder / "scheduler" / "scheduler_config.json",
                                                              num_embeddings=16),
                                     ValueError, r"num_embeddings=16 in .*scheduler_config.json disagrees"),
}


@pytest.mark.parametrize("fault", list(FOLDER_FAULTS))
def test_damaged_pipeline_folder_names_file_and_mismatch(tmp_path, pipeline_folder, fault):
    from xdlm_vision.pipeline import XDLMPipeline

    damage, error, message = FOLDER_FAULTS[fault]
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    damage(folder)
    with pytest.raises(error, match=message):
        XDLMPipeline.from_pretrained(folder)


def test_intact_pipeline_folder_loads(pipeline_folder):
    from xdlm_vision.pipeline import XDLMPipeline

    pipe = XDLMPipeline.from_pretrained(pipeline_folder)
    assert pipe.transformer.config.num_embeddings == N


# ------------------------------------------------------------------ command-line arguments

# Per command: missing, out-of-range, wrong-type and contradictory arguments. {out} is a fresh folder in
# tmp_path, {pipe} the tiny pipeline folder; each case must fail before any job output is written.
BAD_ARGUMENTS = {
    "train-tokenizer/missing-output-dir": ["train-tokenizer"],
    "train-tokenizer/steps-zero": ["train-tokenizer", "--output-dir", "{out}", "--steps", "0"],
    "train-tokenizer/steps-not-int": ["train-tokenizer", "--output-dir", "{out}", "--steps", "ten"],
    "train-tokenizer/learning-rate-negative": ["train-tokenizer", "--output-dir", "{out}", "--learning-rate", "-1"],
    "train-tokenizer/resume-without-checkpoint": ["train-tokenizer", "--output-dir", "{out}", "--resume"],
    "train-tokenizer/image-size-vs-source": ["train-tokenizer", "--output-dir", "{out}", "--image-size", "30"],
    "train-tokenizer/unknown-source": ["train-tokenizer", "--output-dir", "{out}", "--source", "nope"],
    "encode/missing-output-dir": ["encode"],
    "encode/shard-size-zero": ["encode", "--output-dir", "{out}", "--shard-size", "0"],
    "encode/limit-not-int": ["encode", "--output-dir", "{out}", "--limit", "many"],
    "encode/image-size-vs-tokenizer": ["encode", "--output-dir", "{out}", "--image-size", "30", "--limit", "1"],
    "encode/missing-tokenizer": ["encode", "--output-dir", "{out}", "--tokenizer", "{out}/absent", "--limit", "1"],
    "encode/missing-data-dir": ["encode", "--output-dir", "{out}", "--data-dir", "{out}/absent", "--limit", "1"],
    "train/missing-shards": ["train", "training.output_dir={out}"],
    "train/max-steps-zero": ["train", "training.max_steps=0", "training.output_dir={out}"],
    "train/max-steps-not-int": ["train", "training.max_steps=ten", "training.output_dir={out}"],
    "train/unknown-key": ["train", "training.max_step=3", "training.output_dir={out}"],
    "train/missing-config": ["train", "--config", "{out}/absent.yaml"],
    "train/export-missing-checkpoint": ["train", "--export", "{out}/absent", "--export-dir", "{out}/pipe"],
    "fid/num-samples-not-multiple": ["fid", "--pipeline", "{pipe}", "--num-samples", "7", "--extractor", "classifier",
                                     "--out-dir", "{out}", "--no-cache"],
    "fid/batch-size-zero": ["fid", "--pipeline", "{pipe}", "--batch-size", "0", "--out-dir", "{out}", "--no-cache"],
    "fid/batch-size-not-int": ["fid", "--batch-size", "x", "--out-dir", "{out}"],
    "fid/missing-pipeline": ["fid", "--pipeline", "{out}/absent", "--num-samples", "10", "--extractor", "classifier",
                             "--out-dir", "{out}", "--no-cache"],
    "fid/nothing-to-score": ["fid", "--out-dir", "{out}"],
    "fid/unknown-extractor": ["fid", "--extractor", "nope", "--out-dir", "{out}"],
    "train-classifier/epochs-zero": ["train-classifier", "--epochs", "0", "--out", "{out}"],
    "train-classifier/learning-rate-not-float": ["train-classifier", "--learning-rate", "fast", "--out", "{out}"],
    "train-classifier/missing-data-dir": ["train-classifier", "--data-dir", "{out}/absent", "--out", "{out}"],
    "bench/missing-benchmark": ["bench"],
    "bench/unknown-benchmark": ["bench", "nope"],
    "bench/repeats-zero": ["bench", "scheduler", "--repeats", "0", "--out", "{out}/bench.json"],
    "bench/num-tokens-not-int": ["bench", "scheduler", "--num-tokens", "x", "--out", "{out}/bench.json"],
    "sample/num-steps-zero": ["sample", "--pipeline", "{pipe}", "--num-steps", "0", "--out", "{out}/grid.png"],
    "sample/guidance-negative": ["sample", "--pipeline", "{pipe}", "--guidance-scale", "-2", "--out", "{out}/grid.png"],
    "sample/unknown-class": ["sample", "--pipeline", "{pipe}", "--class", "Unicorn", "--out", "{out}/grid.png"],
    "sample/class-out-of-range": ["sample", "--pipeline", "{pipe}", "--class", "12", "--out", "{out}/grid.png"],
    "sample/out-not-png": ["sample", "--pipeline", "{pipe}", "--out", "{out}/grid.txt"],
    "sample/missing-pipeline": ["sample", "--pipeline", "{out}/absent", "--out", "{out}/grid.png"],
    "demo/fid-samples-not-multiple": ["demo", "--pipeline", "{pipe}", "--fid-samples", "7", "--out-dir", "{out}"],
    "demo/num-steps-not-int": ["demo", "--num-steps", "x", "--out-dir", "{out}"],
    "demo/fid-samples-negative": ["demo", "--pipeline", "{pipe}", "--fid-samples", "-10", "--out-dir", "{out}"],
    "cli/unknown-command": ["paint"],
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_cli_bad_arguments_one_line_error_no_output(tmp_path, capsys, pipeline_folder, case):
    command = case.split("/")[0]
    if command != "cli" and command not in COMMANDS:
        pytest.skip(f"command {command} is not in this checkout")
    out = tmp_path / "out"
    argv = [arg.format(out=out, pipe=pipeline_folder) for arg in BAD_ARGUMENTS[case]]
    code, stdout, err = run_cli(argv, capsys)

    assert_one_line_error(code, err)
    assert code == 2
    assert stdout == ""
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written == [], written  # at most an empty output folder


def test_cli_subprocess_exit_code_without_traceback(tmp_path):
    """The real process: exit status 2 and exactly one stderr line, for a value error raised inside a command."""
    result = subprocess.run([sys.executable, "-m", "xdlm_vision", "train", "training.max_steps=0"],
                            env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["xdlm-vision train: error: training.max_steps must be at least 1, got 0"]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ property-based: pipeline and scheduler arguments

NOT_A_NUMBER = st.sampled_from([None, "2", [1], True, False])
ODD_FLOATS = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def is_int_at_least(value, low) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@pytest.fixture(scope="module")
def property_pipeline():
    return tiny_pipeline()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    labels=st.one_of(st.integers(-2, 4), st.lists(st.integers(-1, 3), max_size=3),
                     st.sampled_from(["a", "c", "Unicorn", "", 1.5])),
    num_steps=st.one_of(st.integers(-1, 3), st.floats(-1, 3), NOT_A_NUMBER),
    guidance_scale=st.one_of(st.floats(-2, 3), ODD_FLOATS, st.integers(-1, 3), NOT_A_NUMBER),
    num_images_per_label=st.one_of(st.integers(-1, 2), NOT_A_NUMBER),
    output_type=st.sampled_from(["tokens", "np", "pt", "pil", "latent", None]),
)
def test_pipeline_arguments_valid_run_invalid_raise(property_pipeline, labels, num_steps, guidance_scale,
                                                    num_images_per_label, output_type):
    import math

    label_list = labels if isinstance(labels, list) else [labels]
    valid_labels = bool(label_list) and all(
        (isinstance(label, int) and 0 <= label < 3) or label in ("a", "c") for label in label_list)
    valid = (valid_labels and is_int_at_least(num_steps, 1) and is_int_at_least(num_images_per_label, 1)
             and output_type in ("tokens", "np", "pt", "pil")
             and isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool)
             and math.isfinite(guidance_scale) and guidance_scale >= 0)
    call = lambda: property_pipeline(labels, num_steps=num_steps, guidance_scale=guidance_scale,  # noqa: E731
                                     num_images_per_label=num_images_per_label, output_type=output_type,
                                     generator=torch.Generator().manual_seed(0))
    if valid:
        output = call()
        assert output.tokens.shape == (len(label_list) * num_images_per_label, 4, 4)
    else:
        with pytest.raises((ValueError, TypeError)):
            call()


@settings(max_examples=80, deadline=None)
@given(
    num_embeddings=st.one_of(st.integers(-2, 40), st.floats(1, 40), NOT_A_NUMBER),
    mixing_ratio=st.one_of(st.floats(-0.5, 1.5), ODD_FLOATS, st.integers(-1, 2), NOT_A_NUMBER),
    noise_schedule=st.sampled_from(["log-linear", "cosine", "linear", "", None]),
    eps=st.one_of(st.floats(-0.1, 0.6), ODD_FLOATS, NOT_A_NUMBER),
    num_steps=st.one_of(st.integers(-1, 4), st.floats(0, 4), NOT_A_NUMBER),
)
def test_scheduler_arguments_valid_run_invalid_raise(num_embeddings, mixing_ratio, noise_schedule, eps, num_steps):
    import math

    from xdlm_vision.scheduler import XDLMScheduler

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

    valid_config = (is_int_at_least(num_embeddings, 1) and number(mixing_ratio) and 0 <= mixing_ratio <= 1
                    and noise_schedule in ("log-linear", "cosine") and number(eps) and 0 <= eps < 0.5)
    if not valid_config:
        with pytest.raises((ValueError, TypeError)):
            XDLMScheduler(num_embeddings=num_embeddings, mixing_ratio=mixing_ratio, noise_schedule=noise_schedule,
                          eps=eps)
        return
    scheduler = XDLMScheduler(num_embeddings=num_embeddings, mixing_ratio=mixing_ratio,
                              noise_schedule=noise_schedule, eps=eps)
    if not is_int_at_least(num_steps, 1):
        with pytest.raises((ValueError, TypeError)):
            scheduler.set_timesteps(num_steps)
        return
    # A valid configuration samples without error and keeps every token in the codebook.
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(num_steps)
    sample = scheduler.sample_prior((2, 3), generator=generator)  # (B, L)
    for timestep in scheduler.timesteps:
        logits = torch.randn(2, 3, scheduler.vocab_size, generator=generator)  # (B, L, V)
        logits[..., num_embeddings] = float("-inf")
        sample = scheduler.step(logits, timestep, sample, generator=generator).prev_sample
    assert sample.min() >= 0 and sample.max() < num_embeddings
    t = scheduler.sample_t(2, generator=generator)  # (B,)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    noisy = scheduler.add_noise(tokens, t, generator=generator)
    loss = scheduler.loss(torch.randn(2, 3, scheduler.vocab_size), noisy, tokens, t)
    assert torch.isfinite(loss).all()


# ------------------------------------------------------------------ under load


def resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_fid_sampling_memory_flat_over_chunks(tmp_path, property_pipeline):
    from xdlm_vision.metrics.generation import SamplePlan, generate_samples

    pipe = property_pipeline
    rss = []
    original_call = type(pipe).__call__

    class Recording(type(pipe)):
        def __call__(self, *args, **kwargs):
            output = original_call(self, *args, **kwargs)
            rss.append(resident_bytes())
            return output

    pipe.__class__ = Recording
    try:
        plan = SamplePlan(num_samples=3 * 200, num_classes=3, seed=0, chunk_size=15)  # 40 chunks, 600 images
        generate_samples(pipe, plan, tmp_path / "samples", num_steps=2, guidance_scale=1.5,
                         protocol={"test": "memory"})
    finally:
        pipe.__class__ = type(pipe).__mro__[1]
    assert len(rss) == 40
    # After a warm-up, resident memory must not climb with the number of chunks: 20 MB over 30 chunks.
    growth = max(rss[10:]) - rss[10]
    assert growth < 20 * 2**20, [value // 2**20 for value in rss]


def test_processes_write_disjoint_checkpoint_files(tmp_path, monkeypatch):
    """In a checkpoint every process writes only its own rng-<rank>.pt; the main process writes the rest."""
    from types import SimpleNamespace

    from xdlm_vision.training import trainer

    written: dict[int, list[str]] = {}
    rank_now = {"rank": 0}

    def record_save(obj, path, *args, **kwargs):
        written.setdefault(rank_now["rank"], []).append(Path(path).name)

    class FakeModel:
        def save_pretrained(self, folder, **kwargs):
            written.setdefault(rank_now["rank"], []).append(Path(folder).name + "/")

    monkeypatch.setattr(torch, "save", record_save)
    monkeypatch.setattr(trainer, "save_config", lambda config, path: written[rank_now["rank"]].append(path.name))
    monkeypatch.setattr(trainer.ckpt, "write_json", lambda path, value: written[rank_now["rank"]].append(path.name))
    monkeypatch.setattr(trainer.ckpt, "finalize", lambda root, step: None)
    monkeypatch.setattr(trainer.ckpt, "prune", lambda root, keep: None)
    schedule = SimpleNamespace(state_dict=lambda: {})
    optimizer = SimpleNamespace(state_dict=lambda: {})
    (tmp_path / ".step-00000001.tmp").mkdir()
    for rank in (1, 2, 0):  # the main process last, as the barrier order allows any order
        rank_now["rank"] = rank
        accelerator = SimpleNamespace(is_main_process=rank == 0, process_index=rank, wait_for_everyone=lambda: None,
                                      unwrap_model=lambda model: model)
        if rank == 0:
            shutil.rmtree(tmp_path / ".step-00000001.tmp")
        trainer.save_checkpoint(accelerator, tmp_path, 1, FakeModel(), FakeModel(), optimizer, schedule,
                                config=None, meta={}, state={}, keep=3)
    assert written[1] == ["rng-1.pt"] and written[2] == ["rng-2.pt"]
    assert "rng-0.pt" in written[0] and "optimizer.pt" in written[0]
    every = [name for names in written.values() for name in names]
    assert len(every) == len(set(every))


def test_encode_shard_names_unique_per_worker_job(tmp_path):
    """Encode workers take whole shards by index; the index fixes the file and the temporary name."""
    from xdlm_vision.data.shards import shard_name

    names = [shard_name("train", index) for index in range(2000)]
    temporaries = [f".{name}.tmp" for name in names]
    assert len(set(names)) == len(names) and len(set(temporaries)) == len(temporaries)
    assert sorted(names) == names  # the order of the source
