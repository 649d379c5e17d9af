"""Faults, bad input and safe loading across the product."""

import socket

import pytest

from conftest import NetworkAccessError


def test_network_guard_blocks_remote_addresses():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NetworkAccessError):
            sock.connect(("192.0.2.1", 80))  # TEST-NET-1, reserved for documentation
    finally:
        sock.close()
