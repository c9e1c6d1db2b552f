"""The builder against the real embedded SQLite store, the simulated cloud's state files and the
real nodepool-image-create command.

Most tests start the builder without worker threads and drive passes (``build_once``,
``upload_once``, ``janitor_pass``) so every step is deterministic; the ``slow`` ones run
``nodepool-builder`` as a process and SIGKILL it mid-build and mid-upload.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fixtures.launcher import assert_no_loop_crash
from nodepool.builder.builder import Builder
from nodepool.builder.planner import DeleteBuild
from nodepool.drivers.simulated.cloud import SimulatedCloud
from nodepool.model.images import newest_ready_upload
from nodepool.store.sqlite import SQLiteStore

PYTHON = sys.executable
IMAGE_CREATE = f"{PYTHON} -m nodepool.builder.image_create"


def states(records):
    return sorted(str(r.state) for r in records)


class Env:
    """A tmp_path world: config file, elements, images-dir, store and two simulated clouds."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.images_dir = tmp_path / "images"
        self.log_dir = tmp_path / "logs"
        self.elements = tmp_path / "elements"
        self.config_path = tmp_path / "nodepool.yaml"
        self.db = tmp_path / "nodepool.sqlite"
        self.element("base")
        self.builders = []
        self.store = None

    def element(self, name, script=None):
        path = self.elements / name
        path.mkdir(parents=True, exist_ok=True)
        if script is not None:
            (path / "build.sh").write_text("#!/bin/sh\n" + textwrap.dedent(script))
            (path / "build.sh").chmod(0o755)

    def write_config(self, images=None, providers=("sim-a", "sim-b"), images_dir=None,
                     provider_extra="", hook=None, listed=None):
        """``listed`` maps a provider to the images it lists (default: all of them)."""
        images = images or {"ubuntu": {}}
        listed = listed or {}
        lines = [f"embedded-store:\n  path: {self.db}",
                 f"images-dir: {images_dir or self.images_dir}",
                 f"build-log-dir: {self.log_dir}",
                 "build-log-retention: 2",
                 f"elements-dir: {self.elements}",
                 "labels:"]
        lines += [f"  - name: {name}-node" for name in images]
        lines.append("diskimages:")
        for name, opts in images.items():
            opts = dict({"elements": ["base"], "release": "jammy", "dib-cmd": IMAGE_CREATE},
                        **opts)
            lines.append(f"  - name: {name}")
            for key, value in opts.items():
                rendered = value if not isinstance(value, str) else f'"{value}"'
                lines.append(f"    {key}: {rendered}")
        lines.append("providers:")
        for prov in providers:
            lines += [f"  - name: {prov}", "    driver: simulated",
                      f"    state-file: {self.tmp / (prov + '.cloud')}"]
            if hook:
                lines.append(f"    post-upload-hook: {hook}")
            if provider_extra:
                lines.append(textwrap.indent(provider_extra.strip(), "    "))
            names = listed.get(prov, list(images))
            lines.append("    diskimages:" if names else "    diskimages: []")
            lines += [f"      - name: {name}" for name in names]
            if not names:
                continue
            lines += ["    pools:", "      - name: main", "        labels:"]
            for name in names:
                lines += [f"          - name: {name}-node", f"            diskimage: {name}"]
        self.config_path.write_text("\n".join(lines) + "\n")
        # a changed config must look changed even within one mtime tick
        st = os.stat(self.config_path)
        os.utime(self.config_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    def open_store(self):
        if self.store is None:
            self.store = SQLiteStore(str(self.db))
            self.store.start()
        return self.store

    def builder(self, workers=False, **kw):
        kw.setdefault("build_interval", 0.1)
        kw.setdefault("upload_interval", 0.1)
        kw.setdefault("cleanup_interval", 0.2)
        builder = Builder(str(self.config_path), hostname="test-builder", **kw)
        builder.start(workers=workers)
        self.builders.append(builder)
        return builder

    def cloud(self, prov):
        return SimulatedCloud(self.tmp / (prov + ".cloud"))

    def cloud_image_ids(self, prov):
        return sorted(img.id for img in self.cloud(prov).list_images())

    def image_files(self):
        try:
            return sorted(n for n in os.listdir(self.images_dir) if n != "builder_id.txt")
        except FileNotFoundError:
            return []

    def close(self):
        for builder in self.builders:
            builder.stop()
            builder.shutdown()
        if self.store is not None:
            self.store.stop()


@pytest.fixture
def env(tmp_path, caplog):
    world = Env(tmp_path)
    world.write_config()
    yield world
    world.close()
    assert_no_loop_crash(caplog)


def build_and_upload(builder, store, image="ubuntu", manual=True):
    if manual:
        store.request_image_build(image)
    assert builder.build_once() == 1
    builder.upload_once()
    return store.list_builds(image)[-1]


# -- builds and uploads ------------------------------------------------------------------------------

def test_scheduled_build_uploads_to_two_providers(env):
    builder = env.builder()
    store = env.open_store()
    assert [c.kind for c in store.list_components("builder")] == ["builder"]
    assert (env.images_dir / "builder_id.txt").read_text().strip() == builder.builder_id

    assert builder.build_once() == 1
    [build] = store.list_builds("ubuntu")
    assert (str(build.state), build.formats, build.builder, build.builder_id) == (
        "ready", "qcow2", "test-builder", builder.builder_id)
    assert os.path.isfile(env.images_dir / f"ubuntu-{build.id}.qcow2")
    log_text = (env.log_dir / f"ubuntu-{build.id}.log").read_text()
    assert "-t qcow2 --checksum --no-tmpfs --qemu-img-options compat=0.10" in log_text
    assert log_text.rstrip().endswith("Exit code: 0")
    assert builder.build_once() == 0          # fresh ready build: nothing to do

    assert builder.upload_once() == 2
    uploads = store.list_uploads("ubuntu")
    assert sorted((u.provider, str(u.state)) for u in uploads) == [
        ("sim-a", "ready"), ("sim-b", "ready")]
    for prov in ("sim-a", "sim-b"):
        up = newest_ready_upload(uploads, "ubuntu", prov)
        [cloud_image] = env.cloud(prov).list_images()
        assert cloud_image.id == up.external_id and cloud_image.name == up.external_name
        assert cloud_image.metadata == {"nodepool_build_id": build.id,
                                        "nodepool_upload_id": up.id,
                                        "nodepool_provider_name": prov}
    assert builder.upload_once() == 0


def test_worker_threads_build_and_upload_on_their_own(env):
    env.builder(workers=True)
    store = env.open_store()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len([u for u in store.list_uploads() if str(u.state) == "ready"]) == 2:
            break
        time.sleep(0.1)
    assert states(store.list_uploads()) == ["ready", "ready"]


def test_manual_build_request_is_cleared_when_the_build_is_ready(env):
    builder = env.builder()
    store = env.open_store()
    first = build_and_upload(builder, store, manual=False)
    store.request_image_build("ubuntu")
    assert builder.build_once() == 1
    assert store.get_image_build_request("ubuntu") is None
    builds = store.list_builds("ubuntu")
    assert len(builds) == 2 and builds[0].id == first.id


def test_retention_after_three_builds_keeps_the_two_newest_per_provider(env):
    builder = env.builder()
    store = env.open_store()
    b1, b2, b3 = (build_and_upload(builder, store) for _ in range(3))
    old_images = {p: newest_ready_upload(store.list_uploads(build_id=b1.id), "ubuntu", p)
                  .external_id for p in ("sim-a", "sim-b")}
    builder.janitor_pass()
    assert [b.id for b in store.list_builds("ubuntu")] == [b2.id, b3.id]
    for prov in ("sim-a", "sim-b"):
        ups = store.list_uploads("ubuntu", provider=prov)
        assert sorted(u.build_id for u in ups) == sorted([b2.id, b3.id])
        assert old_images[prov] not in env.cloud_image_ids(prov)
        assert sorted(env.cloud_image_ids(prov)) == sorted(u.external_id for u in ups)
    assert not any(b1.id in name for name in env.image_files())
    assert len(os.listdir(env.log_dir)) == 2           # build-log-retention: 2


def test_revert_by_deleting_the_current_upload_or_build(env):
    builder = env.builder()
    store = env.open_store()
    b1 = build_and_upload(builder, store)
    b2 = build_and_upload(builder, store)
    current = newest_ready_upload(store.list_uploads(), "ubuntu", "sim-a")
    assert current.build_id == b2.id
    current.set_state("deleting")                       # what `nodepool image-delete` does
    store.update_upload(current)
    assert newest_ready_upload(store.list_uploads(), "ubuntu", "sim-a").build_id == b1.id
    builder.janitor_pass()
    assert current.external_id not in env.cloud_image_ids("sim-a")
    assert store.get_upload("ubuntu", b2.id, "sim-a", current.id) is None

    bad = store.get_build("ubuntu", b2.id)               # `nodepool dib-image-delete`
    bad.set_state("deleting")
    store.update_build(bad)
    builder.janitor_pass()
    assert [b.id for b in store.list_builds("ubuntu")] == [b1.id]
    for prov in ("sim-a", "sim-b"):
        assert newest_ready_upload(store.list_uploads(), "ubuntu", prov).build_id == b1.id
    assert builder.upload_once() == 0                   # b1 is current everywhere already
    assert builder.build_once() == 0


def test_pause_by_config_and_by_flag(env):
    builder = env.builder()
    store = env.open_store()
    store.set_image_paused("ubuntu", True)
    store.request_image_build("ubuntu")
    assert builder.build_once() == 0
    store.set_image_paused("ubuntu", False)
    env.write_config(images={"ubuntu": {"pause": True}})
    assert builder.maybe_reload()
    assert builder.build_once() == 0
    assert store.list_builds() == []
    env.write_config()
    assert builder.maybe_reload()
    assert builder.build_once() == 1


# -- failures ----------------------------------------------------------------------------------------

def test_failed_build_leaves_no_files_and_is_retried(env):
    env.element("flaky", f"""
        if [ ! -e {env.tmp}/fixed ]; then echo 'flaky element broke' >&2; exit 3; fi
    """)
    env.write_config(images={"ubuntu": {"elements": ["base", "flaky"]}})
    builder = env.builder()
    store = env.open_store()
    assert builder.build_once() == 0
    [failed] = store.list_builds("ubuntu")
    assert str(failed.state) == "failed"
    log_text = (env.log_dir / f"ubuntu-{failed.id}.log").read_text()
    assert "flaky element broke" in log_text and log_text.rstrip().endswith("Exit code: 3")
    assert env.image_files() == []
    (env.tmp / "fixed").write_text("")
    assert builder.build_once() == 1
    builder.janitor_pass()
    assert states(store.list_builds("ubuntu")) == ["ready"]


@pytest.mark.slow
def test_build_timeout_kills_the_whole_process_group(env):
    pidfile = env.tmp / "sleeper.pid"
    env.element("hang", f"sleep 120 & echo $! > {pidfile}; wait\n")
    env.write_config(images={"ubuntu": {"elements": ["base", "hang"], "build-timeout": 1}})
    builder = env.builder()
    store = env.open_store()
    assert builder.build_once() == 0
    [build] = store.list_builds("ubuntu")
    assert str(build.state) == "failed"
    assert "build timed out after 1s" in (env.log_dir / f"ubuntu-{build.id}.log").read_text()
    sleeper = int(pidfile.read_text())
    deadline = time.monotonic() + 30
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(sleeper)
    assert env.image_files() == []


def test_missing_command_and_command_writing_nothing_fail_clearly(env):
    env.write_config(images={"ubuntu": {"dib-cmd": "/nonexistent/disk-image-create"},
                             "debian": {"dib-cmd": "true"}})
    builder = env.builder()
    store = env.open_store()
    assert builder.build_once() == 0
    by_image = {b.image: b for b in store.list_builds()}
    assert {i: str(b.state) for i, b in by_image.items()} == {"ubuntu": "failed",
                                                              "debian": "failed"}
    missing_log = (env.log_dir / f"ubuntu-{by_image['ubuntu'].id}.log").read_text()
    assert "command not found: /nonexistent/disk-image-create" in missing_log
    assert (env.log_dir / f"debian-{by_image['debian'].id}.log").read_text().rstrip() \
        .endswith("Exit code: 0")
    builder.janitor_pass()
    assert store.list_builds() == []


def test_unwritable_images_dir_fails_builds_but_keeps_running(env, caplog):
    (env.tmp / "a-file").write_text("")
    env.write_config(images_dir=env.tmp / "a-file" / "images")
    builder = env.builder()
    store = env.open_store()
    assert "cannot keep builder_id.txt" in caplog.text
    assert builder.build_once() == 0
    [build] = store.list_builds()
    assert str(build.state) == "failed"
    builder.janitor_pass()                              # no crash on an unreadable images-dir
    assert store.list_builds() == []


def test_unknown_image_request_and_deleting_a_missing_build_are_harmless(env):
    builder = env.builder()
    store = env.open_store()
    store.request_image_build("no-such-image")
    assert builder.build_once() == 1                    # only the configured image
    assert {b.image for b in store.list_builds()} == {"ubuntu"}
    assert builder.delete_build(DeleteBuild("ubuntu", "f" * 32, "test")) is True
    assert builder.delete_build(DeleteBuild("no-such-image", "0" * 32, "test")) is True


def test_build_finishing_after_a_lost_store_session_is_failed(env):
    import threading
    go = env.tmp / "go"
    started = env.tmp / "started"
    env.element("waits", f"""
        touch {started}
        while [ ! -e {go} ]; do sleep 0.05; done
    """)
    env.write_config(images={"ubuntu": {"elements": ["base", "waits"]}})
    builder = env.builder()
    store = env.open_store()
    worker = threading.Thread(target=builder.build_once)
    worker.start()
    try:
        wait_for(started.exists, "the build to start")
        # another process expires the builder's session (as after a freeze): its heartbeat
        # notices, the build lock went with it and the store opens a new session
        lost = builder.store.session_id
        store._tx(lambda conn: store._drop_session(conn, lost))
        wait_for(lambda: builder.store.session_id not in (None, lost), "a new session")
    finally:
        go.write_text("")
        worker.join(60)
    [build] = store.list_builds()
    assert str(build.state) == "failed" and env.image_files() == []


def test_builder_cli_rejects_bad_options(capsys):
    from nodepool.cli.builder import main
    assert main(["-c", "/nonexistent.yaml"]) == 2
    assert "only foreground mode" in capsys.readouterr().err
    assert main(["-f", "-c", "/nonexistent.yaml", "--build-workers", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


class FailingUploads:
    """Wraps an adapter so uploads to one provider raise after the image was created."""

    def __init__(self, inner, fail):
        self.inner = inner
        self.fail = fail

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def upload_image(self, spec):
        image_id = self.inner.upload_image(spec)
        if self.fail[0]:
            raise RuntimeError(f"simulated failure after creating {image_id}")
        return image_id


def test_failing_provider_does_not_stall_others_and_is_retried(env):
    from nodepool.drivers import get_driver
    fail = [True]

    def factory(prov):
        adapter = get_driver(prov.driver).adapter(prov)
        return FailingUploads(adapter, fail) if prov.name == "sim-b" else adapter

    builder = env.builder(adapter_factory=factory)
    store = env.open_store()
    builder.build_once()
    assert builder.upload_once() == 1
    assert sorted((u.provider, str(u.state)) for u in store.list_uploads()) == [
        ("sim-a", "ready"), ("sim-b", "failed")]
    assert env.cloud_image_ids("sim-b") == []          # the half-made image was deleted
    fail[0] = False
    assert builder.upload_once() == 1
    builder.janitor_pass()
    assert sorted((u.provider, str(u.state)) for u in store.list_uploads()) == [
        ("sim-a", "ready"), ("sim-b", "ready")]


def test_post_upload_hook_failure_deletes_the_cloud_image(env):
    hook = env.tmp / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$@\" >> {env.tmp}/hook.calls\n"
                    f"[ -e {env.tmp}/hook-ok ] || exit 1\n")
    hook.chmod(0o755)
    env.write_config(providers=("sim-a",), hook=hook)
    builder = env.builder()
    store = env.open_store()
    builder.build_once()
    assert builder.upload_once() == 0
    assert states(store.list_uploads()) == ["failed"] and env.cloud_image_ids("sim-a") == []
    provider, external_id, filename = (env.tmp / "hook.calls").read_text().split()
    assert provider == "sim-a" and external_id.startswith("sim-img-")
    assert filename.endswith(".qcow2")
    (env.tmp / "hook-ok").write_text("")
    assert builder.upload_once() == 1


def test_delete_after_upload_removes_uploaded_format_files(env):
    env.write_config(images={"ubuntu": {"delete-after-upload": True, "formats": ["tar"]}})
    builder = env.builder()
    store = env.open_store()
    build = build_and_upload(builder, store)
    builder.janitor_pass()
    base = f"ubuntu-{build.id}"
    assert env.image_files() == sorted([f"{base}.d", f"{base}.tar", f"{base}.tar.md5",
                                        f"{base}.tar.sha256"])
    assert states(store.list_uploads()) == ["ready", "ready"]


def test_leaked_cloud_images_are_removed(env):
    builder = env.builder()
    store = env.open_store()
    build_and_upload(builder, store)
    leak = env.cloud("sim-a").create_image(
        "leaked", image_format="qcow2", size=1, md5=None, sha256=None,
        metadata={"nodepool_build_id": "0" * 32, "nodepool_upload_id": "0000000009",
                  "nodepool_provider_name": "sim-a"})
    foreign = env.cloud("sim-a").create_image("someone-elses", image_format="qcow2", size=1,
                                               md5=None, sha256=None, metadata={"owner": "x"})
    builder.janitor_pass()
    ids = env.cloud_image_ids("sim-a")
    assert leak.id not in ids and foreign.id in ids
    assert len(ids) == 2


def test_image_removed_from_config_and_provider_dropping_it(env):
    builder = env.builder()
    store = env.open_store()
    build_and_upload(builder, store)
    env.write_config(providers=("sim-a", "sim-b"), images={"ubuntu": {}, "debian": {}})
    builder.maybe_reload()
    builder.build_once()
    builder.upload_once()
    assert len(env.cloud_image_ids("sim-b")) == 2
    # sim-b stops listing anything; ubuntu disappears from the config entirely
    env.write_config(images={"debian": {}}, listed={"sim-b": []})
    builder.maybe_reload()
    builder.janitor_pass()
    assert {b.image for b in store.list_builds()} == {"debian"}
    assert {(u.image, u.provider) for u in store.list_uploads()} == {("debian", "sim-a")}
    assert len(env.cloud_image_ids("sim-a")) == 1
    assert env.cloud_image_ids("sim-b") == []
    assert all(name.startswith("debian-") for name in env.image_files())


# -- a killed builder process ----------------------------------------------------------------------

def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start_builder_process(env):
    log = open(env.tmp / "builder.out", "ab")
    proc = subprocess.Popen([PYTHON, "-m", "nodepool.cli.builder", "-f", "-c",
                             str(env.config_path), "--upload-workers", "2",
                             "-p", str(env.tmp / "builder.pid")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    return proc


def wait_for(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def processes():
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_builder_killed_mid_build_and_mid_upload_leaks_nothing(env, processes):
    started = env.tmp / "build-started"
    env.element("slow", f"""
        if [ -e {env.tmp}/slow ]; then touch {started}; sleep 120; fi
    """)
    (env.tmp / "slow").write_text("")
    env.write_config(images={"ubuntu": {"elements": ["base", "slow"]}},
                     provider_extra="upload-time: 120")
    store = env.open_store()

    proc = start_builder_process(env)
    processes.append(proc)
    wait_for(started.exists, "the build to start")
    assert (env.tmp / "builder.pid").read_text().strip() == str(proc.pid)
    assert states(store.list_builds()) == ["building"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    # Restart: the killed build is failed and cleaned, a new one builds and starts uploading.
    (env.tmp / "slow").unlink()
    proc = start_builder_process(env)
    processes.append(proc)
    wait_for(lambda: any(str(u.state) == "uploading" for u in store.list_uploads())
             and all(env.cloud_image_ids(p) for p in ("sim-a", "sim-b")),
             "uploads to reach the clouds")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert "uploading" in states(store.list_uploads())

    # Restart with fast uploads: abandoned uploads and their cloud images go, new ones finish.
    env.write_config(images={"ubuntu": {"elements": ["base", "slow"]}})
    proc = start_builder_process(env)
    processes.append(proc)
    wait_for(lambda: states(store.list_uploads()) == ["ready", "ready"]
             and all(len(env.cloud_image_ids(p)) == 1 for p in ("sim-a", "sim-b")),
             "clean uploads", timeout=90)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0

    builds = store.list_builds()
    assert states(builds) == ["ready"]
    [build] = builds
    assert env.image_files() == sorted(f"ubuntu-{build.id}{s}" for s in
                                       (".d", ".qcow2", ".qcow2.md5", ".qcow2.sha256"))
    assert os.listdir(env.images_dir / f"ubuntu-{build.id}.d") == ["manifest.json"]
    for prov in ("sim-a", "sim-b"):
        [up] = store.list_uploads(provider=prov)
        assert env.cloud_image_ids(prov) == [up.external_id]
    assert store.list_components("builder") == []


# -- races between the janitor and the workers ------------------------------------------------------
# Another builder (its own store session) acts between two store calls of ours, exactly where a
# real race lands; before the fix each of these deleted, or resurrected, a current image.

@pytest.fixture
def raced(env):
    """(builder on an interleaving store, our plain store, another builder's store session)."""
    from fixtures.interleave import InterleavedStore
    inner = SQLiteStore(str(env.db)).start()
    other = SQLiteStore(str(env.db)).start()
    builder = env.builder(store=InterleavedStore(inner))
    yield builder, env.open_store(), other
    other.stop()
    builder.shutdown()
    inner.stop()


def test_build_finishing_between_listing_and_lock_probe_is_kept(env, raced):
    from nodepool.model.records import ImageBuild
    from nodepool.store.base import image_build_lock_path
    builder, store, other = raced
    lock = other.lock(image_build_lock_path("ubuntu"))
    build = other.create_build(ImageBuild(image="ubuntu", state="building",
                                          state_time=time.time(), formats="qcow2"))

    def finish():
        rec = other.get_build("ubuntu", build.id)
        rec.set_state("ready")
        other.update_build(rec)
        lock.release()

    builder.store.before("is_locked", finish)
    builder.janitor_pass()
    assert builder.store.fired == [("before", "is_locked")]
    assert str(store.get_build("ubuntu", build.id).state) == "ready"


def test_upload_finishing_between_listing_and_lock_probe_is_kept(env, raced):
    from nodepool.model.records import ImageUpload
    from nodepool.store.base import upload_lock_path
    builder, store, other = raced
    build_and_upload(builder, store)
    b2 = build_and_upload(builder, store)
    store.request_image_build("ubuntu")
    assert builder.build_once() == 1
    b3 = store.list_builds("ubuntu")[-1]
    # another builder is uploading b3 to sim-a: lock, record, then the cloud image
    lock = other.lock(upload_lock_path("ubuntu", b3.id, "sim-a"))
    up = other.create_upload(ImageUpload(image="ubuntu", build_id=b3.id, provider="sim-a",
                                         state="uploading", format="qcow2"))
    image = env.cloud("sim-a").create_image(
        "ubuntu-new", image_format="qcow2", size=1, md5=None, sha256=None,
        metadata={"nodepool_build_id": b3.id, "nodepool_upload_id": up.id,
                  "nodepool_provider_name": "sim-a"})

    def finish():
        rec = other.get_upload("ubuntu", b3.id, "sim-a", up.id)
        rec.set_state("ready")
        rec.external_id = image.id
        other.update_upload(rec)
        lock.release()

    builder.store.before("is_locked", finish,
                         when=lambda path: path == upload_lock_path("ubuntu", b3.id, "sim-a"))
    builder.janitor_pass()
    assert builder.store.fired == [("before", "is_locked")]
    current = newest_ready_upload(store.list_uploads(), "ubuntu", "sim-a")
    assert (current.id, current.build_id) == (up.id, b3.id)
    assert image.id in env.cloud_image_ids("sim-a")
    builder.janitor_pass()      # the next pass drops the oldest, keeps current and previous
    assert sorted(u.build_id for u in store.list_uploads(provider="sim-a")) == sorted(
        [b2.id, b3.id])


def test_upload_marked_deleting_while_uploading_is_not_made_ready(env, raced):
    builder, store, other = raced
    assert builder.build_once() == 1

    def operator_deletes(upload):
        rec = other.get_upload(upload.image, upload.build_id, upload.provider, upload.id)
        rec.set_state("deleting")               # what `nodepool image-delete` does
        other.update_upload(rec)

    # between the worker's read of its record and its write of "ready"
    builder.store.before("update_upload", lambda: operator_deletes(target[0]),
                         when=lambda rec, **kw: rec.provider == "sim-a")
    target = []
    builder.store.after("create_upload", target.append,
                        when=lambda rec: rec.provider == "sim-a")
    builder.upload_once()
    [up] = store.list_uploads(provider="sim-a")
    assert str(up.state) == "deleting"
    assert env.cloud_image_ids("sim-a") == []       # the worker removed what it made
    builder.janitor_pass()
    assert store.list_uploads(provider="sim-a") == []


def test_rollout_retention_and_withdrawal_with_the_real_builder(env):
    """Under a rollout policy the builder keeps the upload that serves although two newer ones
    exist, deletes a withdrawn upload's cloud image and never uploads that build there again;
    the reason stays visible after the upload record is gone."""
    from nodepool.cli.rollout import rollout_rows
    from nodepool.config import load_config
    from nodepool.launcher.validation import withdraw_upload
    from nodepool.model.rollout import ROLLING, Rollout
    env.write_config(images={"ubuntu": {"rollout": {"steps": [50, 100]}}})
    builder = env.builder()
    store = env.open_store()
    b1, b2 = build_and_upload(builder, store), build_and_upload(builder, store)
    for up in store.list_uploads(build_id=b2.id):       # what a launcher records
        state = Rollout.of(up)
        state.phase = ROLLING
        state.store(up)
        store.update_upload(up)
    b3 = build_and_upload(builder, store)
    builder.janitor_pass()
    # b1 still serves on both providers (b2 rolls out, b3 is newer): nothing was deleted
    assert [b.id for b in store.list_builds("ubuntu")] == [b1.id, b2.id, b3.id]
    for prov in ("sim-a", "sim-b"):
        assert sorted(u.build_id for u in store.list_uploads("ubuntu", provider=prov)) == \
            sorted([b1.id, b2.id, b3.id])
    # the launcher withdraws b3 on sim-a: the builder deletes its image and does not re-upload
    bad = next(u for u in store.list_uploads(build_id=b3.id) if u.provider == "sim-a")
    withdraw_upload(store, bad, "validation", "command exited 1", time.time())
    builder.janitor_pass()
    assert store.get_upload("ubuntu", b3.id, "sim-a", bad.id) is None
    assert bad.external_id not in env.cloud_image_ids("sim-a")
    assert builder.upload_once() == 0
    rows = rollout_rows(load_config(str(env.config_path)), store.list_uploads(),
                        store.list_builds())
    gone = [r for r in rows if r["id"] == b3.id and r["provider"] == "sim-a"]
    assert gone and gone[0]["reason"] == "validation: command exited 1"
