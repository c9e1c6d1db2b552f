"""The static driver's adapter: host checks in the background, slots on demand.

``registered_nodes()`` never blocks: it starts a check of every host whose last check is older
than ``HOST_CHECK_INTERVAL`` on a small thread pool and answers from the latest results.  A check
is a TCP connect within the host's ``timeout`` and, with ``host-key-checking``, an ``ssh-keyscan``
whose keys must include every configured ``host-key``.  A dead or firewalled host therefore costs
one pool thread for ``timeout`` seconds, never the worker loop or the other hosts.
"""
import concurrent.futures
import logging
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from ...errors import PermanentCloudError
from ...launcher.nodescan import KEYSCAN_ATTEMPTS, keyscan_failures, parse_keyscan
from ..base import Adapter, RegisteredSlot, StateMachine
from . import _names, node_port

log = logging.getLogger("nodepool.drivers.static")

HOST_CHECK_INTERVAL = 10.0     # seconds between two checks of one host
MAX_CHECK_THREADS = 8


@dataclass
class HostCheck:
    """The outcome of one check of one host."""
    answers: bool
    host_keys: list
    error: Optional[str] = None


def normalise_key(key):
    """``[host] type base64 [comment]`` or ``type base64 [comment]`` -> ``type base64``."""
    parts = key.split()
    for i, part in enumerate(parts[:-1]):
        if part.startswith(("ssh-", "ecdsa-", "sk-")):
            return f"{part} {parts[i + 1]}"
    return " ".join(parts[:2])


def verify_host_keys(host, expected, scanned):
    """The host keys to store, or raise PermanentCloudError when an expected key is missing."""
    scanned = sorted({normalise_key(k) for k in scanned})
    missing = [k for k in (normalise_key(k) for k in expected) if k not in scanned]
    if missing:
        offered = ", ".join(k.split()[0] for k in scanned) or "none"
        raise PermanentCloudError(
            f"static host {host}: host key mismatch: the configured host-key "
            f"{missing[0].split()[0]} ...{missing[0].split()[-1][-12:]} is not among the keys "
            f"it offers ({offered})")
    return scanned


def check_host(node):
    """Check one configured host (blocking, bounded by its ``timeout``)."""
    host = node["name"]
    port = node_port(node)
    timeout = float(node.get("timeout") or 5)
    expected = _names(node.get("host-key"))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return HostCheck(False, [], f"static host {host}: cannot connect to port {port}: "
                                    f"{exc.strerror or exc}")
    if not node.get("host-key-checking", True) or node.get("connection-type", "ssh") == "winrm":
        return HostCheck(True, sorted({normalise_key(k) for k in expected}))
    binary = shutil.which("ssh-keyscan")
    if binary is None:
        return HostCheck(False, [], f"static host {host}: ssh-keyscan is not installed "
                                    f"(install openssh-client or set host-key-checking: false)")
    keys, failures = set(), []
    for _ in range(KEYSCAN_ATTEMPTS):
        try:
            proc = subprocess.run([binary, "-T", str(max(1, int(timeout))), "-p", str(port), host],
                                  capture_output=True, text=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return HostCheck(False, [], f"static host {host}: ssh-keyscan timed out")
        keys.update(parse_keyscan(proc.stdout))
        failures = keyscan_failures(proc.stderr)
        if not failures:
            break
    if not keys:
        detail = failures[-1] if failures else "no output"
        return HostCheck(False, [], f"static host {host}: ssh-keyscan found no host keys "
                                    f"on port {port} ({detail})")
    try:
        keys = verify_host_keys(host, expected, keys)
    except PermanentCloudError as exc:
        return HostCheck(False, [], str(exc))
    return HostCheck(True, keys)


def expand_slots(provider):
    """Every (pool name, host config, slot index, external id) the config asks for.

    The external id is ``host:port#slot``; a host registered more than once (under different
    usernames) names its slots ``username@host:port#slot`` instead, one set per registration."""
    entries = [(pool.name, node) for pool in provider.pools.values()
               for node in pool.options.get("nodes") or []]
    registrations = {}
    for _, node in entries:
        registrations.setdefault(host_key_of(node), set()).add(node.get("username") or "zuul")
    out = []
    for pool_name, node in entries:
        port = node_port(node)
        prefix = ""
        if len(registrations[host_key_of(node)]) > 1:
            prefix = f"{node.get('username') or 'zuul'}@"
        for slot in range(int(node.get("max-parallel-jobs") or 1)):
            out.append((pool_name, node, slot, f"{prefix}{node['name']}:{port}#{slot}"))
    return out


def host_key_of(node):
    return (node["name"], node_port(node))


class _ForgetSlot(StateMachine):
    """Deleting a static node only drops its record; the host stays as it is."""

    def advance(self):
        self.complete = True
        return True


class StaticAdapter(Adapter):
    pause_at_quota = False
    reuses_nodes = True
    launches = False

    def __init__(self, provider, rate_limiter=None):
        super().__init__(provider, rate_limiter)
        self.check_interval = HOST_CHECK_INTERVAL
        self._results = {}       # (host, port) -> HostCheck
        self._checked_at = {}    # (host, port) -> monotonic time the last check started
        self._pending = {}       # (host, port) -> Future
        self._reported = {}      # (host, port) -> last error logged (log each change once)
        self._executor = None

    def start(self):
        hosts = {host_key_of(node) for _, node, _, _ in expand_slots(self.provider)}
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(MAX_CHECK_THREADS, len(hosts))),
            thread_name_prefix=f"static-{self.provider.name}")

    def stop(self):
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- the state-machine contract: nothing to create or delete ----------------------------------

    def create_state_machine(self, spec):
        raise PermanentCloudError(f"provider {self.provider.name}: static pools never launch "
                                  f"nodes, they only hand out their registered hosts")

    def delete_state_machine(self, external_id):
        return _ForgetSlot()

    def list_instances(self):
        return []

    # -- registered hosts -------------------------------------------------------------------------

    def registered_nodes(self):
        slots = expand_slots(self.provider)
        now = time.monotonic()
        hosts = {}
        for _, node, _, _ in slots:
            hosts.setdefault(host_key_of(node), node)
        for key, node in hosts.items():
            self._collect(key)
            if key not in self._pending and now - self._checked_at.get(key, -1e9) \
                    >= self.check_interval and self._executor is not None:
                self._checked_at[key] = now
                self._pending[key] = self._executor.submit(check_host, node)
        out = []
        for pool, node, slot, external_id in slots:
            result = self._results.get(host_key_of(node))
            out.append(RegisteredSlot(
                external_id=external_id, pool=pool, labels=_names(node.get("labels")),
                slot=slot, interface_ip=node["name"], username=node.get("username") or "zuul",
                connection_type=node.get("connection-type") or "ssh",
                connection_port=node_port(node),
                host_keys=list(result.host_keys) if result else [],
                python_path=node.get("python-path"), shell_type=node.get("shell-type"),
                answers=result.answers if result else None,
                error=result.error if result else None))
        return out

    def _collect(self, key):
        """Take a finished check's result and log changes of a host's health once."""
        future = self._pending.get(key)
        if future is None or not future.done():
            return
        del self._pending[key]
        try:
            result = future.result()
        except Exception as exc:     # a bug in the check must not stop the others
            result = HostCheck(False, [], f"static host {key[0]}: check failed: {exc}")
        previous = self._reported.get(key, "unchecked")
        if result.error != previous:
            if result.error:
                log.error("provider %s: %s; its slots are out of service", self.provider.name,
                          result.error)
            elif previous != "unchecked":
                log.info("provider %s: static host %s:%s answers again", self.provider.name,
                         *key)
            self._reported[key] = result.error
        self._results[key] = result

    def check_now(self):
        """Forget check times so the next ``registered_nodes()`` checks every host again."""
        self._checked_at.clear()
