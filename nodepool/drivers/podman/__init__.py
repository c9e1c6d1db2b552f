"""The ``podman`` driver: real nodes on this machine, one Linux container each, running sshd.

A node is a container started with ``podman run`` from an image the builder uploaded (a ``tar``
root filesystem imported with ``podman import``) or from an existing runtime image named by a
``cloud-images`` entry.  Its SSH port is published on a loopback port of its own, which becomes
the node's ``interface_ip``/``connection_port``.  Containers and images carry the same metadata
(as podman labels) as the cloud drivers' servers and images, so leak cleanup and image retention
work as for a cloud.  ``runtime.py`` is the podman CLI, ``adapter.py`` the launches, deletes,
listings and image uploads, ``probe.py`` the "can containers run here" check.  See
``docs/podman.md``.
"""
import os

import voluptuous as v

from ..base import Driver

DEFAULT_RUNTIME = "runc"
IMAGE_FORMAT = "tar"
# What a node runs when its image entry names no ``command``: host keys of its own (the image
# has none; ed25519 and ECDSA only, as an RSA key takes a second or more to make), then sshd in
# the foreground, logging to the container's output.
DEFAULT_COMMAND = ["/bin/sh", "-c",
                   "mkdir -p /run/sshd && for t in ed25519 ecdsa; do "
                   "f=/etc/ssh/ssh_host_${t}_key; [ -e $f ] || ssh-keygen -q -t $t -N '' -f $f; "
                   "done && exec /usr/sbin/sshd -D -e"]


def _command(value):
    """A command as a list of strings; a string is run by ``/bin/sh -c``."""
    if isinstance(value, str):
        if not value.strip():
            raise v.Invalid("must not be empty")
        return ["/bin/sh", "-c", value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(x, str) and x for x in value)):
        raise v.Invalid("expected a string or a non-empty list of strings")
    return list(value)


def _ulimit(value):
    """``SOFT:HARD`` or one number for both; returned as ``"SOFT:HARD"``."""
    if isinstance(value, bool):
        raise v.Invalid("expected a number or SOFT:HARD")
    if isinstance(value, int):
        value = f"{value}:{value}"
    if not isinstance(value, str):
        raise v.Invalid("expected a number or SOFT:HARD")
    parts = value.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise v.Invalid(f"expected a number or SOFT:HARD, got {value!r}")
    soft, hard = (parts * 2)[:2]
    if int(soft) > int(hard):
        raise v.Invalid(f"soft limit {soft} is above hard limit {hard}")
    return f"{int(soft)}:{int(hard)}"


def host_cores():
    return os.cpu_count() or 1


def host_ram_mib():
    """Total memory of this machine in MiB (``/proc/meminfo``), or None where unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PodmanDriver(Driver):
    name = "podman"
    # availability zones mean nothing on one machine
    unused_common_keys = {"pool": {"availability-zones"}}
    provider_defaults = {"rate": 0, "boot-timeout": 60, "launch-timeout": 300,
                         "launch-retries": 3}

    def provider_schema(self):
        return {
            # the podman executable, and the OCI runtime it uses ("default": podman's choice)
            v.Optional("podman", default="podman"): str,
            v.Optional("runtime", default=DEFAULT_RUNTIME): str,
            # container limits (podman --ulimit); default: nofile 65536, nproc 16384, each
            # lowered to the launcher's own hard limit (more cannot be set)
            v.Optional("ulimits"): {str: _ulimit},
            # where published SSH ports listen; the node's interface_ip
            v.Optional("publish-address", default="127.0.0.1"): str,
            # podman network for the containers (default: podman's default bridge)
            v.Optional("network"): str,
            # the host's capacity shared by the nodes (default: this machine's cores and RAM)
            v.Optional("max-cores"): v.All(int, v.Range(min=1)),
            v.Optional("max-ram"): v.All(int, v.Range(min=64)),
            # seconds a podman command may take before it is killed and counted as failed
            v.Optional("command-timeout", default=120): v.All(v.Coerce(float), v.Range(min=1)),
        }

    def label_schema(self):
        return {
            v.Optional("cores", default=1): v.All(int, v.Range(min=1)),    # --cpus
            v.Optional("ram", default=1024): v.All(int, v.Range(min=6)),   # MiB, --memory
            # log the container's output (podman logs) when its launch fails
            v.Optional("console-log", default=False): bool,
        }

    def diskimage_schema(self):
        return {v.Optional("command"): _command}

    def cloud_image_schema(self):
        return {
            # the runtime image to boot (default: the entry's name)
            v.Optional("image"): str,
            v.Optional("command"): _command,
        }

    def finalize(self, provider, config):
        """The builder makes ``tar`` root filesystems for this provider's diskimages."""
        provider.options["image-format"] = IMAGE_FORMAT

    def check_cloud(self, provider):
        from .runtime import Podman
        return Podman(provider.options.get("podman") or "podman",
                      runtime_option(provider)).available()

    def adapter(self, provider, rate_limiter=None):
        from .adapter import PodmanAdapter
        return PodmanAdapter(provider, rate_limiter)


def runtime_option(provider):
    runtime = provider.options.get("runtime") or DEFAULT_RUNTIME
    return None if runtime == "default" else runtime


DRIVER = PodmanDriver()
