"""The podman driver's adapter: containers as nodes, imported root filesystems as images.

Launch: one ``podman run -d`` child process (polled, never waited on), then one ``podman
inspect`` for the published port; the framework then scans the host keys on that port as for
any node.  The container is named before it exists (``np<node id>-<random>``), so the external
id is known from the first step and a launcher killed at any later point leaves a container the
leak scan can match to its (missing) node record by its labels.  Delete: one ``podman rm -f``.
Listings (``podman ps``/``podman images`` with JSON output) are single blocking calls, as the
adapter contract allows.
"""
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import time

from ...errors import InstanceNotFound, PermanentCloudError, TransientCloudError
from ...model.quota import Limits, Resources
from ..base import (META_BUILD_ID, META_PROVIDER, Adapter, CloudResource, Instance,
                    StateMachine)
from . import DEFAULT_COMMAND, host_cores, host_ram_mib, runtime_option
from .probe import runtime_problem
from .runtime import Podman, PodmanError, host_ulimits, is_missing, last_line

log = logging.getLogger("nodepool.drivers.podman")

CLOUD_NAME = "podman"
# container labels recording what a node costs, so the host's capacity can be shared with
# the nodes of other providers on the same machine (unmanaged usage)
LABEL_CORES = "nodepool_cores"
LABEL_RAM = "nodepool_ram"
_NAME_RE = re.compile(r"[^a-z0-9._-]+")


def image_reference(name):
    """A valid local image reference for an uploaded image named ``name``."""
    repo = _NAME_RE.sub("-", name.lower()).strip("-._") or "image"
    return f"localhost/{repo}:latest"


def published_port(ports, container_port):
    """``(host_ip, host_port)`` publishing ``container_port``/tcp (None: the first TCP port
    published), from ``podman ps`` JSON (a list of ``{host_ip, container_port, host_port}``) or
    ``podman inspect`` JSON (a mapping ``"22/tcp" -> [{HostIp, HostPort}]``); ``(None, None)``
    when it is not published."""
    if isinstance(ports, dict):
        for binding in ports.get(f"{container_port}/tcp") or []:
            if binding.get("HostPort"):
                return binding.get("HostIp") or None, int(binding["HostPort"])
        return None, None
    for entry in ports or []:
        if ((container_port is None or int(entry.get("container_port") or 0) == container_port)
                and (entry.get("protocol") or "tcp") == "tcp" and entry.get("host_port")):
            return entry.get("host_ip") or None, int(entry["host_port"])
    return None, None


class PodmanCreate(StateMachine):
    """``podman run -d`` (polled), then ``podman inspect`` (polled) for the SSH port."""

    RUNNING = "running"
    INSPECTING = "inspecting"
    DONE = "done"

    def __init__(self, adapter, spec):
        super().__init__()
        self.adapter = adapter
        self.spec = spec
        self.call = None
        self.result = None
        self.settings = adapter.launch_settings(spec)

    def _where(self):
        return f"node {self.spec.node_id} on {self.adapter.provider.name}"

    def advance(self):
        if self.state == self.START:
            self.external_id = self.settings["name"]
            self.call = self.adapter.start_call("create", *self.adapter.run_args(self.settings),
                                                what=f"podman run {self.external_id}")
            self.state = self.RUNNING
            return None
        if self.state == self.RUNNING:
            if self._finished() is None:
                return None
            self.call = self.adapter.start_call("inspect", "inspect", "--type", "container",
                                                self.external_id,
                                                what=f"podman inspect {self.external_id}")
            self.state = self.INSPECTING
            return None
        if self.state == self.INSPECTING:
            out = self._finished()
            if out is None:
                return None
            return self._check(out)
        return self.result

    def _finished(self):
        try:
            return self.call.checked()
        except PodmanError as exc:
            raise exc.cloud_error(self._where()) from exc

    def _check(self, out):
        try:
            info = json.loads(out)[0]
        except (ValueError, IndexError, KeyError) as exc:
            raise TransientCloudError(f"{self._where()}: unreadable podman inspect output: "
                                      f"{exc}") from exc
        state = info.get("State") or {}
        if state.get("Status") != "running":
            tail = self.adapter.output_tail(self.external_id)
            raise PermanentCloudError(
                f"{self._where()}: container {self.external_id} is {state.get('Status')} "
                f"(exit code {state.get('ExitCode')})" + (f": {tail}" if tail else ""))
        network = info.get("NetworkSettings") or {}
        host_ip, port = published_port(network.get("Ports") or {},
                                       self.settings["container_port"])
        if port is None:
            raise PermanentCloudError(f"{self._where()}: container {self.external_id} has no "
                                      f"published port for {self.settings['container_port']}")
        inst = self.adapter.instance(
            self.external_id, (info.get("Config") or {}).get("Labels") or {}, running=True,
            port=port, host_ip=host_ip, private_ip=network.get("IPAddress") or None)
        inst.connection_type = self.settings["connection_type"]
        self.state = self.DONE
        self.complete = True
        self.result = inst
        return inst


class PodmanDelete(StateMachine):
    """``podman rm -f`` (polled); a missing container is already deleted."""

    DELETING = "deleting"

    def __init__(self, adapter, external_id):
        super().__init__()
        self.adapter = adapter
        self.external_id = external_id
        self.call = None

    def advance(self):
        if self.complete:
            return True
        if self.state == self.START:
            self.call = self.adapter.start_call(
                "delete", "rm", "--force", "--ignore", "--time", "2", self.external_id,
                what=f"podman rm {self.external_id}")
            self.state = self.DELETING
            return None
        try:
            if self.call.checked() is None:
                return None
        except PodmanError as exc:
            if not exc.missing:
                raise exc.cloud_error(f"provider {self.adapter.provider.name}") from exc
        self.complete = True
        return True


class PodmanAdapter(Adapter):
    """One provider of the podman driver (see the module docstring)."""

    def __init__(self, provider, rate_limiter=None):
        super().__init__(provider, rate_limiter)
        opts = provider.options
        self.podman = Podman(opts.get("podman") or "podman", runtime_option(provider),
                             timeout=float(opts.get("command-timeout", 120)))
        self.ulimits = dict(host_ulimits())
        self.ulimits.update(opts.get("ulimits") or {})
        self.publish_address = opts.get("publish-address") or "127.0.0.1"
        self.network = opts.get("network")
        self.host_id = socket.gethostname()

    # -- plumbing --------------------------------------------------------------------------------

    def _call(self, operation, *args, json_output=False, timeout=None):
        """One blocking podman command through the rate limiter; PodmanError on failure."""
        with self.rate_limiter.call(operation):
            if json_output:
                return self.podman.json(*args, timeout=timeout)
            return self.podman.call(*args, timeout=timeout)

    def start_call(self, operation, *args, what=None):
        """Start one podman command through the rate limiter, without waiting for it."""
        with self.rate_limiter.call(operation):
            return self.podman.start(*args, what=what)

    def _image_entry(self, label):
        if label.cloud_image:
            return self.provider.cloud_images.get(label.cloud_image)
        return self.provider.diskimages.get(label.diskimage)

    def launch_settings(self, spec):
        """What ``run_args`` needs for one launch (pure, from the spec and the config)."""
        label = spec.label
        entry = self._image_entry(label)
        if spec.image_external_id:
            image = spec.image_external_id
        elif label.cloud_image and entry is not None:
            image = entry.options.get("image") or entry.name
        else:
            raise PermanentCloudError(f"label {label.name} on provider {self.provider.name}: "
                                      f"no uploaded image of {label.diskimage!r} to boot")
        options = entry.options if entry is not None else {}
        cost = self.quota_for_label(label)
        metadata = dict(spec.metadata)
        metadata[LABEL_CORES] = str(cost["cores"])
        metadata[LABEL_RAM] = str(cost["ram"])
        return {
            "name": f"{spec.hostname}-{secrets.token_hex(3)}",
            "hostname": spec.hostname,
            "image": image,
            "command": list(options.get("command") or DEFAULT_COMMAND),
            "labels": metadata,
            "cores": cost["cores"],
            "ram": cost["ram"],
            "container_port": entry.connection_port if entry is not None else 22,
            "connection_type": entry.connection_type if entry is not None else "ssh",
        }

    def run_args(self, settings):
        """``podman run`` arguments for ``launch_settings``."""
        args = ["run", "--detach", "--name", settings["name"],
                "--hostname", settings["hostname"]]
        for key, value in sorted(settings["labels"].items()):
            args += ["--label", f"{key}={value}"]
        for name, value in sorted(self.ulimits.items()):
            args += ["--ulimit", f"{name}={value}"]
        args += ["--cpus", str(settings["cores"]), "--memory", f"{settings['ram']}m",
                 "--publish", f"{self.publish_address}::{settings['container_port']}"]
        if self.network:
            args += ["--network", self.network]
        return args + [settings["image"]] + settings["command"]

    def instance(self, name, labels, running, port=None, host_ip=None, private_ip=None,
                 exited=False):
        """An ``Instance`` for one container."""
        ours = labels.get(META_PROVIDER) is not None
        resources = Resources.of(instances=1)
        if ours:
            try:
                resources = Resources.of(instances=1, cores=int(labels.get(LABEL_CORES, 0)),
                                         ram=int(labels.get(LABEL_RAM, 0)))
            except ValueError:
                pass
        address = host_ip if host_ip and host_ip not in ("0.0.0.0", "::") \
            else self.publish_address
        reachable = address if port else None
        return Instance(external_id=name, metadata=dict(labels), ready=running,
                        failed=exited, interface_ip=reachable,
                        public_ipv4=reachable if reachable and ":" not in reachable else None,
                        private_ipv4=private_ip, cloud=CLOUD_NAME, host_id=self.host_id,
                        resources=resources, connection_port=port)

    def output_tail(self, name, lines=3):
        """The last lines a container wrote (why it stopped), or an empty string."""
        try:
            output = self._logs(name, lines)
        except (TransientCloudError, InstanceNotFound):
            return ""
        return " | ".join(line.strip() for line in output.splitlines() if line.strip())

    def _logs(self, name, lines):
        """What the container's command wrote, stdout and stderr (``podman logs``)."""
        argv = self.podman.argv("logs", "--tail", str(lines), name)
        try:
            with self.rate_limiter.call("console"):
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                      stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TransientCloudError(f"console of {name}: {exc}") from exc
        if proc.returncode != 0:
            if is_missing(proc.stderr):
                raise InstanceNotFound(f"container {name} not found on {self.provider.name}")
            raise TransientCloudError(f"console of {name}: {last_line(proc.stderr)}")
        return proc.stdout + proc.stderr

    # -- the adapter contract --------------------------------------------------------------------

    def start(self):
        """Refuse to start where containers cannot run, saying why in one line."""
        problem = runtime_problem(self.podman, self.ulimits)
        if problem:
            raise PermanentCloudError(f"provider {self.provider.name}: {problem}")

    def create_state_machine(self, spec):
        return PodmanCreate(self, spec)

    def delete_state_machine(self, external_id):
        return PodmanDelete(self, external_id)

    def list_instances(self):
        try:
            containers = self._call("list", "ps", "--all", "--format", "json", json_output=True)
        except PodmanError as exc:
            raise exc.cloud_error(f"provider {self.provider.name}") from exc
        out = []
        for c in containers:
            names = c.get("Names") or [c.get("Id")]
            labels = c.get("Labels") or {}
            if labels.get("nodepool_probe"):
                continue
            # a node publishes exactly one port (its connection port)
            host_ip, port = published_port(c.get("Ports"), None)
            state = c.get("State")
            out.append(self.instance(names[0], labels, running=state == "running", port=port,
                                     host_ip=host_ip,
                                     exited=state in ("exited", "stopped", "dead")))
        return out

    def quota_limits(self):
        opts = self.provider.options
        return Limits.of(cores=opts.get("max-cores") or host_cores(),
                         ram=opts.get("max-ram") or host_ram_mib())

    def quota_for_label(self, label):
        return Resources.of(instances=1, cores=int(label.options.get("cores", 1)),
                            ram=int(label.options.get("ram", 1024)))

    def label_ready(self, label):
        if not label.cloud_image:
            return True
        entry = self.provider.cloud_images.get(label.cloud_image)
        if entry is None:
            return False
        ref = entry.options.get("image") or entry.name
        return self._remember(("image-exists", ref), lambda: self._image_exists(ref), ttl=30)

    def _image_exists(self, ref):
        try:
            self._call("image exists", "image", "exists", ref, timeout=30)
            return True
        except PodmanError as exc:
            if exc.returncode == 1:
                log.warning("provider %s: image %s does not exist in podman's image store",
                            self.provider.name, ref)
            else:
                log.warning("provider %s: cannot check image %s: %s", self.provider.name,
                            ref, exc)
            return False

    def upload_image(self, spec):
        """``podman import`` the root filesystem tarball, labelled with the upload's metadata;
        the external id is podman's image id."""
        if spec.image_format != "tar":
            raise PermanentCloudError(f"image {spec.image_name}: the podman driver imports "
                                      f"tar root filesystems, not {spec.image_format}")
        try:
            if os.path.getsize(spec.filename) == 0:
                raise PermanentCloudError(f"image {spec.image_name}: {spec.filename} is empty")
        except OSError as exc:
            raise PermanentCloudError(f"image {spec.image_name}: cannot read {spec.filename}: "
                                      f"{exc.strerror}") from exc
        args = ["import", "--quiet"]
        for key, value in sorted(spec.metadata.items()):
            args += ["--change", f"LABEL {key}={json.dumps(str(value))}"]
        started = time.monotonic()
        try:
            out = self._call("upload", *args, spec.filename, image_reference(spec.image_name),
                             timeout=spec.timeout)
        except PodmanError as exc:
            raise exc.cloud_error(f"image {spec.image_name} on {self.provider.name}") from exc
        image_id = out.strip().splitlines()[-1].strip() if out.strip() else ""
        image_id = image_id.split(":", 1)[1] if image_id.startswith("sha256:") else image_id
        if not image_id:
            raise TransientCloudError(f"image {spec.image_name}: podman import printed no id")
        log.info("imported %s into podman on %s as %s (%s) in %.1fs", spec.filename,
                 self.provider.name, image_reference(spec.image_name), image_id[:12],
                 time.monotonic() - started)
        return image_id

    def delete_image(self, external_id):
        """``podman rmi``; an image still used by containers stays until they are gone
        (a transient error: the builder retries the delete later)."""
        try:
            self._call("delete image", "rmi", external_id, timeout=60)
        except PodmanError as exc:
            if exc.missing:
                return
            if "in use" in exc.stderr.lower() or "being used" in exc.stderr.lower():
                raise TransientCloudError(f"image {external_id[:12]} on {self.provider.name} "
                                          "is still used by containers: deleted once they "
                                          "are gone") from exc
            raise exc.cloud_error(f"provider {self.provider.name}") from exc

    def list_images(self):
        try:
            images = self._call("list images", "images", "--format", "json", "--filter",
                                f"label={META_BUILD_ID}", json_output=True)
        except PodmanError as exc:
            raise exc.cloud_error(f"provider {self.provider.name}") from exc
        return [CloudResource(type="image", id=img.get("Id"), metadata=dict(
                    img.get("Labels") or {}), name=(img.get("Names") or [None])[0])
                for img in images]

    def console_log(self, external_id):
        """What the container's command (``sshd -e``) wrote, stdout and stderr."""
        return self._logs(external_id, 200)
