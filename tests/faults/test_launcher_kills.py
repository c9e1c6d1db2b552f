"""``kill -9`` of launcher processes at random moments while Zuul-like clients keep requesting.

The README's promise: kill a launcher at any moment and start it again, and no request is lost,
no node is given to two requests, no instance is leaked.  Each run kills the launcher 20+ times
(restarting it at once), then lets the last one settle and checks everything: every request
answered (here: fulfilled, the config can serve them all), no node in two fulfilled requests or
taken by two clients, no node left half-launched or half-deleted, and the simulated cloud holding
exactly the instances the store has node records for.

``NODEPOOL_FAULT_SEED`` replays a run's schedule; ``NODEPOOL_FAULT_KILLS`` changes the count.
"""
import os
import time

import pytest

from faults.harness import (CONFIG, NODESETS, SETTLE, AllocationWatch, RequestStream,
                            fault_rng, report, settle)

pytestmark = pytest.mark.slow

def test_launcher_killed_at_random_moments_loses_nothing_and_leaks_nothing(fault_env):
    env = fault_env
    name = f"launcher-kill-9[{env.kind}]"
    rng = fault_rng(name)
    kills = int(os.environ.get("NODEPOOL_FAULT_KILLS", "22"))
    env.write(CONFIG.format(boot_time=0.3, seed=rng.randrange(2**31)))
    started = time.monotonic()
    proc = env.spawn_launcher()
    observer = env.store()
    stream = RequestStream(env.store(), rng, NODESETS, clients=3).start()
    watch = AllocationWatch(observer).start()
    lifetimes = []
    # On ZooKeeper a killed launcher's locks (the pool's launch lock among them) live on until
    # its session times out (2 s): killed faster than that, successors queue behind dead
    # sessions and hardly serve anything, so there they live a little longer.
    lifetimes_range = (0.3, 2.2) if env.kind == "sqlite" else (1.0, 2.5)
    for _ in range(kills):
        lifetime = rng.uniform(*lifetimes_range)
        time.sleep(lifetime)
        env.kill(proc)
        lifetimes.append(lifetime)
        proc = env.spawn_launcher()
    stream.stop()
    watch.stop()
    wrong = settle(observer, env.cloud(), timeout=SETTLE, expect_ready={"small": 1})
    calls = env.cloud().api_call_counts()
    total_calls = sum(c for c, _ in calls.values())
    report(name, seed=rng.seed_value, kills=kills, requests=stream.submitted,
           fulfilled=stream.fulfilled, failed=len(stream.failed), nodes_served=stream.nodes_served,
           samples=watch.samples, requeued=env.log_count("back in the queue"),
           leaked_instances_deleted=env.log_count("leaked instance"), api_calls=total_calls,
           api_calls_per_node=round(total_calls / max(1, stream.nodes_served), 2),
           seconds=round(time.monotonic() - started, 1))
    assert stream.problems == [], "\n".join(stream.problems)
    assert watch.problems == [], "\n".join(watch.problems)
    assert stream.failed == {}, f"requests failed although the pool can serve them: " \
                                f"{stream.failed}"
    assert stream.fulfilled >= 10, "too few requests were served to exercise the kills"
    assert wrong == [], "after the last restart the system did not settle:\n" + "\n".join(wrong)
    assert env.crashes() == [], "\n".join(env.crashes())
