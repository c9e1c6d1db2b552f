"""The image path on the real local OpenStack: builder → Glance → launcher → retention → revert.

One test walks the whole life of a diskimage on an OpenStack provider, because every step needs
the previous one's Glance images (and each build/upload/boot costs seconds on this cloud).  The
builder runs in this process without worker threads and its passes are triggered
(``build_once``/``upload_once``/``janitor_pass``); the build command is the real
``nodepool-image-create`` writing qcow2; the launcher runs in a thread; ``nodepool`` CLI commands
run as processes, as an operator runs them.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("fixtures.launcher", reason="launcher fixtures need the embedded store")
from fixtures.launcher import wait_until  # noqa: E402
from nodepool.builder.builder import Builder  # noqa: E402
from nodepool.model.images import newest_ready_upload  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("openstack")]

IMAGE = "osimg"
IMAGE_CREATE = f"{sys.executable} -m nodepool.builder.image_create"
OUR_PROPERTIES = ("nodepool_build_id", "nodepool_upload_id", "nodepool_provider_name")


def write_config(env, provider):
    elements = env.dir / "elements"
    (elements / "base").mkdir(parents=True, exist_ok=True)
    return env.write(f"""
        images-dir: {env.dir}/images
        build-log-dir: {env.dir}/build-logs
        elements-dir: {elements}
        labels:
          - name: built
            min-ready: 0
        diskimages:
          - name: {IMAGE}
            elements: [base]
            release: bookworm
            formats: [qcow2]
            dib-cmd: {IMAGE_CREATE}
        providers:
          - name: {provider}
            driver: openstack
            cloud: local
            rate: 0.001
            boot-timeout: 60
            launch-timeout: 120
            image-upload-timeout: 120
            image-name-format: '{{image_name}}-{provider}-{{build_id}}-{{upload_id}}'
            diskimages:
              - name: {IMAGE}
                meta:
                  os_distro: debian
                  team: ci
            pools:
              - name: main
                max-servers: 4
                networks: [private]
                auto-floating-ip: false
                host-key-checking: false
                labels:
                  - name: built
                    diskimage: {IMAGE}
                    min-ram: 512
        """)


def glance_images_of(conn, provider):
    """Glance images tagged with ``provider``, by id."""
    return {img.id: img for img in conn.image.images()
            if (img.properties or {}).get("nodepool_provider_name") == provider}


def build_and_upload(builder, store):
    store.request_image_build(IMAGE)
    assert builder.build_once() == 1
    assert builder.upload_once() == 1
    build = store.list_builds(IMAGE)[-1]
    assert str(build.state) == "ready"
    [upload] = store.list_uploads(IMAGE, build.id)
    assert str(upload.state) == "ready"
    return build, upload


def boot_node(client, conn):
    """Request one ``built`` node and return the Glance image id its server booted from."""
    nodes = client.request(["built"], timeout=180)
    try:
        server = conn.compute.get_server(nodes[0].external_id)
        return server.image["id"]
    finally:
        client.release(nodes)


def nodepool_cli(env, *args):
    result = subprocess.run([sys.executable, "-m", "nodepool.cli.nodepool", "-c",
                             env.config_path, *args], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ))
    assert result.returncode == 0, f"nodepool {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.fixture
def builder_factory(sqlite_launcher_env):
    builders = []

    def start():
        builder = Builder(sqlite_launcher_env.config_path, hostname="os-test-builder",
                          build_interval=0.1, upload_interval=0.1, cleanup_interval=0.2)
        builder.start(workers=False)
        builders.append(builder)
        return builder

    yield start
    for builder in builders:
        builder.stop()
        builder.shutdown()


@pytest.fixture
def glance_cleanup(openstack_cloud, openstack_provider):
    """Delete every Glance image tagged with this test's provider afterwards."""
    yield
    conn = openstack_cloud.admin()
    for image_id in glance_images_of(conn, openstack_provider):
        conn.image.delete_image(image_id, ignore_missing=True)


def test_image_build_upload_boot_retention_revert_and_aliens(
        sqlite_launcher_env, openstack_cloud, openstack_provider, builder_factory,
        glance_cleanup):
    env = sqlite_launcher_env
    provider = openstack_provider
    write_config(env, provider)
    conn = openstack_cloud.admin()
    builder = builder_factory()
    store = env.store()

    # -- build with nodepool-image-create, upload to Glance with our properties -----------------
    b1, up1 = build_and_upload(builder, store)
    assert os.path.isfile(env.dir / "images" / f"{IMAGE}-{b1.id}.qcow2")
    image = conn.image.get_image(up1.external_id)
    assert image.status == "active" and image.disk_format == "qcow2"
    assert image.name == up1.external_name == f"{IMAGE}-{provider}-{b1.id}-{up1.id}"
    props = image.properties or {}
    assert {k: props.get(k) for k in OUR_PROPERTIES} == {
        "nodepool_build_id": b1.id, "nodepool_upload_id": up1.id,
        "nodepool_provider_name": provider}
    # os_distro is a standard Glance attribute, team an extra property
    assert (image.os_distro, props.get("team")) == ("debian", "ci"), props

    # -- a diskimage label boots from that upload --------------------------------------------------
    env.start_launcher()
    client = env.client()
    assert boot_node(client, conn) == up1.external_id

    # -- three builds: retention deletes the oldest Glance image, keeps the two newest ------------
    b2, up2 = build_and_upload(builder, store)
    b3, up3 = build_and_upload(builder, store)
    assert set(glance_images_of(conn, provider)) == {up1.external_id, up2.external_id,
                                                      up3.external_id}
    builder.janitor_pass()
    assert [b.id for b in store.list_builds(IMAGE)] == [b2.id, b3.id]
    wait_until(lambda: set(glance_images_of(conn, provider)) == {up2.external_id,
                                                                 up3.external_id},
               timeout=60, interval=0.5, message="the oldest Glance image to be deleted")
    assert boot_node(client, conn) == up3.external_id

    # -- revert: withdraw the current upload through the CLI ---------------------------------------
    out = nodepool_cli(env, "image-delete", "--provider", provider, "--image", IMAGE,
                       "--build-id", b3.id, "--upload-id", up3.id)
    assert up3.id in out
    assert newest_ready_upload(store.list_uploads(), IMAGE, provider).id == up2.id
    builder.janitor_pass()
    wait_until(lambda: set(glance_images_of(conn, provider)) == {up2.external_id},
               timeout=60, interval=0.5, message="the withdrawn upload's Glance image to go")
    assert store.get_upload(IMAGE, b3.id, provider, up3.id) is None
    assert builder.upload_once() == 0          # the withdrawn build is not uploaded again
    assert builder.build_once() == 0
    assert [u.id for u in store.list_uploads(IMAGE, provider=provider)] == [up2.id]
    assert boot_node(client, conn) == up2.external_id

    # -- alien-image-list: tagged as ours, no upload record ----------------------------------------
    alien = conn.image.create_image(
        name=f"alien-{provider}", disk_format="qcow2", container_format="bare",
        data=b"not really an image", nodepool_build_id="f" * 32,
        nodepool_upload_id="0000000099", nodepool_provider_name=provider)
    wait_until(lambda: alien.id in glance_images_of(conn, provider), timeout=60,
               interval=0.5, message="the alien image to be listed by Glance")
    out = nodepool_cli(env, "alien-image-list", provider)
    assert alien.id in out and f"alien-{provider}" in out
    assert up2.external_id not in out
    # the builder's janitor removes such leaks from providers it manages
    builder.janitor_pass()
    assert set(glance_images_of(conn, provider)) == {up2.external_id}
