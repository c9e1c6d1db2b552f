"""A host-key scan that lost connections is repeated, so a node gets every key its host offers.

``ssh-keyscan`` opens one connection per key type; a busy sshd drops some (``MaxStartups``) and
the scan prints the rest with an error line per dropped connection.  These tests put a scripted
``ssh-keyscan`` on the path (it answers partly, then fully) in front of a real listening socket.
"""
import os
import socket
import stat
import time

import pytest

from nodepool.drivers.static.adapter import check_host
from nodepool.launcher import nodescan
from nodepool.launcher.nodescan import NodeScan, keyscan_failures

KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB",
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY"]


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def scripted_keyscan(tmp_path, monkeypatch, answers):
    """Install an ``ssh-keyscan`` that gives ``answers[i]`` (stdout keys, stderr lines) on run i."""
    state = tmp_path / "runs"
    state.write_text("0")
    script = tmp_path / "ssh-keyscan"
    lines = ["#!/bin/sh", f'n=$(cat "{state}")', f'echo $((n + 1)) > "{state}"', 'case "$n" in']
    for i, (keys, errors) in enumerate(answers):
        body = [f'echo "# 127.0.0.1:22 SSH-2.0-OpenSSH_9.2p1" >&2']
        body += [f'echo "127.0.0.1 {k}"' for k in keys]
        body += [f'echo "{e}" >&2' for e in errors]
        lines.append(f'{i if i < len(answers) - 1 else "*"}) ' + "; ".join(body) + ";;")
    lines.append("esac")
    script.write_text("\n".join(lines) + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return state


DROPPED = "127.0.0.1: Connection closed by remote host"


def test_failures_are_the_error_lines_not_the_banners():
    assert keyscan_failures("# host:22 SSH-2.0-OpenSSH\n\n") == []
    assert keyscan_failures(f"# banner\n{DROPPED}\nread (h): Connection reset by peer\n") == [
        DROPPED, "read (h): Connection reset by peer"]


def run_scan(port):
    scan = NodeScan("127.0.0.1", port, timeout=30)
    scan._next_try = 0
    while True:
        keys = scan.advance()
        if keys is not None:
            return keys
        scan._next_try = 0
        time.sleep(0.01)


def test_node_scan_repeats_a_partial_scan_and_keeps_the_union(tmp_path, monkeypatch, listener):
    runs = scripted_keyscan(tmp_path, monkeypatch,
                            [([KEYS[0]], [DROPPED, DROPPED]), ([KEYS[1]], [DROPPED]), (KEYS, [])])
    assert run_scan(listener) == sorted(KEYS)
    assert runs.read_text().strip() == "3"


def test_node_scan_gives_up_repeating_after_its_attempts(tmp_path, monkeypatch, listener):
    runs = scripted_keyscan(tmp_path, monkeypatch, [([KEYS[0]], [DROPPED]), ([KEYS[1]], [DROPPED])])
    assert run_scan(listener) == sorted(KEYS[:2])
    assert runs.read_text().strip() == str(nodescan.KEYSCAN_ATTEMPTS)


def test_node_scan_counts_attempts_from_the_first_keys(tmp_path, monkeypatch, listener):
    """Scans before sshd is up (no keys) do not use up the repeats of a partial scan."""
    refused = "127.0.0.1: Connection refused"
    runs = scripted_keyscan(tmp_path, monkeypatch,
                            [([], [refused])] * 4 + [([KEYS[0]], [DROPPED]), (KEYS, [])])
    assert run_scan(listener) == sorted(KEYS)
    assert runs.read_text().strip() == "6"


def test_node_scan_takes_a_clean_scan_at_once(tmp_path, monkeypatch, listener):
    runs = scripted_keyscan(tmp_path, monkeypatch, [(KEYS, [])])
    assert run_scan(listener) == sorted(KEYS)
    assert runs.read_text().strip() == "1"


def test_static_check_repeats_a_partial_scan(tmp_path, monkeypatch, listener):
    runs = scripted_keyscan(tmp_path, monkeypatch, [([KEYS[2]], [DROPPED]), (KEYS[:2], [])])
    result = check_host({"name": "127.0.0.1", "connection-port": listener, "timeout": 5,
                         "host-key": KEYS[1]})
    assert result.answers, result
    assert sorted(result.host_keys) == sorted(KEYS)
    assert runs.read_text().strip() == "2"
