"""The kazoo handler's poll-based select answers as select(2) would."""
import socket

import pytest

from nodepool.store.zk.handler import PollThreadingHandler


def test_select_reports_readable_writable_and_times_out():
    handler = PollThreadingHandler()
    a, b = socket.socketpair()
    try:
        assert handler.select([a], [], [], 0) == ([], [], [])
        r, w, x = handler.select([a], [a, b], [], 1.0)
        assert r == [] and set(w) == {a, b} and x == []
        b.send(b"x")
        r, w, _ = handler.select([a, b], [], [], 1.0)
        assert r == [a] and w == []
        b.close()                                  # a hang-up is readable: the read tells
        r, _, _ = handler.select([a], [], [], 1.0)
        assert r == [a] and a.recv(1) == b"x" and a.recv(1) == b""
    finally:
        a.close()
        b.close()


def test_select_rejects_a_bad_timeout():
    handler = PollThreadingHandler()
    with pytest.raises(ValueError):
        handler.select([], [], [], -1)
    with pytest.raises(TypeError):
        handler.select([], [], [], "1")
