"""Suite-wide settings: one torch thread per process, no network beyond loopback, Hugging Face offline."""

import ipaddress
import os
import socket

import pytest
import torch

# One torch thread per test process (subprocesses inherit it): on 2 shared cores, two threads per
# process made small tensor operations several times slower, and the suite's time less predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class NetworkAccessError(RuntimeError):
    """Raised when code under test tries to connect to a non-loopback address."""


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self, address):
    if not _is_loopback(address):
        raise NetworkAccessError(f"test tried to connect to {address!r}; code must never download at run time")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_loopback(address):
        raise NetworkAccessError(f"test tried to connect to {address!r}; code must never download at run time")
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True, scope="session")
def block_network():
    """Allow loopback connections only (multi-process tests use them), for the whole session."""
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    yield
    socket.socket.connect = _real_connect
    socket.socket.connect_ex = _real_connect_ex

