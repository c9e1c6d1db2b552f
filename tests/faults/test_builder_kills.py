"""``kill -9`` of the builder process during builds and uploads, again and again.

The image is rebuilt every second (``rebuild-age: 1``) and uploads take a while, so kills land
in builds, in uploads and in the janitor.  While it runs, a watcher checks that every
image-provider pair, once it had a current and a previous ready upload, always keeps two, and that
the cloud image of every ready upload exists.  After the last restart (with rebuilding stopped)
the builder must leave exactly: two ready uploads per pair and no upload ``uploading`` or
failed; in each cloud exactly the images of those uploads; the two newest ready builds (plus an
older one only while it carries a kept upload), their files on disk and no other build files.
"""
import os
import sys
import threading
import time

import pytest

from faults.harness import fault_rng, report, wait_until
from nodepool.model.images import parse_build_file_name

pytestmark = pytest.mark.slow

PROVIDERS = ("sim-a", "sim-b")
IMAGE = "ubuntu"

CONFIG = """\
images-dir: {tmp}/images
build-log-dir: {tmp}/build-logs
build-log-retention: 2
elements-dir: {tmp}/elements
builder:
  build-interval: 0.3
  upload-interval: 0.3
  cleanup-interval: 0.5
labels:
  - name: ubuntu-node
diskimages:
  - name: ubuntu
    elements: [base, slow]
    release: jammy
    dib-cmd: "{python} -m nodepool.builder.image_create"
    rebuild-age: {rebuild_age}
providers:
{providers}"""

PROVIDER = """\
  - name: {name}
    driver: simulated
    state-file: {tmp}/{name}.sqlite
    upload-time: {upload_time}
    diskimages:
      - name: ubuntu
    pools:
      - name: main
        labels:
          - name: ubuntu-node
            diskimage: ubuntu
"""


def write_config(env, rebuild_age, upload_time=0.8):
    providers = "".join(PROVIDER.format(name=name, tmp=env.dir, upload_time=upload_time)
                        for name in PROVIDERS)
    env.write(CONFIG.format(tmp=env.dir, python=sys.executable, rebuild_age=rebuild_age,
                            providers=providers))


def state(record):
    return str(record.state)


class UploadWatch:
    """Samples uploads: a pair that had two ready uploads keeps two; ready means in the cloud."""

    def __init__(self, store, env):
        self.store = store
        self.clouds = {name: env.cloud(name) for name in PROVIDERS}
        self.problems = []
        self.samples = 0
        self.full = set()            # pairs that reached current + previous
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(30)

    def _run(self):
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self):
        uploads = self.store.list_uploads(image=IMAGE)
        self.samples += 1
        for prov in PROVIDERS:
            ready = [u for u in uploads if u.provider == prov and state(u) == "ready"]
            if len(ready) >= 2:
                self.full.add(prov)
            elif prov in self.full and len(self.problems) < 20:
                self.problems.append(f"{IMAGE}/{prov} had two ready uploads, now "
                                     f"{[u.id for u in ready]} ({len(ready)})")
            cloud_ids = {img.id for img in self.clouds[prov].list_images()}
            for up in ready:
                if up.external_id in cloud_ids:
                    continue
                again = self.store.get_upload(up.image, up.build_id, up.provider, up.id)
                if again is not None and state(again) == "ready" and len(self.problems) < 20:
                    self.problems.append(f"ready upload {up.build_id}/{prov}/{up.id}: cloud "
                                         f"image {up.external_id} missing")


def running_build(pid):
    """Whether the builder ``pid`` has a build command (``image_create``) running."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"image_create" in f.read():
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def leftovers(env, store):
    """What differs from the promised steady state, as sentences."""
    wrong = []
    builds = store.list_builds(IMAGE)
    uploads = store.list_uploads(image=IMAGE)
    ready_builds = {b.id for b in builds if state(b) == "ready"}
    for b in builds:
        if state(b) != "ready":
            wrong.append(f"build {b.id} is {state(b)}")
    # the two newest ready builds stay, and an older one only while it carries one of the two
    # newest ready uploads of a provider (uploads are made from the newest build only, so a
    # provider whose upload was killed can keep an older build's upload as its previous one)
    newest = sorted((b for b in builds if state(b) == "ready"),
                    key=lambda b: b.state_time or 0)[-2:]
    carrying = {u.build_id for u in uploads if state(u) == "ready"}
    if len(newest) != 2:
        wrong.append(f"{len(ready_builds)} ready builds, expected at least two")
    for build_id in sorted(ready_builds - {b.id for b in newest} - carrying):
        wrong.append(f"ready build {build_id} is neither one of the two newest nor carries a "
                     f"ready upload")
    for u in uploads:
        if state(u) != "ready":
            wrong.append(f"upload {u.build_id}/{u.provider}/{u.id} is {state(u)}")
        elif u.build_id not in ready_builds:
            wrong.append(f"ready upload {u.build_id}/{u.provider}/{u.id} of a build that is "
                         f"not ready")
    for prov in PROVIDERS:
        ready = {u.external_id for u in uploads if u.provider == prov and state(u) == "ready"}
        if len(ready) != 2:
            wrong.append(f"{IMAGE}/{prov}: {len(ready)} ready uploads, expected 2")
        in_cloud = {img.id for img in env.cloud(prov).list_images()}
        for extid in sorted(in_cloud - ready):
            wrong.append(f"cloud image {extid} in {prov} has no ready upload record")
        for extid in sorted(ready - in_cloud):
            wrong.append(f"ready upload's image {extid} is missing from {prov}")
    files = sorted(os.listdir(env.dir / "images"))
    on_disk = {}
    for name in files:
        parsed = parse_build_file_name(name)
        if parsed is not None:
            on_disk.setdefault(parsed[1], []).append(name)
    for build_id in sorted(set(on_disk) - ready_builds):
        wrong.append(f"files of build {build_id} without a ready build: {on_disk[build_id]}")
    for build_id in sorted(ready_builds):
        qcow2 = env.dir / "images" / f"{IMAGE}-{build_id}.qcow2"
        if not qcow2.exists() or qcow2.stat().st_size == 0:
            wrong.append(f"ready build {build_id} has no image file {qcow2.name}")
    return wrong


def describe(env, store):
    """Builds, uploads and cloud images, one per line (for a failure message)."""
    lines = [f"build {b.id} {state(b)} t={b.state_time:.1f} {b.extra or ''}"
             for b in store.list_builds(IMAGE)]
    lines += [f"upload {u.build_id}/{u.provider}/{u.id} {state(u)} t={u.state_time:.1f} "
              f"{u.external_id}" for u in store.list_uploads(image=IMAGE)]
    for prov in PROVIDERS:
        lines += [f"{prov} image {img.id} {img.status} {img.metadata.get('nodepool_build_id')}"
                  for img in env.cloud(prov).list_images()]
    return "\n".join(lines)


def test_builder_killed_during_builds_and_uploads_keeps_images_consistent(fault_env):
    """12 kills on SQLite, 10 on ZooKeeper where the builder lives longer between kills."""
    env = fault_env
    name = f"builder-kill-9[{env.kind}]"
    rng = fault_rng(name)
    # a killed builder's ZooKeeper session (and its build lock) outlives it by the session
    # timeout (2 s): its successor can only start building after that, so it lives longer
    kills = int(os.environ.get("NODEPOOL_FAULT_BUILDER_KILLS",
                               "12" if env.kind == "sqlite" else "10"))
    lifetime = (0.3, 3.0) if env.kind == "sqlite" else (2.0, 5.0)
    (env.dir / "elements" / "base").mkdir(parents=True)
    slow = env.dir / "elements" / "slow"
    slow.mkdir()
    (slow / "build.sh").write_text("#!/bin/sh\nsleep 1\n")      # a build lasts about 1 s
    (slow / "build.sh").chmod(0o755)
    write_config(env, rebuild_age=1)
    started = time.monotonic()
    store = env.store()
    proc = env.spawn_builder()
    wait_until(lambda: all(len([u for u in store.list_uploads(image=IMAGE, provider=p)
                                if state(u) == "ready"]) >= 2 for p in PROVIDERS),
               90, "current and previous uploads to both providers")
    watch = UploadWatch(store, env).start()
    hit = {"building": 0, "uploading": 0}
    for _ in range(kills):
        spawned = time.time()
        time.sleep(rng.uniform(*lifetime))
        building = running_build(proc.pid)
        uploads = store.list_uploads(image=IMAGE)
        env.kill(proc)
        hit["building"] += building
        # an upload this process started (an earlier one's is abandoned, not in progress)
        hit["uploading"] += any(state(u) == "uploading" and (u.state_time or 0) >= spawned
                                for u in uploads)
        proc = env.spawn_builder()
    # the last builder stops rebuilding and must clean up after its killed predecessors
    write_config(env, rebuild_age=86400)
    wrong = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        wrong = leftovers(env, store)
        if not wrong:
            break
        time.sleep(0.3)
    watch.stop()
    builds_made = env.log_count(" ready in ")
    report(name, seed=rng.seed_value, kills=kills, kills_during_build=hit["building"],
           kills_during_upload=hit["uploading"], samples=watch.samples,
           build_ids_seen=len({b.id for b in store.list_builds(IMAGE)}),
           abandoned_builds_failed=env.log_count("left building by a previous run"),
           builds_logged_ready=builds_made, seconds=round(time.monotonic() - started, 1))
    assert watch.problems == [], "\n".join(watch.problems)
    assert wrong == [], ("after the last restart the builder did not settle:\n" + "\n".join(wrong)
                         + "\n" + describe(env, store))
    assert hit["building"] + hit["uploading"] >= 3, f"too few kills landed in a build or an " \
                                                    f"upload: {hit}"
    assert env.crashes() == [], "\n".join(env.crashes())
