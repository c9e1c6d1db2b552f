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
IMPORT_METHODS = ("snapshot", "image", "ebs-direct")
# methods that stage the file in S3 (``ebs-direct`` writes the snapshot's blocks itself)
S3_IMPORT_METHODS = ("snapshot", "image")
DEFAULT_IMAGE_FORMAT = "raw"
FLEET_STRATEGIES = ("prioritized", "price-capacity-optimized", "capacity-optimized",
                    "diversified", "lowest-price")
SPOT_STRATEGIES = ("price-capacity-optimized", "capacity-optimized", "diversified",
                   "lowest-price")
ON_DEMAND_STRATEGIES = ("prioritized", "lowest-price")


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


def image_filter(value):
    """One ``image-filters`` entry, ``{name, values}``; boto3's spelling ``{Name, Values}``
    is accepted too (Nodepool passes the entry through) and comes out lower-case."""
    if not isinstance(value, dict):
        raise v.Invalid("expected a mapping with name and values")
    errors, out = [], {}
    for key, spellings in (("name", ("name", "Name")), ("values", ("values", "Values"))):
        given = [k for k in spellings if k in value]
        if len(given) > 1:
            errors.append(v.Invalid(f"give {key} once (as {given[0]} or {given[1]})",
                                    path=[given[1]]))
        elif not given:
            errors.append(v.Invalid("required key is missing", path=[key]))
        else:
            out[key] = value[given[0]]
    for key in value:
        if key not in ("name", "Name", "values", "Values"):
            errors.append(v.Invalid("unknown key (expected name and values)", path=[key]))
    if "name" in out and not isinstance(out["name"], str):
        errors.append(v.Invalid("expected str", path=["name"]))
    if "values" in out:
        vals = out["values"]
        if not isinstance(vals, list) or any(isinstance(x, (dict, list)) or x is None
                                             for x in vals):
            errors.append(v.Invalid("expected a list of strings", path=["values"]))
        else:
            out["values"] = [str(x) for x in vals]
    if errors:
        raise v.MultipleInvalid(errors)
    return out


FLEET = {
    v.Required("instance-types"): v.All([str], v.Length(min=1, msg="list at least one "
                                                                    "instance type")),
    v.Required("allocation-strategy"): v.In(FLEET_STRATEGIES),
}


class AwsDriver(Driver):
    name = "aws"
    # Nodepool's AWS pools name one ``availability-zone``
    unused_common_keys = {"pool": {"availability-zones"}}
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
            v.Optional("public-ipv4"): bool,           # default true (see finalize)
            v.Optional("public-ip-address"): bool,     # deprecated spelling of public-ipv4
            v.Optional("public-ipv6", default=False): bool,
            v.Optional("use-internal-ip", default=False): bool,
            v.Optional("availability-zone"): str,
        }

    def label_schema(self):
        return {
            v.Optional("instance-type"): str,
            v.Optional("fleet"): FLEET,
            v.Optional("dedicated-host", default=False): bool,
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
            v.Optional("import-method", default="snapshot"): v.In(
                IMPORT_METHODS, msg=f"expected one of {', '.join(IMPORT_METHODS)}"),
            v.Optional("imds-support"): v.In(["v2.0"]),
            v.Optional("iops"): _count(1),
            v.Optional("throughput"): _count(1),
            v.Optional("tags", default={}): _tags,
            # the login of nodes booted from this image here (else the diskimage's)
            v.Optional("username"): str,
            v.Optional("python-path"): str,
            v.Optional("shell-type"): str,
        }

    def cloud_image_schema(self):
        return {
            v.Optional("image-id"): str,
            v.Optional("image-filters"): [image_filter],
        }

    def check_provider(self, provider, config):
        """Labels need an instance type; cloud images need image-id xor image-filters;
        diskimages need an S3 bucket to stage uploads in."""
        names = list(config.providers)
        where = f"providers[{names.index(provider.name) if provider.name in names else 0}]"
        problems = []
        for pool_index, pool in enumerate(provider.pools.values()):
            for label_index, label in enumerate(pool.labels.values()):
                key = f"{where}.pools[{pool_index}].labels[{label_index}]"
                problems += [(key, f"label {label.name}: {text}")
                             for text in label_problems(label, pool)]
        for index, image in enumerate(provider.cloud_images.values()):
            has_id = bool(image.options.get("image-id"))
            has_filters = bool(image.options.get("image-filters"))
            if has_id == has_filters:
                problems.append((f"{where}.cloud-images[{index}]",
                                 f"cloud image {image.name}: exactly one of image-id and "
                                 f"image-filters is required"))
        staged = [d.name for d in provider.diskimages.values()
                  if d.options.get("import-method", "snapshot") in S3_IMPORT_METHODS]
        if staged and not (provider.options.get("object-storage") or {}).get("bucket-name"):
            problems.append((f"{where}.object-storage",
                             "object-storage.bucket-name is required to upload diskimages "
                             "(import-method snapshot or image)"))
        return problems

    def finalize(self, provider, config):
        """``public-ipv4`` wins over its deprecated spelling ``public-ip-address``."""
        for pool in provider.pools.values():
            old = pool.options.pop("public-ip-address", None)
            if pool.options.get("public-ipv4") is None:
                pool.options["public-ipv4"] = True if old is None else old

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


def label_problems(label, pool):
    """The rules of one pool label Nodepool's AWS driver enforces on load."""
    opts = label.options
    out = []
    if bool(opts.get("instance-type")) == bool(opts.get("fleet")):
        out.append("exactly one of instance-type and fleet is required")
    fleet = opts.get("fleet")
    if fleet:
        allowed = SPOT_STRATEGIES if opts.get("use-spot") else ON_DEMAND_STRATEGIES
        if fleet["allocation-strategy"] not in allowed:
            market = "spot" if opts.get("use-spot") else "on-demand"
            out.append(f"fleet allocation-strategy {fleet['allocation-strategy']} is not one "
                       f"for {market} instances ({', '.join(allowed)})")
    if opts.get("dedicated-host"):
        if opts.get("use-spot"):
            out.append("dedicated-host cannot be used with use-spot")
        if fleet:
            out.append("dedicated-host needs instance-type, not fleet")
        if not pool.options.get("availability-zone"):
            out.append("dedicated-host needs the pool's availability-zone")
    return out


DRIVER = AwsDriver()
