"""Uploading a diskimage build to AWS as an AMI.

The file is turned into an EBS snapshot and registered as an AMI.  ``import-method`` says how
the snapshot is made:

* ``snapshot`` (default): the file is staged in the provider's S3 bucket, EC2 VM Import
  ``import_snapshot`` makes the snapshot, then ``register_image`` with it as root device;
* ``image``: staged in S3 too, VM Import ``import_image`` does both steps;
* ``ebs-direct``: no S3 and no VM Import: the EBS direct APIs write the (raw) file into a new
  snapshot block by block (``start_snapshot``, ``put_snapshot_block`` for every block that is
  not all zeros, ``complete_snapshot``), then ``register_image``.  Block writes go around the
  provider's ``rate`` (EBS direct limits them per snapshot itself), a few at a time.

The AMI, its snapshot and the S3 object carry the upload's metadata (``nodepool_build_id``,
``nodepool_upload_id``, ``nodepool_provider_name``), so ``list_resources`` can find leftovers.
A failed upload removes what it created.  Blocking: runs in a builder upload thread.
"""
import base64
import concurrent.futures
import hashlib
import math
import os
import time

from ...errors import CloudError, PermanentCloudError, TransientCloudError
from ..ratelimit import count_api_call
from .errors import translate_error
from .tags import clean, s3_tagging, tag_list, tag_specifications

GIB = 1024 ** 3
ROOT_DEVICE = "/dev/sda1"
EBS_BLOCK = 512 * 1024          # the EBS direct API's block size
EBS_THREADS = 8                 # blocks written at once


class ImageUpload:
    def __init__(self, adapter, spec):
        self.adapter = adapter
        self.spec = spec
        image_options = getattr(spec.provider_image, "options", None) or {}
        self.options = image_options
        tags = dict(image_options.get("tags") or {})
        tags["Name"] = spec.image_name
        tags.update(spec.metadata or {})
        self.tags = clean(tags)
        timeout = adapter.provider.options.get("image-import-timeout")
        self.timeout = timeout if timeout is not None else spec.timeout
        self.deadline = None
        self.created = []            # (kind, id) to remove if the upload fails
        self.what = f"{adapter.what}: upload image {spec.image_name}"

    def run(self):
        adapter, spec = self.adapter, self.spec
        method = self.options.get("import-method", "snapshot")
        if method != "ebs-direct" and not adapter.bucket:
            raise PermanentCloudError(f"{self.what}: object-storage.bucket-name is not set")
        if method == "ebs-direct" and spec.image_format != "raw":
            raise PermanentCloudError(f"{self.what}: import-method ebs-direct needs a raw "
                                      f"image, not {spec.image_format} (set image-format: raw)")
        self.deadline = time.monotonic() + (self.timeout or math.inf)
        try:
            if method == "ebs-direct":
                image_id = self.register(self.write_snapshot())
            else:
                key = adapter.object_key(spec.image_name, spec.image_format, spec.metadata)
                self.put_object(key)
                if method == "image":
                    image_id = self.import_image(key)
                else:
                    image_id = self.register(self.import_snapshot(key))
        except BaseException:
            self.remove_created()
            raise
        adapter.log.info("%s: registered %s (%s)", self.what, image_id, method)
        return image_id

    # -- steps -------------------------------------------------------------------------------------

    def put_object(self, key):
        adapter = self.adapter
        s3 = adapter.client("s3")
        adapter.call(f"{self.what}: bucket {adapter.bucket}",
                     lambda: s3.head_bucket(Bucket=adapter.bucket), operation="head_bucket")
        adapter.call(f"{self.what}: put s3://{adapter.bucket}/{key}",
                     lambda: s3.upload_file(self.spec.filename, adapter.bucket, key,
                                            ExtraArgs={"Tagging": s3_tagging(self.tags)}),
                     operation="upload_file")
        self.created.append(("object", key))

    def import_snapshot(self, key):
        """VM Import of the S3 object as a snapshot; polls the task until it completes."""
        adapter = self.adapter
        task = adapter.ec2(f"{self.what}: import snapshot", "import_snapshot",
                           Description=self.spec.image_name,
                           DiskContainer={"Format": self.spec.image_format.upper(),
                                          "UserBucket": {"S3Bucket": adapter.bucket,
                                                         "S3Key": key}},
                           TagSpecifications=tag_specifications(self.tags,
                                                                "import-snapshot-task"))
        task_id = task["ImportTaskId"]
        self.created.append(("import-task", task_id))

        def check():
            answer = adapter.ec2(f"{self.what}: import task {task_id}",
                                 "describe_import_snapshot_tasks", ImportTaskIds=[task_id])
            tasks = answer.get("ImportSnapshotTasks") or []
            detail = (tasks[0].get("SnapshotTaskDetail") or {}) if tasks else {}
            status = (detail.get("Status") or "").lower()
            if status == "completed":
                return detail["SnapshotId"]
            if status in ("deleted", "deleting", "error", "failed"):
                raise TransientCloudError(f"{self.what}: import task {task_id} {status}: "
                                          f"{detail.get('StatusMessage') or 'no reason given'}")
            return None
        snapshot_id = self.wait(f"import task {task_id}", check)
        self.created.remove(("import-task", task_id))
        self.created.append(("snapshot", snapshot_id))
        self.tag([snapshot_id])
        return snapshot_id

    def import_image(self, key):
        """VM Import of the S3 object straight into an AMI."""
        adapter = self.adapter
        task = adapter.ec2(f"{self.what}: import image", "import_image",
                           Description=self.spec.image_name,
                           Architecture=self.options.get("architecture", "x86_64"),
                           DiskContainers=[{"Format": self.spec.image_format.upper(),
                                            "UserBucket": {"S3Bucket": adapter.bucket,
                                                           "S3Key": key}}],
                           TagSpecifications=tag_specifications(self.tags, "import-image-task"))
        task_id = task["ImportTaskId"]
        self.created.append(("import-task", task_id))

        def check():
            answer = adapter.ec2(f"{self.what}: import task {task_id}",
                                 "describe_import_image_tasks", ImportTaskIds=[task_id])
            tasks = answer.get("ImportImageTasks") or []
            detail = tasks[0] if tasks else {}
            status = (detail.get("Status") or "").lower()
            if status == "completed":
                snaps = [d["SnapshotId"] for d in detail.get("SnapshotDetails") or []
                         if d.get("SnapshotId")]
                return detail["ImageId"], snaps
            if status in ("deleted", "deleting", "error", "failed"):
                raise TransientCloudError(f"{self.what}: import task {task_id} {status}: "
                                          f"{detail.get('StatusMessage') or 'no reason given'}")
            return None
        image_id, snapshots = self.wait(f"import task {task_id}", check)
        self.created.remove(("import-task", task_id))
        self.created.extend(("snapshot", s) for s in snapshots)
        self.created.append(("image", image_id))
        self.tag([image_id] + snapshots)
        return image_id

    def write_snapshot(self):
        """EBS direct: a new snapshot holding the file's bytes (see the module docstring)."""
        adapter, spec = self.adapter, self.spec
        file_size = os.path.getsize(spec.filename)
        size = max(self.options.get("volume-size") or 0, 1, math.ceil(file_size / GIB))
        ebs = adapter.client("ebs")
        started = adapter.call(f"{self.what}: start snapshot",
                               lambda: ebs.start_snapshot(VolumeSize=size,
                                                          Description=spec.image_name,
                                                          Tags=tag_list(self.tags)),
                               operation="start_snapshot")
        snapshot_id = started["SnapshotId"]
        self.created.append(("snapshot", snapshot_id))
        written = self.put_blocks(ebs, snapshot_id, file_size)
        adapter.call(f"{self.what}: complete snapshot {snapshot_id}",
                     lambda: ebs.complete_snapshot(SnapshotId=snapshot_id,
                                                   ChangedBlocksCount=written),
                     operation="complete_snapshot")
        self.wait(f"snapshot {snapshot_id}",
                  lambda: self._snapshot_state(snapshot_id) == "completed")
        self.tag([snapshot_id])
        return snapshot_id

    def put_blocks(self, ebs, snapshot_id, file_size):
        """Write every block of the file that is not all zeros; the number written."""
        provider = self.adapter.provider.name
        zero = bytes(EBS_BLOCK)

        def put(index):
            with open(self.spec.filename, "rb") as f:
                f.seek(index * EBS_BLOCK)
                data = f.read(EBS_BLOCK)
            if len(data) < EBS_BLOCK:
                data += bytes(EBS_BLOCK - len(data))
            if data == zero:
                return 0
            if time.monotonic() > self.deadline:
                raise TransientCloudError(f"{self.what}: snapshot {snapshot_id} not written "
                                          f"within image-import-timeout {self.timeout}s")
            checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
            for attempt in range(3):
                count_api_call(provider, "put_snapshot_block")
                try:
                    ebs.put_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index,
                                           BlockData=data, DataLength=EBS_BLOCK,
                                           Checksum=checksum, ChecksumAlgorithm="SHA256")
                    return 1
                except Exception as exc:
                    if attempt == 2:
                        raise translate_error(exc, f"{self.what}: snapshot {snapshot_id} "
                                                   f"block {index}") from exc
                    self.adapter.sleep(1.0 + attempt)
            return 0

        blocks = math.ceil(file_size / EBS_BLOCK)
        with concurrent.futures.ThreadPoolExecutor(EBS_THREADS) as pool:
            return sum(pool.map(put, range(blocks)))

    def register(self, snapshot_id):
        """Register an AMI whose root device is ``snapshot_id``; tag it."""
        opts = self.options
        ebs = {"SnapshotId": snapshot_id, "DeleteOnTermination": True,
               "VolumeType": opts.get("volume-type") or "gp3"}
        for key, arg in (("volume-size", "VolumeSize"), ("iops", "Iops"),
                         ("throughput", "Throughput")):
            if opts.get(key):
                ebs[arg] = opts[key]
        kwargs = dict(Name=self.spec.image_name, Architecture=opts.get("architecture", "x86_64"),
                      RootDeviceName=ROOT_DEVICE, VirtualizationType="hvm",
                      EnaSupport=bool(opts.get("ena-support", True)),
                      BlockDeviceMappings=[{"DeviceName": ROOT_DEVICE, "Ebs": ebs}])
        if opts.get("imds-support"):
            kwargs["ImdsSupport"] = opts["imds-support"]
        image_id = self.adapter.ec2(f"{self.what}: register image", "register_image",
                                    **kwargs)["ImageId"]
        self.created.append(("image", image_id))
        self.tag([image_id])
        return image_id

    # -- helpers -----------------------------------------------------------------------------------

    def tag(self, resource_ids):
        self.adapter.ec2(f"{self.what}: tag {', '.join(resource_ids)}", "create_tags",
                         Resources=list(resource_ids), Tags=tag_list(self.tags))

    def zone(self):
        for pool in self.adapter.provider.pools.values():
            if pool.options.get("availability-zone"):
                return pool.options["availability-zone"]
        zones = [z for z in self.adapter.availability_zones() if z]
        if not zones:
            zones = [z["ZoneName"] for z in self.adapter.ec2(
                f"{self.what}: availability zones",
                "describe_availability_zones").get("AvailabilityZones") or []]
        if not zones:
            raise PermanentCloudError(f"{self.what}: the region has no availability zone")
        return zones[0]

    def _volume_state(self, volume_id):
        vols = self.adapter.ec2(f"{self.what}: volume {volume_id}", "describe_volumes",
                                VolumeIds=[volume_id]).get("Volumes") or []
        state = vols[0].get("State") if vols else None
        if state == "error":
            raise TransientCloudError(f"{self.what}: volume {volume_id} failed")
        return state

    def _snapshot_state(self, snapshot_id):
        snaps = self.adapter.ec2(f"{self.what}: snapshot {snapshot_id}", "describe_snapshots",
                                 SnapshotIds=[snapshot_id]).get("Snapshots") or []
        state = snaps[0].get("State") if snaps else None
        if state == "error":
            raise TransientCloudError(f"{self.what}: snapshot {snapshot_id} failed")
        return state

    def wait(self, what, check):
        """Poll ``check`` until it returns a true value or the import timeout passes."""
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > self.deadline:
                raise TransientCloudError(f"{self.what}: {what} not done within "
                                          f"image-import-timeout {self.timeout}s")
            self.adapter.sleep(self.adapter.upload_poll)

    def remove_created(self):
        """Best-effort removal of what a failed upload left (newest first)."""
        adapter = self.adapter
        for kind, ident in reversed(self.created):
            try:
                if kind == "image":
                    adapter.ec2(f"{self.what}: deregister {ident}", "deregister_image", True,
                                ImageId=ident)
                elif kind == "snapshot":
                    adapter.ec2(f"{self.what}: delete snapshot {ident}", "delete_snapshot",
                                True, SnapshotId=ident)
                elif kind == "volume":
                    adapter.ec2(f"{self.what}: delete volume {ident}", "delete_volume", True,
                                VolumeId=ident)
                elif kind == "import-task":
                    adapter.ec2(f"{self.what}: cancel {ident}", "cancel_import_task", True,
                                ImportTaskId=ident)
                elif kind == "object":
                    s3 = adapter.client("s3")
                    adapter.call(f"{self.what}: delete object {ident}",
                                 lambda k=ident: s3.delete_object(Bucket=adapter.bucket, Key=k),
                                 missing_ok=True, operation="delete_object")
            except CloudError as exc:
                adapter.log.warning("%s: cannot remove %s %s after a failed upload: %s",
                                    self.what, kind, ident, exc)
        self.created = []
