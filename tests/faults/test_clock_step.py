"""The launcher's wall clock stepped several minutes forward, then back, under load.

A real clock step (NTP, a VM resumed) moves ``time.time()`` but not the monotonic clock.  The
launcher's clock is stepped +5 minutes, then to -5 minutes, then back to the true time, while
the Zuul-like clients (whose clock is right) keep requesting.  Timestamps written meanwhile are
off by minutes; nothing may be lost, doubled or leaked because of it.

The step is injected at the Python level (``daemon_site/sitecustomize.py``): Debian's libfaketime
0.9.10 cannot run Python 3.11 daemons (``time.sleep`` fails or hangs under it).
"""
import time

import pytest

from faults.harness import (CONFIG, NODESETS, SETTLE, AllocationWatch, RequestStream,
                            fault_rng, make_env, report, settle)

pytestmark = pytest.mark.slow

STEPS = [300, -300, 0]          # seconds off the true time, in turn


@pytest.fixture(params=["sqlite", "zookeeper"])
def clock_env(request, tmp_path):
    env = make_env(request, tmp_path, request.param)
    yield env
    env.close()


def test_launcher_clock_stepped_forward_and_back(clock_env):
    env = clock_env
    name = f"clock-step[{env.kind}]"
    rng = fault_rng(name)
    offset_file = env.dir / "clock-offset"
    offset_file.write_text("0\n")
    env.write(CONFIG.format(boot_time=0.3, seed=rng.randrange(2**31)))
    started = time.monotonic()
    launcher = env.spawn_launcher(env={"NODEPOOL_CLOCK_OFFSET_FILE": str(offset_file)})
    observer = env.store()
    stream = RequestStream(env.store(), rng, NODESETS, clients=3).start()
    watch = AllocationWatch(observer).start()
    time.sleep(3)
    fulfilled_before = stream.fulfilled
    for offset in STEPS:
        offset_file.write_text(f"{offset}\n")
        time.sleep(5)
    stream.stop()
    watch.stop()
    wrong = settle(observer, env.cloud(), timeout=SETTLE, expect_ready={"small": 1})
    report(name, seed=rng.seed_value, steps=STEPS, requests=stream.submitted,
           fulfilled=stream.fulfilled, fulfilled_during_steps=stream.fulfilled - fulfilled_before,
           failed=len(stream.failed), lost=stream.lost, nodes_served=stream.nodes_served,
           seconds=round(time.monotonic() - started, 1))
    assert launcher.poll() is None, "the launcher exited"
    assert stream.problems == [], "\n".join(stream.problems)
    assert watch.problems == [], "\n".join(watch.problems)
    assert stream.lost == 0, f"{stream.lost} requests vanished while the launcher's clock was off"
    assert stream.failed == {}, f"requests failed: {stream.failed}"
    assert stream.fulfilled - fulfilled_before >= 3, "requests stalled while the clock was off"
    assert wrong == [], "after the clock steps the system did not settle:\n" + "\n".join(wrong)
    assert env.crashes() == [], "\n".join(env.crashes())
