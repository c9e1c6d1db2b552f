"""ZooKeeper restarted (stopped, then started on the same data) while everything runs.

A launcher, a builder and the Zuul-like clients work through three restarts of the server.
Nobody is restarted or told anything: afterwards the daemons are still running and registered,
requests submitted after the last restart are fulfilled, an image build asked for after it is
built and uploaded, and the usual invariants hold (no node in two requests, nothing half-done,
the cloud holding exactly the recorded instances).

The clients keep waiting through the outage as Zuul does; a request that vanished with its
client's expired session is resubmitted (counted as ``lost``).  At the end the clients
disconnect, which frees whatever their sessions still held.
"""
import sys
import time

import pytest

from faults.harness import (NODESETS, SETTLE, AllocationWatch, RequestStream, describe_requests,
                            fault_rng, report, retrying, settle, wait_until)

pytestmark = pytest.mark.slow

CONFIG = """\
launcher:
  leak-interval: 0.5
images-dir: {tmp}/images
build-log-dir: {tmp}/build-logs
elements-dir: {tmp}/elements
builder:
  build-interval: 0.5
  upload-interval: 0.5
  cleanup-interval: 0.5
labels:
  - name: small
    min-ready: 1
  - name: large
  - name: ubuntu-node
diskimages:
  - name: ubuntu
    elements: [base]
    release: jammy
    dib-cmd: "{python} -m nodepool.builder.image_create"
providers:
  - name: sim
    driver: simulated
    boot-time: 0.3
    upload-time: 0.3
    seed: {seed}
    cloud-images:
      - name: img
    diskimages:
      - name: ubuntu
    pools:
      - name: main
        max-servers: 14
        labels:
          - name: small
            cloud-image: img
          - name: large
            cloud-image: img
            cores: 2
          - name: ubuntu-node
            diskimage: ubuntu
"""


def ready_uploads(store):
    return [u for u in store.list_uploads(image="ubuntu") if str(u.state) == "ready"]


def test_zookeeper_restarted_under_load_everything_recovers_by_itself(zk_fault_env, zk_restart,
                                                                      zookeeper_server):
    env = zk_fault_env
    name = "zookeeper-restart"
    rng = fault_rng(name)
    restarts = 3
    (env.dir / "elements" / "base").mkdir(parents=True)
    env.write(CONFIG.format(tmp=env.dir, python=sys.executable, seed=rng.randrange(2**31)))
    started = time.monotonic()
    launcher = env.spawn_launcher()
    builder = env.spawn_builder()
    observer = env.store()
    wait_until(lambda: ready_uploads(observer), 60, "the first image upload")
    client_store = env.store()
    stream = RequestStream(client_store, rng, NODESETS, clients=3, wait_timeout=40).start()
    watch = AllocationWatch(observer).start()
    downtimes = []
    for _ in range(restarts):
        time.sleep(rng.uniform(2.0, 4.0))
        stopped = time.monotonic()
        zk_restart(pause=rng.uniform(0.5, 3.0))
        downtimes.append(round(time.monotonic() - stopped, 1))
    back = time.monotonic()
    # the builder recovers too: a build asked for now is built and uploaded
    uploads_before = retrying(lambda: {u.build_id for u in ready_uploads(observer)})
    retrying(lambda: observer.request_image_build("ubuntu"))
    wait_until(lambda: {u.build_id for u in ready_uploads(observer)} - uploads_before, 60,
               "an image built and uploaded after the restarts")
    try:
        wait_until(lambda: len([t for t in stream.fulfilled_at if t > back]) >= 5, 45,
                   "requests fulfilled after the restarts")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the store:\n{describe_requests(observer)}\n"
                             f"the launcher's threads:\n{env.dump_stacks(launcher)}") from None
    stream.stop(timeout=60)
    watch.stop()
    client_store.stop()
    # a node record created while the store went away is removed by its launcher once the
    # store is back (or by cleanup after INIT_GRACE, 60 s, when nobody knows it): SETTLE covers both
    wrong = settle(observer, env.cloud(), timeout=SETTLE, expect_ready={"small": 1})
    components = retrying(lambda: {c.kind for c in observer.list_components()})
    report(name, seed=rng.seed_value, restarts=restarts, downtime_seconds=downtimes,
           requests=stream.submitted, fulfilled=stream.fulfilled, failed=len(stream.failed),
           lost_with_client_session=stream.lost, client_store_errors=stream.store_errors,
           fulfilled_after_restarts=len([t for t in stream.fulfilled_at if t > back]),
           sessions_expired=env.log_count("Session has expired"),
           seconds=round(time.monotonic() - started, 1))
    assert launcher.poll() is None and builder.poll() is None, "a daemon exited"
    assert {"launcher", "builder", "pool"} <= components, components
    assert stream.problems == [], "\n".join(stream.problems)
    assert watch.problems == [], "\n".join(watch.problems)
    assert stream.failed == {}, f"requests failed: {stream.failed}"
    assert wrong == [], "after the restarts the system did not settle:\n" + "\n".join(wrong)
    assert env.crashes() == [], "\n".join(env.crashes())
