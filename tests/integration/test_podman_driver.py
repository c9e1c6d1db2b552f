"""The podman driver with real containers: nodes boot from images the builder built and
uploaded, accept an SSH login checked against their scanned host keys, and are removed again;
a launcher killed mid-launch leaks nothing; image retention and revert act on podman's store.

One Debian node root is built per session (``fixtures.podman.node_image``, debootstrap cached
across sessions); each test has a provider name of its own and its containers and images are
removed after it.  Skipped, with the probe's one-line reason, only where containers cannot run.
"""
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from fixtures.launcher import wait_until
from fixtures.podman import containers_of, node_config, podman, ssh_command
from nodepool.builder.builder import Builder
from nodepool.config import load_config
from nodepool.config.model import PoolLabel
from nodepool.drivers import get_driver
from nodepool.drivers.base import (META_BUILD_ID, META_NODE_ID, META_POOL, META_PROVIDER,
                                   META_UPLOAD_ID, ImageUploadSpec, LaunchSpec)
from nodepool.errors import PermanentCloudError
from nodepool.model.images import newest_ready_upload

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("podman")]


def write_config(env, provider, node_image, max_servers=2, provider_extra=""):
    """A launcher and builder config: one podman provider serving a built Debian node."""
    return env.write(node_config(env.dir, provider, node_image.env_vars,
                                 max_servers=max_servers, provider_extra=provider_extra))


def builder_for(env):
    builder = Builder(env.config_path, hostname="test-builder", build_interval=0.1,
                      upload_interval=0.1, cleanup_interval=0.2)
    builder.start(workers=False)
    env.builders = getattr(env, "builders", []) + [builder]
    return builder


def build_and_upload(builder, store):
    store.request_image_build("debian-node")
    assert builder.build_once() == 1
    assert builder.upload_once() == 1
    return store.list_builds("debian-node")[-1]


@pytest.fixture
def world(sqlite_launcher_env, podman_provider_name, node_image):
    env = sqlite_launcher_env
    env.provider = podman_provider_name
    env.node_image = node_image
    write_config(env, podman_provider_name, node_image)
    yield env
    for builder in getattr(env, "builders", []):
        builder.stop()
        builder.shutdown()


def run_on(node, world, command):
    argv = ssh_command(node, world.node_image.key, str(world.dir / "known_hosts"), command)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# -- a job on a real node ----------------------------------------------------------------------

def test_built_image_boots_a_node_that_runs_a_job_over_ssh(world):
    # the machine's capacity as the provider's quota: one core, so one 1-core node at a time
    write_config(world, world.provider, world.node_image, provider_extra="max-cores: 1")
    store = world.store()
    build = build_and_upload(builder_for(world), store)
    upload = newest_ready_upload(store.list_uploads(), "debian-node", world.provider)
    [image] = json.loads(podman("image", "inspect", upload.external_id))
    assert image["Config"]["Labels"][META_BUILD_ID] == build.id
    assert image["Config"]["Labels"][META_UPLOAD_ID] == upload.id

    world.start_launcher()
    client = world.client()
    [node] = client.request(["debian-node"], timeout=120)
    client.use([node])
    assert (node.interface_ip, node.username) == ("127.0.0.1", "zuul")
    assert node.connection_port != 22 and node.host_keys
    labels = containers_of(world.provider)[node.external_id]
    assert (labels[META_NODE_ID], labels[META_POOL]) == (node.id, "main")
    [info] = json.loads(podman("inspect", node.external_id))
    assert info["Image"].startswith(upload.external_id)
    assert info["HostConfig"]["NanoCpus"] == 1_000_000_000
    assert info["HostConfig"]["Memory"] == 512 * 1024 * 1024

    result = run_on(node, world, "uname -n; id -un; python3 -c 'print(6*7)'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"np{node.id}", "zuul", "42"]

    # a second request waits at the cores quota while the first node is in use...
    second = client.submit(["debian-node"])
    time.sleep(3)
    assert str(store.get_request(second.id).state) in ("requested", "pending")
    assert list(containers_of(world.provider)) == [node.external_id]
    client.release([node])
    wait_until(lambda: node.external_id not in containers_of(world.provider), timeout=60,
               message="the used node's container removed")
    wait_until(lambda: store.get_node(node.id) is None, timeout=30, message="record gone")
    # ...and is served once it is gone
    [other] = client.accept(client.wait(second.id, timeout=120))
    assert other.external_id in containers_of(world.provider)
    client.release([other])


# -- crashes and leaks -------------------------------------------------------------------------

def test_launcher_killed_mid_launch_leaks_nothing(world):
    store = world.store()
    build_and_upload(builder_for(world), store)
    first = world.spawn_launcher()
    client = world.client()
    req = client.submit(["debian-node"])
    # SIGKILL the launcher as soon as its container exists, before the node is ready
    name = wait_until(lambda: next(iter(containers_of(world.provider)), None), timeout=60,
                      interval=0.005, message="a container being launched")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_node = containers_of(world.provider)[name][META_NODE_ID]

    world.spawn_launcher()
    req = client.wait(req.id, timeout=180)
    [node] = client.accept(req)
    # the killed launch's container went: either it became this node, or it was cleaned up
    wait_until(lambda: set(containers_of(world.provider)) == {node.external_id}, timeout=90,
               message=f"only the serving node's container left (killed launch {killed_node})")
    client.release([node])
    wait_until(lambda: not containers_of(world.provider), timeout=60,
               message="no containers left")


def test_leaked_container_is_removed(world):
    store = world.store()
    build_and_upload(builder_for(world), store)
    upload = newest_ready_upload(store.list_uploads(), "debian-node", world.provider)
    prov = world.config.providers[world.provider]
    adapter = get_driver("podman").adapter(prov)
    pool = prov.pools["main"]
    # a container of ours whose node record never existed (a crash before the record was kept)
    spec = LaunchSpec(hostname="np9999999999", label=pool.labels["debian-node"], pool=pool,
                      metadata={META_NODE_ID: "9999999999", META_POOL: "main",
                                META_PROVIDER: world.provider},
                      image_external_id=upload.external_id, node_id="9999999999")
    machine = adapter.create_state_machine(spec)
    wait_until(lambda: machine.advance(), timeout=60, interval=0.05, message="stray container")
    # and a container of another provider on the same host, which must be left alone
    other = {META_NODE_ID: "9999999998", META_POOL: "main",
             META_PROVIDER: world.provider + "-other"}
    other_machine = adapter.create_state_machine(
        LaunchSpec(hostname="np9999999998", label=spec.label, pool=pool, metadata=other,
                   image_external_id=upload.external_id, node_id="9999999998"))
    try:
        wait_until(lambda: other_machine.advance(), timeout=60, interval=0.05,
                   message="foreign container")
        assert machine.external_id in containers_of(world.provider)
        world.start_launcher()
        wait_until(lambda: machine.external_id not in containers_of(world.provider),
                   timeout=30, message="the leaked container removed")
        assert other_machine.external_id in containers_of(world.provider + "-other")
    finally:
        podman("rm", "--force", "--time", "0", other_machine.external_id, check=False)


# -- images: upload, retention, revert ---------------------------------------------------------

def podman_image_ids(provider):
    out = podman("images", "--filter", f"label=nodepool_provider_name={provider}",
                 "--format", "{{.ID}}", "--no-trunc")
    return sorted({line.split(":", 1)[-1] for line in out.split()})


def test_retention_and_revert_act_on_podmans_image_store(world):
    store = world.store()
    builder = builder_for(world)
    b1, b2, b3 = (build_and_upload(builder, store) for _ in range(3))
    # an image labelled as an upload of ours that has no record (a builder killed mid-upload)
    adapter = get_driver("podman").adapter(world.config.providers[world.provider])
    leaked = adapter.upload_image(ImageUploadSpec(
        image_name="debian-node-leaked", filename=world.node_image.tar, image_format="tar",
        metadata={META_BUILD_ID: "f" * 32, META_UPLOAD_ID: "0000000099",
                  META_PROVIDER: world.provider}))
    builder.janitor_pass()
    assert [b.id for b in store.list_builds("debian-node")] == [b2.id, b3.id]
    ups = store.list_uploads("debian-node", provider=world.provider)
    assert podman_image_ids(world.provider) == sorted(u.external_id for u in ups)
    assert leaked not in podman_image_ids(world.provider)

    current = newest_ready_upload(ups, "debian-node", world.provider)
    previous = next(u for u in ups if u.build_id == b2.id)
    assert current.build_id == b3.id
    current.set_state("deleting")                     # what `nodepool image-delete` does
    store.update_upload(current)
    builder.janitor_pass()
    assert podman_image_ids(world.provider) == [previous.external_id]

    world.start_launcher()
    client = world.client()
    [node] = client.request(["debian-node"], timeout=120)
    [info] = json.loads(podman("inspect", node.external_id))
    assert info["Image"].startswith(previous.external_id)       # new nodes boot the previous
    # an image still used by a node is deleted once the node is gone, as a cloud would do
    previous.set_state("deleting")
    store.update_upload(previous)
    builder.janitor_pass()
    assert podman_image_ids(world.provider) == [previous.external_id]
    client.release([node])
    wait_until(lambda: not containers_of(world.provider), timeout=60, message="node removed")
    wait_until(lambda: builder.janitor_pass() or not podman_image_ids(world.provider),
               timeout=30, message="the image deleted after its last node")


def test_adapter_upload_boot_console_and_delete(podman_provider_name, node_image, tmp_path):
    driver = get_driver("podman")
    (tmp_path / "n.yaml").write_text(textwrap.dedent(f"""
        embedded-store:
          path: {tmp_path}/s.sqlite
        labels:
          - name: debian-node
          - name: broken-node
        providers:
          - name: {podman_provider_name}
            driver: podman
            cloud-images:
              - name: plain
                image: localhost/nodepool-test-missing:latest
            diskimages:
              - name: debian-node
              - name: broken-node
                command: [/usr/sbin/no-such-daemon, -D]
            pools:
              - name: main
                labels:
                  - name: debian-node
                    diskimage: debian-node
                  - name: broken-node
                    diskimage: broken-node
        diskimages:
          - name: debian-node
          - name: broken-node
        """))
    prov = load_config(str(tmp_path / "n.yaml")).providers[podman_provider_name]
    assert prov.options["image-format"] == "tar"
    adapter = driver.adapter(prov)
    adapter.start()
    meta = {META_BUILD_ID: "0000000001", META_UPLOAD_ID: "0000000001",
            META_PROVIDER: podman_provider_name}
    image_id = adapter.upload_image(ImageUploadSpec(
        image_name="debian-node-1", filename=node_image.tar, image_format="tar", metadata=meta))
    assert [(i.id, i.metadata) for i in adapter.list_images()
            if i.metadata.get(META_PROVIDER) == podman_provider_name] == [(image_id, meta)]
    pool = prov.pools["main"]
    spec = LaunchSpec(hostname="np0000000007", label=pool.labels["debian-node"], pool=pool,
                      metadata={META_NODE_ID: "0000000007", META_POOL: "main",
                                META_PROVIDER: podman_provider_name},
                      image_external_id=image_id, node_id="0000000007")
    machine = adapter.create_state_machine(spec)
    assert machine.advance() is None and machine.external_id.startswith("np0000000007-")
    inst = wait_until(machine.advance, timeout=60, message="container running")
    assert inst.ready and inst.connection_port and inst.node_id == "0000000007"
    listed = {i.external_id: i for i in adapter.list_instances()}
    assert listed[inst.external_id].connection_port == inst.connection_port
    wait_until(lambda: "Server listening" in adapter.console_log(inst.external_id),
               timeout=30, message="sshd started")
    with pytest.raises(Exception, match="still used by containers"):
        adapter.delete_image(image_id)

    # a container whose command cannot start fails its launch, saying why, and is removed
    broken = adapter.create_state_machine(LaunchSpec(
        hostname="np0000000008", label=pool.labels["broken-node"], pool=pool,
        metadata={META_NODE_ID: "0000000008", META_POOL: "main",
                  META_PROVIDER: podman_provider_name},
        image_external_id=image_id, node_id="0000000008"))
    with pytest.raises(PermanentCloudError, match="no-such-daemon.*not found"):
        wait_until(broken.advance, timeout=60, message="the broken launch to fail")
    assert broken.external_id in containers_of(podman_provider_name)       # left "created"
    wait_until(adapter.delete_state_machine(broken.external_id).advance, timeout=60,
               message="the exited container removed")
    delete = adapter.delete_state_machine(inst.external_id)
    wait_until(delete.advance, timeout=60, message="container removed")
    assert inst.external_id not in containers_of(podman_provider_name)
    assert wait_until(adapter.delete_state_machine(inst.external_id).advance, timeout=30)
    adapter.delete_image(image_id)
    adapter.delete_image(image_id)                  # a missing image is not an error
    assert image_id not in [i.id for i in adapter.list_images()]
    assert not adapter.label_ready(PoolLabel("plain-node", "main", podman_provider_name,
                                             cloud_image="plain"))


def test_runtime_that_cannot_start_containers_is_one_line(podman_provider_name, tmp_path):
    (tmp_path / "n.yaml").write_text(textwrap.dedent(f"""
        embedded-store:
          path: {tmp_path}/s.sqlite
        providers:
          - name: {podman_provider_name}
            driver: podman
            runtime: no-such-runtime
        """))
    prov = load_config(str(tmp_path / "n.yaml")).providers[podman_provider_name]
    with pytest.raises(PermanentCloudError) as info:
        get_driver("podman").adapter(prov).start()
    assert "\n" not in str(info.value)
    assert "OCI runtime 'no-such-runtime' is not installed" in str(info.value)
    # and podman's own refusal (here: more open files than the launcher may hold)
    (tmp_path / "n.yaml").write_text((tmp_path / "n.yaml").read_text().replace(
        "runtime: no-such-runtime", "ulimits:\n      nofile: 1073741816"))
    prov = load_config(str(tmp_path / "n.yaml")).providers[podman_provider_name]
    with pytest.raises(PermanentCloudError, match="containers cannot run here") as info:
        get_driver("podman").adapter(prov).start()
    assert "\n" not in str(info.value)
