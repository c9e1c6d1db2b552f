"""Image rollout end to end: validation on a node, steps, automatic withdrawal.

A real launcher (on SQLite and on a real ZooKeeper) with the simulated cloud; every simulated
instance answers on a real loopback sshd (``interface-ip`` + the diskimage's
``connection-port``), so validations scan real host keys and run their command over real SSH.
Uploads are made the way the builder makes them (an image uploaded to the simulated cloud, a
``ready`` upload record), newest by ``state_time``.
"""
import getpass
import types

import pytest

from fixtures.launcher import wait_until
from fixtures.sshd import SshServer, free_port, sshd_available
from nodepool import metrics
from nodepool.client import RequestFailed
from nodepool.drivers.base import ImageUploadSpec
from nodepool.launcher import validation
from nodepool.model import ImageBuild, ImageUpload, Node, RequestState
from nodepool.model.rollout import CURRENT, ROLLING, VALIDATING, WITHDRAWN, Rollout

pytestmark = pytest.mark.skipif(not sshd_available(), reason="openssh-server not installed")

CONFIG = """\
labels:
  - name: jammy
diskimages:
  - name: ubuntu
    rollout:
{rollout}
providers:
  - name: sim
    driver: simulated
    boot-time: 0.02
    launch-retries: {retries}
    interface-ip: 127.0.0.1
    boot-failure-images: {failing}
    diskimages:
      - name: ubuntu
        connection-port: {port}
    pools:
      - name: main
        max-servers: 20
        labels:
          - name: jammy
            diskimage: ubuntu
"""


@pytest.fixture
def sshd(tmp_path):
    server = SshServer(tmp_path / "sshd", login=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def quick_rollout(monkeypatch):
    monkeypatch.setattr(validation, "INTERVAL", 0.1)


def validating(sshd, verdict):
    """A validation that logs in to the loopback sshd and passes while ``verdict`` says ok."""
    return f"""\
      validation:
        command: grep -q ok {verdict}
        key-file: {sshd.client_key}
        username: {getpass.getuser()}
        timeout: 30
"""


def write(env, sshd, rollout, retries=3, failing="{}"):
    return env.write(CONFIG.format(rollout=rollout, port=sshd.port, retries=retries,
                                   failing=failing))


def upload(env, store, n):
    """A ready build and upload of ``ubuntu`` on ``sim`` (the n-th: newer than n-1)."""
    adapter = env.adapter("sim")
    image_file = env.dir / f"ubuntu-{n}.qcow2"
    image_file.write_bytes(b"QFI\xfb" + bytes([n]) * 4096)
    build = store.create_build(ImageBuild(image="ubuntu", state="ready", formats="qcow2",
                                          state_time=1000.0 + n))
    ext = adapter.upload_image(ImageUploadSpec(image_name=f"ubuntu-{n}",
                                               filename=str(image_file), image_format="qcow2",
                                               metadata={}))
    return store.create_upload(ImageUpload(image="ubuntu", build_id=build.id, provider="sim",
                                           state="ready", external_id=ext,
                                           external_name=f"ubuntu-{n}", format="qcow2",
                                           state_time=1000.0 + n))


def fresh(store, up):
    return store.get_upload(up.image, up.build_id, up.provider, up.id)


def phase(store, up):
    return Rollout.of(fresh(store, up)).phase


def boot_once(client):
    """One request of one node: the upload path it booted, or None when the request failed."""
    try:
        nodes = client.request(["jammy"], timeout=30)
    except RequestFailed:
        return None
    client.release(nodes)
    return nodes[0].image_id


def test_good_image_is_validated_then_rolled_out_step_by_step(launcher_env, sshd, tmp_path):
    verdict = tmp_path / "verdict"
    verdict.write_text("ok\n")
    write(launcher_env, sshd, validating(sshd, verdict) + """\
        retry-delay: 0.5
      steps: [25, 50, 100]
      step-min-launches: 2
      fallback:
        min-launches: 50
""")
    store = launcher_env.store()
    old = upload(launcher_env, store, 1)
    launcher_env.start_launcher()
    client = launcher_env.client()
    assert boot_once(client) == old.path        # the only upload serves at once
    new = upload(launcher_env, store, 2)
    # until the new upload is validated, every launch boots the previous one
    wait_until(lambda: phase(store, new) is not None, message="the rollout to start")
    seen = []
    while phase(store, new) == VALIDATING:
        seen.append(boot_once(client))
    assert set(seen) <= {old.path}
    state = wait_until(lambda: Rollout.of(fresh(store, new)).phase in (ROLLING, CURRENT)
                       and Rollout.of(fresh(store, new)), message="validation to pass")
    assert state.validation["state"] == "passed"
    # the validation node booted the candidate and was cleaned up afterwards
    assert state.outcomes.get("ready", 0) >= 1
    # step by step: at each step the candidate's share of launches stays within it
    by_step = {}
    for _ in range(60):
        state = Rollout.of(fresh(store, new))
        if state.phase == CURRENT:
            break
        by_step.setdefault(state.step, []).append(boot_once(client))
    assert phase(store, new) == CURRENT, by_step
    shares = {0: 25, 1: 50, 2: 100}
    for step, paths in by_step.items():
        on_new = sum(1 for p in paths if p == new.path)
        # a launch decided just before the step changed may count in the next: one extra
        assert on_new * 100 <= shares[step] * len(paths) + 100, (step, paths)
        assert None not in paths
    assert {0, 1} <= set(by_step)
    history = [event for _, event in Rollout.of(fresh(store, new)).history]
    assert any("step 2/3" in e for e in history) and "current" in history
    # now every launch boots the new upload; the previous one is still ready (kept)
    assert boot_once(client) == new.path
    assert str(fresh(store, old).state) == "ready"


def test_image_failing_validation_never_serves_and_is_withdrawn(launcher_env, sshd, tmp_path):
    verdict = tmp_path / "verdict"
    verdict.write_text("bad\n")
    write(launcher_env, sshd, validating(sshd, verdict) + """\
        attempts: 2
        retry-delay: 0.3
      steps: [50, 100]
""")
    store = launcher_env.store()
    old = upload(launcher_env, store, 1)
    new = upload(launcher_env, store, 2)
    # a ready node booted from the candidate (a validation node whose launcher died) must
    # never be handed out: the launcher deletes it
    stray = store.create_node(Node(state="ready", provider="sim", pool="main", type=["jammy"],
                                   image_id=new.path, interface_ip="127.0.0.1"))
    launcher_env.start_launcher()
    client = launcher_env.client()
    wait_until(lambda: store.get_node(stray.id) is None, message="the stray node to go")
    seen = []
    while str(fresh(store, new).state) == "ready":
        seen.append(boot_once(client))
        assert len(seen) < 500, "the bad upload was never withdrawn"
    assert set(seen) == {old.path}            # every request served, never from the bad one
    record = fresh(store, new)
    state = Rollout.of(record)
    assert str(record.state) == "deleting" and state.phase == WITHDRAWN
    assert state.withdrawn_by == "validation"
    assert state.validation["attempts"] == 2
    assert "exited 1" in state.reason
    # the build is marked right after the upload (the builder then never uploads it there)
    build = wait_until(lambda: (lambda b: b if b.extra.get("withdrawn_from") else None)(
        store.get_build("ubuntu", new.build_id)), message="the build marked as withdrawn")
    assert build.extra["withdrawn_from"] == ["sim"]
    assert "validation" in build.extra["withdrawn_reasons"]["sim"]
    assert boot_once(client) == old.path
    # validation nodes were deleted after their check
    wait_until(lambda: not [n for n in store.list_nodes() if n.image_id == new.path],
               message="validation nodes to go")


def test_image_failing_launches_is_withdrawn_automatically(launcher_env, sshd, tmp_path):
    """No validation: the candidate gets 25% of launches; every boot from it fails, so after
    the minimum sample it is withdrawn; the previous image serves throughout and only requests
    given to the candidate (within its share) fail.  Two launchers share the work."""
    rollout = """\
      steps: [25, 100]
      step-min-launches: 1000
      fallback:
        margin: 0.3
        min-launches: 3
"""
    write(launcher_env, sshd, rollout, retries=1)
    store = launcher_env.store()
    old = upload(launcher_env, store, 1)
    new = upload(launcher_env, store, 2)
    write(launcher_env, sshd, rollout, retries=1,
          failing="{" + new.external_id + ": 1.0}")
    # two launchers share the store: counters and rollout state live in the upload records
    launcher_env.start_launcher()
    launcher_env.start_launcher()
    client = launcher_env.client()
    wait_until(lambda: phase(store, new) == ROLLING, message="the rollout to start")
    results = []
    while phase(store, new) == ROLLING:
        results.append(boot_once(client))
        assert len(results) < 200, "the failing upload was never withdrawn"
    record = fresh(store, new)
    state = Rollout.of(record)
    assert str(record.state) == "deleting" and state.phase == WITHDRAWN
    assert state.withdrawn_by == "fallback" and "failed" in state.reason
    assert state.outcomes["launch_failures"] >= 3 and not state.outcomes.get("ready")
    failed = results.count(None)
    # only the candidate's share failed; everything else booted the previous upload
    assert set(results) <= {old.path, None}
    assert failed * 100 <= 25 * len(results) + 100
    assert Rollout.of(fresh(store, old)).phase is None      # never touched
    # counted by the launcher right after its write, which this store may see first
    wait_until(lambda: metrics.ROLLOUT_EVENTS.labels(
        "ubuntu", "sim", "withdrawn-fallback")._value.get() >= 1,
        message="the withdrawal counted in the metrics")
    for _ in range(5):
        assert boot_once(client) == old.path
    # the operator sees which upload serves and why the other one went
    listing = {r["Build ID"]: r for r in rows(run_cli(launcher_env, "image-list",
                                                      "--rollout").stdout)}
    assert listing[old.build_id]["Serves"] == "current"
    assert listing[new.build_id]["State"] == "deleting"
    assert listing[new.build_id]["Reason"].startswith("fallback: ")
    reqs = [r for r in store.list_requests() if r.state == RequestState.REQUESTED]
    assert not reqs
    # every launch attempt of both launchers was counted once, in the store (a request
    # whose node failed in one launcher's pool may be launched again by the other's)
    served = len(results) - failed + 5

    def counted():
        o, n = Rollout.of(fresh(store, old)), Rollout.of(fresh(store, new))
        return (o.count("ready") == served and o.count("launches") == served
                and n.count("launches") == n.count("launch_failures")) or (o, n)
    wait_until(lambda: counted() is True, message="the launches counted in the store")


def run_cli(env, *args):
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environ = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "nodepool.cli.nodepool", "-c",
                           env.config_path, *args], capture_output=True, text=True,
                          timeout=60, env=environ)


def rows(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    heads = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(heads, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]


@pytest.mark.slow
def test_operator_holds_rolls_back_and_promotes(sqlite_launcher_env, sshd):
    env = sqlite_launcher_env
    write(env, sshd, """\
      steps: [20, 50, 100]
      step-min-launches: 1
      fallback:
        min-launches: 100
""")
    store = env.store()
    old = upload(env, store, 1)
    new = upload(env, store, 2)
    env.start_launcher()
    client = env.client()
    wait_until(lambda: phase(store, new) == ROLLING, message="the rollout to start")
    out = run_cli(env, "image-hold-rollout", "ubuntu", "sim")
    assert out.returncode == 0, out.stderr
    assert Rollout.of(fresh(store, new)).held
    for _ in range(8):
        assert boot_once(client) in (old.path, new.path)
    held = Rollout.of(fresh(store, new))
    assert held.step == 0 and held.phase == ROLLING        # held: it did not advance
    assert run_cli(env, "image-hold-rollout", "ubuntu", "sim", "--release").returncode == 0

    def advanced():
        boot_once(client)                   # launches are what a step waits for
        return Rollout.of(fresh(store, new)).step >= 1
    wait_until(advanced, timeout=30, message="the next step")
    out = run_cli(env, "image-rollback", "ubuntu", "sim")
    assert out.returncode == 0 and "back to step" in out.stdout, out.stderr
    state = Rollout.of(fresh(store, new))
    assert state.held and state.phase == ROLLING
    listing = rows(run_cli(env, "image-list", "--rollout").stdout)
    by_upload = {(r["Build ID"], r["Upload ID"]): r for r in listing}
    assert by_upload[(old.build_id, old.id)]["Serves"] == "current"
    cand = by_upload[(new.build_id, new.id)]
    assert cand["Serves"] == "candidate" and cand["Rollout"].startswith("step ")
    assert cand["Rollout"].endswith("held")
    out = run_cli(env, "image-promote", "ubuntu", "sim")
    assert out.returncode == 0, out.stderr
    assert phase(store, new) == CURRENT
    assert boot_once(client) == new.path
    # nothing left to promote: a clear one-line refusal naming image-delete
    out = run_cli(env, "image-promote", "ubuntu", "sim")
    assert out.returncode == 1 and "image-delete" in out.stderr
    assert "Traceback" not in out.stderr
    # the plain image-list keeps Nodepool's columns
    plain = rows(run_cli(env, "image-list").stdout)
    assert list(plain[0]) == ["Build ID", "Upload ID", "Provider", "Image",
                              "Provider Image Name", "Provider Image ID", "State", "Age"]


def test_validation_node_not_answering_ssh_is_a_failed_attempt(sqlite_launcher_env, tmp_path):
    """The candidate boots but its node never answers SSH (nothing listens on the port): each
    attempt ends at the validation timeout, the upload is withdrawn after the allowed attempts,
    and requests are served from the previous upload all along."""
    env = sqlite_launcher_env
    sshd = types.SimpleNamespace(port=free_port())     # nothing listens there
    write(env, sshd, """\
      validation:
        timeout: 1
        attempts: 2
        retry-delay: 0.2
""")
    store = env.store()
    old = upload(env, store, 1)
    new = upload(env, store, 2)
    env.start_launcher()
    client = env.client()
    seen = []
    while str(fresh(store, new).state) == "ready":
        seen.append(boot_once(client))
        assert len(seen) < 300, "the upload was never withdrawn"
    assert set(seen) <= {old.path}
    state = Rollout.of(fresh(store, new))
    assert state.withdrawn_by == "validation" and "did not answer SSH" in state.reason


def test_stock_nodes_failing_their_recheck_count_against_the_candidate(sqlite_launcher_env,
                                                                       tmp_path):
    """``recheck``: ready stock nodes of the rolling candidate are scanned again before they
    are handed out; here none answers (nothing listens on their port), so each is deleted
    instead of served, counted, and the candidate is withdrawn by the fallback rule."""
    env = sqlite_launcher_env
    port = free_port()                            # nothing listens there
    env.write(CONFIG.format(rollout="""\
      steps: [50, 100]
      step-min-launches: 1000
      recheck: true
      recheck-timeout: 1
      fallback:
        margin: 0.3
        min-launches: 4
""", port=port, retries=3, failing="{}").replace("  - name: jammy\n",
                                                 "  - name: jammy\n    min-ready: 4\n", 1))
    store = env.store()
    old = upload(env, store, 1)
    new = upload(env, store, 2)
    env.start_launcher()
    wait_until(lambda: str(fresh(store, new).state) == "deleting", timeout=60,
               message="the candidate to be withdrawn")
    state = Rollout.of(fresh(store, new))
    assert state.withdrawn_by == "fallback" and state.count("recheck_failures") >= 1
    # its stock goes; the stock left and refilled is the previous upload's
    wait_until(lambda: not [n for n in store.list_nodes() if n.image_id == new.path
                            and str(n.state) == "ready"], message="the candidate's stock to go")
    wait_until(lambda: len([n for n in store.list_nodes() if n.image_id == old.path
                            and str(n.state) == "ready"]) >= 4, message="stock of the previous")


def test_nodes_given_back_unused_count_against_their_upload(sqlite_launcher_env, sshd):
    """A requestor that gives nodes back without using them (Zuul unlocks them and deletes
    its request) adds ``returned_unused`` to the upload they booted from."""
    env = sqlite_launcher_env
    write(env, sshd, """\
      steps: [100]
      step-min-launches: 1000
""")
    store = env.store()
    upload(env, store, 1)
    new = upload(env, store, 2)
    env.start_launcher()
    client = env.client()
    wait_until(lambda: phase(store, new) == ROLLING, message="the rollout to start")
    nodes = client.accept(client.wait(client.submit(["jammy"]).id, timeout=30))
    assert nodes[0].image_id == new.path                  # 100% of launches at this step
    for node in nodes:                                     # given back without use
        node.lock.release()
    wait_until(lambda: Rollout.of(fresh(store, new)).count("returned_unused") == 1,
               message="the unused node counted")
    assert store.get_node(nodes[0].id).allocated_to is None    # back in stock


def test_store_errors_keep_counts_and_put_validation_off(sqlite_launcher_env):
    """The rollout side of a launcher against a real store that fails at the worst moments:
    outcome counts that could not be written are kept and written by the next pass; a
    validation whose node request cannot be submitted is tried again after its backoff,
    without counting against the upload."""
    from fixtures.interleave import InterleavedStore
    from nodepool.errors import StoreError
    from nodepool.launcher.validation import RolloutManager
    env = sqlite_launcher_env
    write(env, types.SimpleNamespace(port=free_port()), """\
      validation:
        retry-delay: 5
""")
    store = env.store()
    upload(env, store, 1)
    new = upload(env, store, 2)
    flaky = InterleavedStore(store)

    def fail(*_):
        raise StoreError("the store is down")
    manager = RolloutManager(flaky, lambda: env.config, "test-launcher")
    try:
        manager.record(Node(image_id=new.path), "launch_failures")
        flaky.before("update_upload", fail)
        manager.flush()
        assert Rollout.of(fresh(store, new)).count("launch_failures") == 0
        manager.flush()
        assert Rollout.of(fresh(store, new)).count("launch_failures") == 1
        manager.run([], [], now=100.0, force=True)            # the candidate starts validating
        assert phase(store, new) == VALIDATING
        flaky.before("submit_request", fail)
        manager.run([], [], now=101.0, force=True)            # claimed; the request fails
        val = Rollout.of(fresh(store, new)).validation
        assert val["state"] == "pending" and val["attempts"] == 0
        assert val["next_try"] == 106.0 and "not submitted" in val["reason"]
        manager.run([], [], now=102.0, force=True)            # still backing off
        assert Rollout.of(fresh(store, new)).validation["state"] == "pending"
        manager.run([], [], now=107.0, force=True)
        val = Rollout.of(fresh(store, new)).validation
        assert val["state"] == "running" and store.get_request(val["request"]) is not None
    finally:
        manager.stop()
