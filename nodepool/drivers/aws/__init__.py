"""The ``aws`` driver: EC2 instances, EBS volumes and snapshots, AMIs and S3 objects via boto3.

Keys follow Nodepool 11's AWS driver (see ``docs/aws.md``).  boto3 is imported only in this
package's ``adapter`` module, and only when a provider uses the driver, so a machine without
boto3 can still run other drivers.  Credentials come from boto3's usual sources (environment,
``~/.aws``, ``profile-name``, instance role); they never appear in nodepool.yaml.
"""
import voluptuous as v

from ...extras import requires
from ..base import Driver

IMAGE_FORMATS = ("raw", "ova", "vhd", "vhdx", "vmdk")
# ``create-volume`` is ours: for clouds without VM Import (see docs/aws.md)
IMPORT_METHODS = ("snapshot", "image", "create-volume")
DEFAULT_IMAGE_FORMAT = "raw"


def _count(minimum=0):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise v.Invalid("expected int")
        if value < minimum:
            raise v.Invalid(f"must be >= {minimum}, got {value}")
        return value
    return check


def _tags(value):
    """A mapping of tag keys to values; values are turned into strings (AWS tags are strings)."""
    if not isinstance(value, dict):
        raise v.Invalid("expected a mapping of tag names to values")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key:
            raise v.Invalid(f"tag name {key!r} must be a non-empty string")
        out[key] = "" if val is None else str(val)
    return out


IMAGE_FILTER = {v.Required("name"): str, v.Required("values"): [v.Coerce(str)]}


class AwsDriver(Driver):
    name = "aws"
    # rate: API operations per second (not seconds between calls as for OpenStack)
    provider_defaults = {"rate": 2.0, "boot-timeout": 180, "launch-timeout": 3600,
                         "launch-retries": 3}

    def provider_schema(self):
        return {
            v.Required("region-name"): str,
            v.Optional("profile-name"): str,
            # ours: talk to this endpoint instead of AWS (also AWS_ENDPOINT_URL via boto3)
            v.Optional("endpoint-url"): str,
            v.Optional("object-storage"): {v.Required("bucket-name"): str},
            v.Optional("image-format", default=DEFAULT_IMAGE_FORMAT): v.In(IMAGE_FORMATS),
            v.Optional("image-import-timeout"): v.All(v.Coerce(float), v.Range(min=0)),
            v.Optional("max-servers"): _count(),
            v.Optional("max-cores"): _count(),
            v.Optional("max-ram"): _count(),
            v.Optional("max-resources", default={}): {str: _count()},
        }

    def pool_schema(self):
        return {
            v.Optional("subnet-id"): str,
            v.Optional("security-group-id"): str,
            v.Optional("public-ipv4", default=True): bool,
            v.Optional("public-ipv6", default=False): bool,
            v.Optional("use-internal-ip", default=False): bool,
            v.Optional("availability-zone"): str,
        }

    def label_schema(self):
        return {
            v.Optional("instance-type"): str,
            v.Optional("key-name"): str,
            v.Optional("ebs-optimized", default=False): bool,
            v.Optional("volume-type"): str,
            v.Optional("volume-size"): _count(1),
            v.Optional("iops"): _count(1),
            v.Optional("throughput"): _count(1),
            v.Optional("userdata"): str,
            v.Optional("iam-instance-profile"): v.All(
                {v.Exclusive("name", "profile"): str, v.Exclusive("arn", "profile"): str},
                v.Length(min=1, msg="give name or arn")),
            v.Optional("tags", default={}): _tags,
            v.Optional("dynamic-tags", default={}): {str: str},
            v.Optional("use-spot", default=False): bool,
            v.Optional("imdsv2"): v.In(["required", "optional"]),
        }

    def diskimage_schema(self):
        return {
            v.Optional("architecture", default="x86_64"): v.In(["x86_64", "arm64", "i386"]),
            v.Optional("ena-support", default=True): bool,
            v.Optional("volume-size"): _count(1),
            v.Optional("volume-type", default="gp3"): str,
            v.Optional("import-method", default="snapshot"): v.In(IMPORT_METHODS),
            v.Optional("imds-support"): v.In(["v2.0"]),
            v.Optional("iops"): _count(1),
            v.Optional("throughput"): _count(1),
            v.Optional("tags", default={}): _tags,
        }

    def cloud_image_schema(self):
        return {
            v.Optional("image-id"): str,
            v.Optional("image-filters"): [IMAGE_FILTER],
        }

    def check_provider(self, provider, config):
        """Labels need an instance type; cloud images need image-id xor image-filters;
        diskimages need an S3 bucket to stage uploads in."""
        names = list(config.providers)
        where = f"providers[{names.index(provider.name) if provider.name in names else 0}]"
        problems = []
        for pool_index, pool in enumerate(provider.pools.values()):
            for label_index, label in enumerate(pool.labels.values()):
                if not label.options.get("instance-type"):
                    problems.append((f"{where}.pools[{pool_index}].labels[{label_index}]",
                                     f"label {label.name}: instance-type is required"))
        for index, image in enumerate(provider.cloud_images.values()):
            has_id = bool(image.options.get("image-id"))
            has_filters = bool(image.options.get("image-filters"))
            if has_id == has_filters:
                problems.append((f"{where}.cloud-images[{index}]",
                                 f"cloud image {image.name}: exactly one of image-id and "
                                 f"image-filters is required"))
        if provider.diskimages and not (provider.options.get("object-storage") or {}).get(
                "bucket-name"):
            problems.append((f"{where}.object-storage",
                             "object-storage.bucket-name is required to upload diskimages"))
        return problems

    def check_cloud(self, provider):
        """Profile, region and credentials, as the adapter's ``start()`` loads them."""
        from ...errors import NodepoolError
        try:
            adapter = self.adapter(provider)
        except NodepoolError as exc:
            return str(exc)
        try:
            adapter.start()
        except NodepoolError as exc:
            return str(exc)
        finally:
            adapter.stop()
        return None

    def adapter(self, provider, rate_limiter=None):
        with requires("aws", f"provider {provider.name} (driver aws)"):
            from .adapter import AwsAdapter
        return AwsAdapter(provider, rate_limiter)


DRIVER = AwsDriver()
