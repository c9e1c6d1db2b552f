"""Uploading a diskimage build to AWS as an AMI.

The file is staged in the provider's S3 bucket, turned into an EBS snapshot and registered as
an AMI.  ``import-method`` says how the snapshot is made:

* ``snapshot`` (default): EC2 VM Import ``import_snapshot`` from the S3 object, then
  ``register_image`` with the snapshot as root device;
* ``image``: VM Import ``import_image`` does both steps;
* ``create-volume`` (ours, for clouds without VM Import such as test endpoints): an empty EBS
  volume of the image's size → ``create_snapshot`` → ``register_image``.  The image's bytes are
  only in S3 then; the AMI boots whatever the volume holds.  Use it for tests, not for AWS.

The AMI, its snapshot and the S3 object carry the upload's metadata (``nodepool_build_id``,
``nodepool_upload_id``, ``nodepool_provider_name``), so ``list_resources`` can find leftovers.
A failed upload removes what it created.  Blocking: runs in a builder upload thread.
"""
import math
import os
import time

from ...errors import CloudError, PermanentCloudError, TransientCloudError
from .tags import clean, s3_tagging, tag_list, tag_specifications

GIB = 1024 ** 3
ROOT_DEVICE = "/dev/sda1"


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
        if not adapter.bucket:
            raise PermanentCloudError(f"{self.what}: object-storage.bucket-name is not set")
        method = self.options.get("import-method", "snapshot")
        key = adapter.object_key(spec.image_name, spec.image_format, spec.metadata)
        self.deadline = time.monotonic() + (self.timeout or math.inf)
        try:
            self.put_object(key)
            if method == "image":
                image_id = self.import_image(key)
            else:
                if method == "create-volume":
                    snapshot_id = self.snapshot_via_volume()
                else:
                    snapshot_id = self.import_snapshot(key)
                image_id = self.register(snapshot_id)
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

    def snapshot_via_volume(self):
        """create_volume → create_snapshot → delete the volume (see the module docstring)."""
        adapter = self.adapter
        size = self.options.get("volume-size") or max(
            1, math.ceil(os.path.getsize(self.spec.filename) / GIB))
        zone = self.zone()
        volume = adapter.ec2(f"{self.what}: create volume", "create_volume",
                             AvailabilityZone=zone, Size=size,
                             VolumeType=self.options.get("volume-type") or "gp3",
                             TagSpecifications=tag_specifications(self.tags, "volume"))
        volume_id = volume["VolumeId"]
        self.created.append(("volume", volume_id))
        self.wait(f"volume {volume_id}", lambda: self._volume_state(volume_id) == "available")
        snapshot = adapter.ec2(f"{self.what}: snapshot volume {volume_id}", "create_snapshot",
                               VolumeId=volume_id, Description=self.spec.image_name,
                               TagSpecifications=tag_specifications(self.tags, "snapshot"))
        snapshot_id = snapshot["SnapshotId"]
        self.created.append(("snapshot", snapshot_id))
        self.wait(f"snapshot {snapshot_id}",
                  lambda: self._snapshot_state(snapshot_id) == "completed")
        adapter.ec2(f"{self.what}: delete volume {volume_id}", "delete_volume",
                    VolumeId=volume_id)
        self.created.remove(("volume", volume_id))
        return snapshot_id

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
