"""The ``static`` driver: hosts that already exist, handed out over SSH (or WinRM...).

A static pool lists its hosts under ``nodes``; each host gives ``max-parallel-jobs`` node slots.
Nothing is ever launched: the provider worker registers one ready node per answering slot, returns
used nodes to ready, takes hosts that stop answering out of service and puts them back when they
answer (see ``adapter.StaticAdapter`` and ``ProviderWorker._reconcile_registered``).

Pool labels are plain names: the pool's own ``labels`` list if the loader built one, otherwise the
union of its hosts' labels (``finalize``).  Every label must be a top-level label.
"""
import voluptuous as v

from ...config.model import PoolLabel
from ..base import Driver

DEFAULT_PORTS = {"ssh": 22, "network_cli": 22, "winrm": 5986}


def _names(value):
    """``labels``/``host-key`` accept a string or a list; always a list afterwards."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def node_schema():
    """One ``nodes[]`` entry of a static pool."""
    return {
        v.Required("name"): v.All(str, v.Length(min=1)),
        v.Required("labels"): v.All(v.Any(str, [str]), _names, v.Length(min=1)),
        v.Optional("username", default="zuul"): str,
        v.Optional("timeout", default=5): v.All(v.Coerce(float), v.Range(min=0.1)),
        v.Optional("host-key-checking", default=True): bool,
        v.Optional("host-key"): v.All(v.Any(str, [str]), _names),
        v.Optional("connection-type", default="ssh"): v.Any("ssh", "network_cli", "winrm"),
        v.Optional("connection-port"): v.All(int, v.Range(min=1, max=65535)),
        v.Optional("shell-type"): str,
        v.Optional("python-path", default="auto"): str,
        v.Optional("max-parallel-jobs", default=1): v.All(int, v.Range(min=1)),
    }


def node_port(node):
    """A host's connection port: ``connection-port``, else the connection type's default."""
    port = node.get("connection-port")
    if port:
        return int(port)
    return DEFAULT_PORTS.get(node.get("connection-type") or "ssh", 22)


def pool_label_names(pool):
    """Label names a static pool serves: its hosts' labels, in first-seen order."""
    seen = []
    for node in pool.options.get("nodes") or []:
        for name in _names(node.get("labels")):
            if name not in seen:
                seen.append(name)
    return seen


# common keys Nodepool's static driver refuses: its hosts are never launched, have no images
# and no cloud quota
UNUSED_COMMON_KEYS = {
    "provider": {"rate", "boot-timeout", "launch-timeout", "launch-retries",
                 "image-name-format", "image-upload-timeout", "post-upload-hook", "diskimages",
                 "cloud-images"},
    "pool": {"max-cores", "max-ram", "availability-zones", "ignore-provider-quota"},
}


def registration_key(node):
    """What tells two ``nodes`` entries apart: the same host may be registered twice (on one
    port) under different usernames, as Nodepool allows."""
    return (node["name"], node_port(node), node.get("username") or "zuul")


class StaticDriver(Driver):
    name = "static"
    labels_need_image = False       # pool labels, when listed at all, are just names
    unused_common_keys = UNUSED_COMMON_KEYS
    # static hosts make no API calls and never launch: rate and retries do not apply
    provider_defaults = {"rate": 0, "boot-timeout": 60, "launch-timeout": 3600,
                         "launch-retries": 1}

    def pool_schema(self):
        return {v.Required("nodes"): [node_schema()]}

    def check_provider(self, provider, config):
        problems = []
        seen = {}
        for pool_index, pool in enumerate(provider.pools.values()):
            for i, node in enumerate(pool.options.get("nodes") or []):
                where = f"pools[{pool_index}].nodes[{i}]"    # the loader adds providers[n]
                key = registration_key(node)
                if key in seen:
                    problems.append((where, f"host {node['name']} port {key[1]} with username "
                                            f"{key[2]} is already listed at {seen[key]}"))
                else:
                    seen[key] = where
                for label in _names(node.get("labels")):
                    if label not in config.labels:
                        problems.append((f"{where}.labels",
                                         f"label {label} is not a top-level label"))
        return problems

    def finalize(self, provider, config):
        """Give every pool a PoolLabel per host label the loader did not already create."""
        for pool in provider.pools.values():
            for name in pool_label_names(pool):
                if name not in pool.labels:
                    pool.labels[name] = PoolLabel(name=name, pool=pool.name,
                                                  provider=provider.name)

    def adapter(self, provider, rate_limiter=None):
        from .adapter import StaticAdapter
        return StaticAdapter(provider, rate_limiter)


DRIVER = StaticDriver()
