"""Atomic writes: complete files or none, with the usual file mode."""

import json
import os
import stat

import pytest

from xdlm_vision.atomic import atomic_write, default_file_mode, write_json_atomic


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(path) as file:
            file.write(b"half")
            raise OSError("disk full")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_uses_umask_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "out.json", [])
        assert default_file_mode() == 0o644
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644
