"""Commands that wait show a progress line on a terminal only: ``nodepool request`` run as a
process on a real pseudo-terminal and through pipes, and ``image-build --wait`` against a
running builder."""
import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from fixtures.launcher import REPO, wait_until
from nodepool.cli.nodepool import main as cli_main
from nodepool.cli.progress import Progress

pytestmark = pytest.mark.slow

CONFIG = """\
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    boot-time: 2.5
    cloud-images:
      - name: img
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: img
"""

ERASE = "\r\x1b[K"


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_drawn_on_a_tty_and_silent_when_piped():
    tty, piped = FakeTTY(), io.StringIO()
    clock = iter(range(100)).__next__
    for stream in (tty, piped):
        with Progress(stream, clock=clock) as p:
            p.update("one")
            p.update("two")
    assert piped.getvalue() == ""
    out = tty.getvalue()
    assert out.startswith(ERASE) and "one" in out and "two" in out and out.endswith(ERASE)


def run_request(config_path, on_tty):
    """``nodepool request small`` as a process; stderr on a pty or a pipe.  (rc, out, err)"""
    cmd = [sys.executable, "-m", "nodepool.cli.nodepool", "-c", config_path, "request",
           "small", "--timeout", "60"]
    env = dict(os.environ, PYTHONPATH=REPO)
    if not on_tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=90)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env, text=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    out = proc.stdout.read()
    proc.wait(10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def test_request_shows_progress_on_a_terminal_only(sqlite_launcher_env):
    env = sqlite_launcher_env
    env.write(CONFIG)
    env.start_launcher()
    rc, out, err = run_request(env.config_path, on_tty=True)
    assert rc == 0, (out, err)
    assert ERASE in err and "request 100-" in err and "pending" in err
    assert "fulfilled in" in out
    rc, out, err = run_request(env.config_path, on_tty=False)
    assert rc == 0, (out, err)
    assert "\x1b" not in err and "\r" not in err and "fulfilled in" in out


def test_image_build_wait_follows_build_and_uploads(tmp_path, caplog):
    from integration.test_builder import Env
    world = Env(tmp_path)
    world.write_config()
    try:
        world.builder(workers=True)
        for stream in (FakeTTY(), io.StringIO()):
            out = io.StringIO()
            rc = cli_main(["-c", str(world.config_path), "image-build", "ubuntu", "--wait",
                           "--timeout", "120"], out=out, err=stream)
            assert rc == 0, stream.getvalue()
            lines = out.getvalue().splitlines()
            assert lines[0] == "build of ubuntu requested"
            assert lines[1].startswith("image ubuntu: build ") \
                and lines[1].endswith("ready; uploaded to sim-a, sim-b")
            if isinstance(stream, FakeTTY):
                assert ERASE in stream.getvalue() and "image ubuntu: " in stream.getvalue()
            else:
                assert stream.getvalue() == ""
        store = world.open_store()
        wait_until(lambda: len(store.list_builds("ubuntu")) == 2)
    finally:
        world.close()
