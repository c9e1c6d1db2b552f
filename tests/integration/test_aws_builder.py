"""Diskimages through the builder to AWS and back out through the launcher, on a real moto server.

The builder runs in this process without worker threads (passes are triggered: ``build_once``,
``upload_once``, ``janitor_pass``) and really runs ``nodepool-image-create`` for a raw image;
the launcher runs in a thread (``LauncherEnv``); both share the embedded SQLite store of one
config file.  moto has no VM Import, so the provider uses ``import-method: ebs-direct`` (moto
implements the EBS direct API; nothing is staged in S3 then), and moto's ``RegisterImage`` makes
a snapshot of its own for the AMI besides the one we tag.
"""
import io
import shutil
import sys

import pytest

from fixtures.moto import REGION
from nodepool.builder.builder import Builder
from nodepool.cli.nodepool import main as nodepool_cli
from nodepool.drivers.base import META_BUILD_ID, META_PROVIDER, META_UPLOAD_ID, ImageUploadSpec
from nodepool.model import NodeState, RequestState
from nodepool.model.images import newest_ready_upload

pytestmark = pytest.mark.slow

BUCKET = "np-images"
IMAGE_CREATE = shutil.which("nodepool-image-create") or (
    f"{sys.executable} -m nodepool.builder.image_create")

CONFIG = """\
images-dir: {tmp}/images
build-log-dir: {tmp}/logs
elements-dir: {tmp}/elements
labels:
  - name: small
  - name: built
diskimages:
  - name: debian
    elements: [base]
    release: bookworm
    dib-cmd: "{image_create}"
providers:
  - name: aws1
    driver: aws
    region-name: {region}
    endpoint-url: {endpoint}
    rate: 500
    launch-retries: 2
    image-format: raw
    # AMI names (and so S3 keys) must be unique; three builds may upload within one second here
    image-name-format: '{{image_name}}-{{build_id}}-{{upload_id}}'
    object-storage:
      bucket-name: {bucket}
    cloud-images:
      - name: ubuntu
        username: ubuntu
        image-filters:
          - name: name
            values: ['ubuntu/images/hvm-ssd/ubuntu-trusty-14.04*']
    diskimages:
      - name: debian
        import-method: ebs-direct
        volume-size: 1
        tags:
          team: ci
    pools:
      - name: main
        max-servers: 10
        host-key-checking: false
        labels:
          - name: small
            cloud-image: ubuntu
            instance-type: t3.medium
          - name: built
            diskimage: debian
            instance-type: t3.medium
"""


@pytest.fixture
def world(sqlite_launcher_env, moto, tmp_path):
    """(env, builder): the config written, the bucket made, a builder started without workers."""
    env = sqlite_launcher_env
    (tmp_path / "elements" / "base").mkdir(parents=True)
    env.write(CONFIG.format(tmp=tmp_path, image_create=IMAGE_CREATE, region=REGION,
                            endpoint=moto.url, bucket=BUCKET))
    moto.client("s3").create_bucket(Bucket=BUCKET)

    def fast_polls(prov):
        from nodepool.drivers import get_driver
        adapter = get_driver(prov.driver).adapter(prov)
        adapter.upload_poll = 0.05         # moto's volumes/snapshots are ready at once
        return adapter

    builder = Builder(env.config_path, hostname="test-builder", build_interval=0.1,
                      upload_interval=0.1, cleanup_interval=0.2, adapter_factory=fast_polls)
    builder.start(workers=False)
    yield env, builder
    builder.stop()
    builder.shutdown()


def build_and_upload(builder):
    """One manual build of ``debian`` and its upload to aws1; returns the ready upload."""
    builder.store.request_image_build("debian")
    assert builder.build_once() == 1
    assert builder.upload_once() == 1
    build = builder.store.list_builds("debian")[-1]
    [upload] = builder.store.list_uploads("debian", build_id=build.id, provider="aws1")
    assert str(upload.state) == "ready"
    return upload


def tags_of(item):
    return {t["Key"]: t["Value"] for t in item.get("Tags") or item.get("TagSet") or []}


def our_amis(ec2):
    return {img["ImageId"]: img for img in ec2.describe_images(Owners=["self"])["Images"]}


def snapshots_of(ec2, build_id, upload_id):
    """Snapshots tagged with one upload (upload ids count per build: both are needed)."""
    return ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": f"tag:{META_BUILD_ID}", "Values": [build_id]},
        {"Name": f"tag:{META_UPLOAD_ID}", "Values": [upload_id]}])["Snapshots"]


def snapshot_exists(ec2, snapshot_id):
    return bool(ec2.describe_snapshots(
        Filters=[{"Name": "snapshot-id", "Values": [snapshot_id]}])["Snapshots"])


def object_keys(s3):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def instance_image(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
        "Instances"][0]["ImageId"]


def boot(env, label="built"):
    """Request one node of ``label``; return it (still allocated to the test)."""
    client = env.client()
    [node] = client.request([label], timeout=60)
    return node


def test_build_uploads_a_tagged_ami_that_nodes_boot(world, moto, tmp_path):
    env, builder = world
    upload = build_and_upload(builder)
    ec2, s3 = moto.client("ec2"), moto.client("s3")

    assert upload.external_id.startswith("ami-") and upload.format == "raw"
    image = our_amis(ec2)[upload.external_id]
    assert image["Name"] == upload.external_name
    tags = tags_of(image)
    ours = {META_BUILD_ID: upload.build_id, META_UPLOAD_ID: upload.id, META_PROVIDER: "aws1"}
    assert {k: tags[k] for k in ours} == ours and tags["team"] == "ci"
    [snapshot] = snapshots_of(ec2, upload.build_id, upload.id)
    assert {k: tags_of(snapshot)[k] for k in ours} == ours and snapshot["VolumeSize"] == 1
    assert object_keys(s3) == []                         # ebs-direct stages nothing in S3
    assert ec2.describe_volumes(Filters=[{"Name": f"tag:{META_PROVIDER}",
                                          "Values": ["aws1"]}])["Volumes"] == []

    env.start_launcher()
    node = boot(env)
    assert node.provider == "aws1" and node.image_id == upload.path
    assert instance_image(ec2, node.external_id) == upload.external_id


def test_retention_keeps_two_and_deleting_the_current_upload_reverts(world, moto, tmp_path):
    env, builder = world
    ec2, s3 = moto.client("ec2"), moto.client("s3")
    first, second, third = (build_and_upload(builder) for _ in range(3))
    first_snapshots = [s["SnapshotId"] for s in snapshots_of(ec2, first.build_id, first.id)]
    first_snapshots.append(our_amis(ec2)[first.external_id]["BlockDeviceMappings"][0]["Ebs"][
        "SnapshotId"])

    builder.janitor_pass()
    assert sorted(our_amis(ec2)) == sorted([second.external_id, third.external_id])
    assert not any(snapshot_exists(ec2, s) for s in first_snapshots)
    assert sorted(u.id for u in builder.store.list_uploads("debian")) == sorted(
        [second.id, third.id])

    # `nodepool image-delete` of the current upload: new nodes boot the previous AMI
    out, err = io.StringIO(), io.StringIO()
    assert nodepool_cli(["-c", env.config_path, "image-delete", "--provider", "aws1",
                         "--image", "debian", "--build-id", third.build_id,
                         "--upload-id", third.id], out=out, err=err) == 0, err.getvalue()
    current = newest_ready_upload(builder.store.list_uploads(), "debian", "aws1")
    assert current.id == second.id
    builder.janitor_pass()
    assert sorted(our_amis(ec2)) == [second.external_id]
    assert snapshots_of(ec2, third.build_id, third.id) == []
    assert builder.upload_once() == 0                  # the withdrawal sticks

    env.start_launcher()
    node = boot(env)
    assert instance_image(ec2, node.external_id) == second.external_id


def test_leaked_ami_is_removed_by_the_builder_cleanup(world, moto, tmp_path):
    env, builder = world
    ec2, s3 = moto.client("ec2"), moto.client("s3")
    kept = build_and_upload(builder)
    # an AMI tagged as an upload to aws1 with no upload record (a builder died after making it)
    leak_file = tmp_path / "leak.raw"
    leak_file.write_bytes(b"\0" * 4096)
    prov = env.config.providers["aws1"]
    leaked_id = builder.adapter("aws1").upload_image(ImageUploadSpec(
        image_name="debian-leaked", filename=str(leak_file), image_format="raw",
        metadata={META_BUILD_ID: "0" * 32, META_UPLOAD_ID: "0000000999",
                  META_PROVIDER: "aws1"},
        provider_image=prov.diskimages["debian"]))
    leaked_snapshots = [s["SnapshotId"] for s in snapshots_of(ec2, "0" * 32, "0000000999")]
    assert leaked_snapshots and leaked_id in our_amis(ec2)
    # and one that is not ours at all
    foreign_snap = ec2.create_snapshot(VolumeId=ec2.create_volume(
        AvailabilityZone=f"{REGION}a", Size=1)["VolumeId"])["SnapshotId"]
    foreign = ec2.register_image(Name="someone-elses", RootDeviceName="/dev/sda1",
                                 BlockDeviceMappings=[{"DeviceName": "/dev/sda1",
                                                       "Ebs": {"SnapshotId": foreign_snap}}])[
        "ImageId"]

    builder.janitor_pass()
    assert sorted(our_amis(ec2)) == sorted([kept.external_id, foreign])
    assert not any(snapshot_exists(ec2, s) for s in leaked_snapshots)
    assert object_keys(s3) == []


def test_missing_ami_fails_its_request_clearly_while_other_labels_are_served(world, moto):
    env, builder = world
    ec2 = moto.client("ec2")
    upload = build_and_upload(builder)
    ec2.deregister_image(ImageId=upload.external_id)   # the record now points at nothing
    env.start_launcher()
    client = env.client()

    broken = client.submit(["built"])
    assert client.wait(broken.id, timeout=60).state == RequestState.FAILED
    reasons = " ".join(client.store.get_request(broken.id).extra["declined_reasons"].values())
    assert "aws1" in reasons
    assert f"image {upload.external_id} of diskimage debian not found" in reasons
    for _ in range(2):                                  # the launcher keeps serving
        node = boot(env, "small")
        assert node.state == NodeState.READY and node.provider == "aws1"
    assert not [n for n in client.store.list_nodes() if "built" in n.type
                and n.state == NodeState.READY]
