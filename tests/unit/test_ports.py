"""Ports for the servers a stack starts: chosen where no implicit bind can take them first."""

from __future__ import annotations

import socket

import pytest

from ccoe_common import ports
from ccoe_common.ports import LOWEST, bindable, ephemeral_range, free_port


def test_ports_come_from_below_the_ephemeral_range_and_can_be_listened_on():
    low, _ = ephemeral_range()
    if low - LOWEST < 1000:
        pytest.fail(f"this machine's ephemeral range starts at {low}: the test expects room below it")
    for _ in range(20):
        port = free_port()
        assert LOWEST <= port < low
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
            s.listen()


def test_a_port_in_use_is_never_handed_out(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert not bindable(taken)
        picks = iter([taken, taken])

        class Scripted:
            def randrange(self, start, stop):
                return next(picks, start + 7)

        monkeypatch.setattr(ports.random, "SystemRandom", Scripted)
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (taken + 5000, 65535))
        monkeypatch.setattr(ports, "LOWEST", taken - 10)
        got = free_port()
        assert got != taken and bindable(got)


def test_without_room_below_the_range_the_kernel_picks(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (LOWEST + 10, 65535))
    monkeypatch.setattr(ports.random, "SystemRandom", lambda: pytest.fail("no room: no random pick"))
    port = free_port()
    assert port >= 1024 and bindable(port)


def test_an_unreadable_range_file_means_the_iana_range(monkeypatch, tmp_path):
    monkeypatch.setattr(ports, "_RANGE_FILE", tmp_path / "missing")
    assert ephemeral_range() == (49152, 65535)
    (tmp_path / "range").write_text("40000\t50000\n")
    monkeypatch.setattr(ports, "_RANGE_FILE", tmp_path / "range")
    assert ephemeral_range() == (40000, 50000)


def test_a_port_taken_on_ipv6_only_is_not_free():
    # Ray's proxies listen on [::]; a port some server holds there is busy for them even when
    # IPv4 alone would still bind it.
    try:
        busy = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        pytest.fail("this test needs IPv6 sockets, which the CI machine has")
    with busy:
        busy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        busy.bind(("::", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with socket.socket() as v4:
            v4.bind(("0.0.0.0", port))  # IPv4 alone is free
        assert not bindable(port)
