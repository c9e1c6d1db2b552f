"""Two launchers; one is frozen (SIGSTOP) past its store session's timeout, then resumed.

While it is frozen its session expires: the other launcher takes over its requests and deletes
its half-built nodes.  When it wakes it must notice that its locks are gone and drop what it was
doing, never finishing a launch or a request it no longer owns.  Repeated with the launchers
taking turns, under the Zuul-like request stream; the same invariants as the kill test hold.
"""
import signal
import time

import pytest

from faults.harness import (CONFIG, NODESETS, SETTLE, AllocationWatch, RequestStream,
                            fault_rng, report, settle, wait_until)

pytestmark = pytest.mark.slow

SESSION_TIMEOUT = 2.0       # zookeeper-timeout of the zk_fault_env fixture


def test_launcher_frozen_past_its_session_timeout_and_resumed(zk_fault_env):
    env = zk_fault_env
    name = "launcher-sigstop[zookeeper]"
    rng = fault_rng(name)
    freezes = 6
    env.write(CONFIG.format(boot_time=0.3, seed=rng.randrange(2**31)))
    started = time.monotonic()
    launchers = [env.spawn_launcher(), env.spawn_launcher()]
    observer = env.store()
    wait_until(lambda: len(observer.list_components("launcher")) == 2, 30, "two launchers")
    # a request waiting 20 s has the launchers print their threads (their logs show why)
    stream = RequestStream(env.store(), rng, NODESETS, clients=3,
                           on_stall=lambda req_id: env.show_stacks()).start()
    watch = AllocationWatch(observer).start()
    frozen_for = []
    try:
        for turn in range(freezes):
            time.sleep(rng.uniform(0.5, 2.0))
            victim = launchers[turn % 2]
            victim.send_signal(signal.SIGSTOP)
            pause = SESSION_TIMEOUT + rng.uniform(1.0, 2.5)
            time.sleep(pause)
            victim.send_signal(signal.SIGCONT)
            frozen_for.append(round(pause, 1))
    finally:
        for proc in launchers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
    time.sleep(2.0)
    stream.stop()
    watch.stop()
    wrong = settle(observer, env.cloud(), timeout=SETTLE, expect_ready={"small": 1})
    alive = [proc.poll() is None for proc in launchers]
    report(name, seed=rng.seed_value, freezes=freezes, frozen_seconds=frozen_for,
           requests=stream.submitted, fulfilled=stream.fulfilled, failed=len(stream.failed),
           nodes_served=stream.nodes_served, samples=watch.samples,
           sessions_expired=env.log_count("Session has expired"),
           requeued=env.log_count("back in the queue"),
           seconds=round(time.monotonic() - started, 1))
    assert all(alive), "a launcher exited after being frozen"
    assert stream.problems == [], "\n".join(stream.problems)
    assert watch.problems == [], "\n".join(watch.problems)
    assert stream.failed == {}, f"requests failed although the pool can serve them: " \
                                f"{stream.failed}"
    assert wrong == [], "after the freezes the system did not settle:\n" + "\n".join(wrong)
    assert env.crashes() == [], "\n".join(env.crashes())
    # both launchers work again: each registered its pool anew
    wait_until(lambda: len(observer.list_components("launcher")) == 2, 30,
               "both launchers registered again")
