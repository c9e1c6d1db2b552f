"""The ``openstack`` driver: Nova servers, Neutron floating IPs and Glance images via openstacksdk.

Keys follow Nodepool 11's OpenStack driver.  The provider names a clouds.yaml entry (``cloud``);
credentials never appear in nodepool.yaml.  openstacksdk is imported only in this package, and
only when a provider uses it, so a machine without the SDK can still run other drivers.
"""
import voluptuous as v

from ...errors import NodepoolError
from ...extras import requires
from ..base import Driver

DEFAULT_IMAGE_FORMAT = "qcow2"


def _str_list(value):
    """A YAML string or list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    return v.Schema([str])(value)


class OpenStackDriver(Driver):
    name = "openstack"
    # Nodepool's own example has a pool label whose diskimage this provider does not list
    label_image_may_be_missing = True
    provider_defaults = {"rate": 1.0, "boot-timeout": 60, "launch-timeout": 3600,
                         "launch-retries": 3}

    def provider_schema(self):
        return {
            v.Required("cloud"): str,
            v.Optional("region-name"): str,
            v.Optional("clean-floating-ips", default=False): bool,
            v.Optional("port-cleanup-interval", default=600): v.All(int, v.Range(min=0)),
            v.Optional("nodepool-id"): str,        # accepted and ignored, as in Nodepool
        }

    def pool_schema(self):
        return {
            v.Optional("networks", default=[]): _str_list,
            v.Optional("security-groups", default=[]): _str_list,
            v.Optional("auto-floating-ip", default=True): bool,
            v.Optional("max-volumes"): v.All(int, v.Range(min=0)),
            v.Optional("max-volume-gb"): v.All(int, v.Range(min=0)),
        }

    def label_schema(self):
        return {
            v.Optional("min-ram"): v.All(int, v.Range(min=0)),
            v.Optional("flavor-name"): str,
            v.Optional("key-name"): str,
            v.Optional("console-log", default=False): bool,
            v.Optional("boot-from-volume", default=False): bool,
            v.Optional("volume-size", default=50): v.All(int, v.Range(min=1)),
            v.Optional("instance-properties", default={}): {str: v.Coerce(str)},
            v.Optional("dynamic-instance-properties", default={}): {str: str},
            v.Optional("userdata"): str,
            v.Optional("networks"): _str_list,
            v.Optional("host-key-checking"): bool,
        }

    def diskimage_schema(self):
        return {
            v.Optional("config-drive"): bool,
            v.Optional("meta", default={}): {str: v.Coerce(str)},
        }

    def cloud_image_schema(self):
        return {
            v.Optional("image-id"): str,
            v.Optional("image-name"): str,
            v.Optional("config-drive"): bool,
        }

    def check_provider(self, provider, config):
        """Label image/flavor rules and the cloud-image id/name rule (the clouds.yaml entry
        is ``check_cloud``'s: a host without it must still read the config)."""
        index = list(config.providers).index(provider.name) if provider.name in \
            config.providers else 0
        where = f"providers[{index}]"
        problems = []
        for pool_index, pool in enumerate(provider.pools.values()):
            for label_index, label in enumerate(pool.labels.values()):
                key = f"{where}.pools[{pool_index}].labels[{label_index}]"
                if bool(label.diskimage) == bool(label.cloud_image):
                    problems.append((key, f"label {label.name}: exactly one of diskimage and "
                                          f"cloud-image is required"))
                if label.options.get("min-ram") is None and not label.options.get("flavor-name"):
                    problems.append((key, f"label {label.name}: at least one of min-ram and "
                                          f"flavor-name is required"))
        for image_index, image in enumerate(provider.cloud_images.values()):
            if image.options.get("image-id") and image.options.get("image-name"):
                problems.append((f"{where}.cloud-images[{image_index}]",
                                 f"cloud image {image.name}: image-id and image-name are "
                                 f"mutually exclusive"))
        return problems

    def check_cloud(self, provider):
        return cloud_config_problem(provider.options.get("cloud"),
                                    provider.options.get("region-name"))

    def finalize(self, provider, config):
        """Record the cloud's image format (clouds.yaml ``image_format``) for the builder."""
        provider.options.setdefault("image-format", cloud_image_format(
            provider.options.get("cloud"), provider.options.get("region-name")))

    def adapter(self, provider, rate_limiter=None):
        with requires("openstack", f"provider {provider.name} (driver openstack)"):
            from .adapter import OpenStackAdapter
        return OpenStackAdapter(provider, rate_limiter)


def _cloud_region(cloud, region):
    """openstacksdk's config for ``cloud``; raises whatever the SDK raises (and
    MissingDependencyError without the SDK)."""
    with requires("openstack", f"cloud {cloud!r}"):
        from openstack import config as os_config
    return os_config.OpenStackConfig().get_one(cloud=cloud, region_name=region)


def cloud_config_problem(cloud, region=None):
    """None when clouds.yaml (as openstacksdk finds it) has ``cloud``, else one line saying why."""
    try:
        _cloud_region(cloud, region)
    except NodepoolError as exc:
        return str(exc)
    except Exception as exc:
        return f"cloud {cloud!r} cannot be loaded from clouds.yaml: {exc}"
    return None


def cloud_image_format(cloud, region=None):
    """The cloud's ``image_format`` from clouds.yaml (qcow2 when unset or unreadable)."""
    if not cloud:
        return DEFAULT_IMAGE_FORMAT
    try:
        return _cloud_region(cloud, region).config.get("image_format") or DEFAULT_IMAGE_FORMAT
    except Exception:
        return DEFAULT_IMAGE_FORMAT


DRIVER = OpenStackDriver()
