"""One thread per provider that advances every launch and delete of that provider.

Launches and deletes are state machines (the adapter's, wrapped in ``LaunchJob``/``DeleteJob``
which add retries, timeouts, the host-key scan and the node record writes).  The thread advances
each of them a step per tick, so one thread serves hundreds of servers and a slow cloud only
slows its own provider.  The worker also keeps the provider's cloud view fresh (instance list,
quota limits, label costs) and removes leaked instances and resources.

Locks: the launcher hands each job the node's lock.  A finished launch keeps its lock (the
launcher unlocks when the request is fulfilled); a finished delete removes the node record and
with it the lock.
"""
import logging
import queue
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from ..drivers import get_driver
from ..drivers.base import (META_LAUNCHER, META_NODE_ID, META_POOL, META_PROVIDER, LaunchSpec)
from .. import metrics, stats
from ..errors import (CloudError, ConflictError, InstanceNotFound, LabelConfigurationError,
                      LaunchTimeout, LockError, NotFoundError, QuotaError, StoreError,
                      TransientCloudError)
from ..model.records import Node
from ..model.states import NodeState
from . import cleanup
from .nodescan import NodeScan
from .rollout import outcome_kind

DELETE_TIMEOUT = 600
QUOTA_CACHE_SECONDS = 300
INSTANCE_LIST_SECONDS = 30
START_RETRY = 30
RECONCILE_SECONDS = 2.0      # registered (static) hosts: compare slots and node records
PERIODIC_SECONDS = 1.0       # how often the adapter's ``periodic()`` housekeeping runs
STATIC_LAUNCHER = "static driver"   # the ``launcher`` Nodepool writes on static nodes


DELETE_RETRY_CAP = 300.0
# failed tries of one node's delete that may wait only 1 s again (after a transient error,
# when the cloud deleted another instance meanwhile); from then on the wait only doubles
QUICK_DELETE_RETRIES = 8


def _count(metric, *labels):
    getattr(metrics, metric).labels(*labels).inc()


def _observe(metric, value, *labels):
    getattr(metrics, metric).labels(*labels).observe(value)


class _Job:
    """What launch, delete and orphan jobs share: a job that hit an error waits before its
    next step, twice as long each time (capped), so a failing cloud or store is not hammered
    and one job's trouble never holds up the others."""

    retry_cap = 60.0

    def __init__(self):
        self.next_step = 0.0
        self.errors = 0
        self.failed_at = None         # when the last error was met (monotonic)

    def due(self, now):
        return now >= self.next_step

    def wait_after_error(self, now, cloud_worked_at=None):
        """Wait before the next step.  ``cloud_worked_at``: when the provider last did what
        this job failed at, for another job; if that was after this job's previous error, the
        cloud works and this job was unlucky: it waits the shortest time again."""
        if cloud_worked_at is not None and self.failed_at is not None \
                and cloud_worked_at > self.failed_at:
            self.errors = 0
        self.failed_at = now
        self.errors += 1
        delay = min(self.retry_cap, 2.0 ** (self.errors - 1))
        self.next_step = now + delay
        return delay

    def stepped_ok(self):
        self.errors = 0


class LaunchJob(_Job):
    """Creates one node's instance: create → (scan) → ready, with retries and cleanup.

    Every write of the node record is a compare-and-set under the node lock the launcher
    handed over: if the record changed or went (an operator deleted it, our session expired and
    another launcher took over) the job stops and deletes its instance, instead of writing over
    somebody else's record.  A store error only delays the write (the job keeps its place);
    a cloud error costs a launch attempt; a quota or capacity refusal ends the launch as
    ``aborted`` so the launcher can relaunch the slot after a backoff.  The next attempt waits
    1 s, twice as long after each failure while no launch on the provider ends ready (capped):
    a cloud that is down is not hammered, one that fails now and then costs no long waits.
    """

    def __init__(self, node, lock, spec, provider, pool, worker):
        super().__init__()
        self.node = node
        self.lock = lock
        self.spec = spec
        self.provider = provider
        self.pool = pool
        self.worker = worker
        self.attempt = 1
        self.started = time.monotonic()
        self.attempt_started = self.started
        self.phase = "create"
        self.machine = None
        self.cleanup_machine = None
        self.scan = None
        self.instance = None
        self.dirty = False            # the node record has changes not yet written
        self.final = None             # (state, reason) decided, written when the store allows
        self.done = False
        self.error = None
        self.log = logging.LoggerAdapter(
            logging.getLogger("nodepool.launcher.launch"),
            {"node": node.id})

    def _log_console(self, extid):
        """Log the console of a server that failed to boot, when its label asks for it."""
        label = self.pool.labels.get(self.node.type[0]) if self.node.type else None
        if not extid or not label or not label.options.get("console-log"):
            return
        try:
            output = self.worker.adapter.console_log(extid)
        except Exception as exc:
            self.log.warning("node %s: console log of %s unavailable: %s", self.node.id, extid, exc)
            return
        if output:
            self.log.info("node %s: console log of %s:\n%s", self.node.id, extid, output)

    def _extid(self):
        return (self.machine.external_id if self.machine else None) or self.node.external_id

    def _fail_attempt(self, exc):
        self.worker._count_launch(self.pool, self.node, exc, self.phase)
        self.worker.on_outcome(self.node, outcome_kind(exc, self.phase,
                                                       self.scan.state if self.scan else None))
        extid = self._extid()
        self._log_console(extid)
        if self.attempt < self.provider.launch_retries:
            # a launch of another node ended ready since this one last failed: no longer wait
            # (a flaky cloud kept a request waiting a minute for one node's 32 s wait)
            delay = self.wait_after_error(time.monotonic(), self.worker.last_ready_at)
            metrics.BACKOFFS.labels(self.provider.name, "launch-error").inc()
            self.log.warning("node %s launch attempt %d/%d failed on %s: %s; retrying in %.0fs",
                             self.node.id, self.attempt, self.provider.launch_retries,
                             self.provider.name, exc, delay)
            self.attempt += 1
            self.phase = "cleanup" if extid else "create"
            self.cleanup_machine = (self.worker.adapter.delete_state_machine(extid)
                                    if extid else None)
            self.machine = None
            self.scan = None
            return
        self.log.error("node %s failed on %s after %d attempt(s): %s", self.node.id,
                       self.provider.name, self.attempt, exc)
        self._after_outcome(NodeState.FAILED,
                            f"launch failed after {self.attempt} attempt(s): {exc}")

    def _decide(self, state, reason=None):
        self.final = (state, reason)
        self._write_final()

    def _write_final(self):
        state, reason = self.final
        node = self.node
        if node.state != state:
            node.set_state(state)
        if reason:
            node.extra["failure_reason"] = reason
            self.error = reason
        self.dirty = True
        self._flush()
        self.done = True

    def _flush(self):
        if self.dirty:
            self.worker.store.update_node(self.node, check_version=True)
            self.dirty = False

    def step(self):
        """Advance one step.  Returns True once the job is finished (its outcome written)."""
        try:
            if self.final is not None:
                self._write_final()        # the outcome is known; only its write was delayed
                return True
            self._flush()
            if self.phase == "cleanup":
                self._step_cleanup()
                return False
            if self.phase == "create":
                self._step_create()
            elif self.phase == "scan":
                keys = self.scan.advance()
                if keys is not None:
                    self.node.host_keys = keys
                    self._ready()
            self._flush()
            self.stepped_ok()
            return self.done
        except (NotFoundError, ConflictError) as exc:
            # our record was deleted or rewritten under us: it is not ours to write any more
            self.log.warning("node %s %s while launching: stopping and removing its instance",
                             self.node.id, "vanished from the store"
                             if isinstance(exc, NotFoundError) else "was changed by someone else")
            self.abandon(f"node {self.node.id} was deleted or taken over while launching")
            self.done = True
            return True
        except StoreError as exc:
            # the store blipped: keep the job where it is and write later; not the cloud's fault
            delay = self.wait_after_error(time.monotonic())
            metrics.BACKOFFS.labels(self.provider.name, "store-error").inc()
            self.log.warning("node %s: state store error while launching (retrying in %.0fs): %s",
                             self.node.id, delay, exc)
            return False
        except QuotaError as exc:
            self.log.info("node %s: cloud quota refused the launch on %s: %s", self.node.id,
                          self.provider.name, exc)
            self.worker.invalidate_quota()
            self.worker._count_launch(self.pool, self.node, exc, self.phase)
            return self._after_outcome(NodeState.ABORTED, f"quota: {exc}")
        except CloudError as exc:
            self._fail_attempt(exc)
        except Exception as exc:   # a driver bug must not kill the worker
            self.log.exception("node %s: unexpected error launching on %s", self.node.id,
                               self.provider.name)
            self._fail_attempt(exc)
        return self.done

    def _after_outcome(self, state, reason):
        """Record a final outcome; a store error while writing it is retried later."""
        try:
            self._decide(state, reason)
        except (NotFoundError, ConflictError):
            self.abandon(f"node {self.node.id} was deleted or taken over while launching")
            self.done = True
        except StoreError as exc:
            self.wait_after_error(time.monotonic())
            self.log.warning("node %s: outcome %s not written yet: %s", self.node.id,
                             state.value, exc)
        return self.done

    def _step_cleanup(self):
        """Remove the failed attempt's instance before the next attempt.  A cloud error here
        is retried with a backoff and does not use up an attempt."""
        if not self.due(time.monotonic()):
            return
        try:
            if self.cleanup_machine is not None and not self.cleanup_machine.advance():
                return
        except InstanceNotFound:
            pass
        except CloudError as exc:
            delay = self.wait_after_error(time.monotonic())
            self.log.warning("node %s: removing the failed attempt's instance on %s failed "
                             "(retrying in %.0fs): %s", self.node.id, self.provider.name,
                             delay, exc)
            return
        self.cleanup_machine = None
        self.node.external_id = None
        self.dirty = True
        self.phase = "create"

    def _step_create(self):
        if not self.due(time.monotonic()):
            return
        if self.machine is None:
            self.machine = self.worker.adapter.create_state_machine(self.spec)
            self.attempt_started = time.monotonic()
        if time.monotonic() - self.attempt_started > self.provider.launch_timeout:
            raise LaunchTimeout(f"instance not active after launch-timeout "
                                f"{self.provider.launch_timeout}s")
        result = self.machine.advance()
        if self.machine.external_id and self.machine.external_id != self.node.external_id:
            self.node.external_id = self.machine.external_id
            self.dirty = True
        if result is None:
            return
        self.instance = result
        self._apply_instance(result)
        if result.host_keys is not None or not self._wants_scan():
            if result.host_keys is not None:
                self.node.host_keys = list(result.host_keys)
            self._ready()
            return
        self.dirty = True
        self.phase = "scan"
        self.scan = NodeScan(self.node.interface_ip, self.node.connection_port,
                             self.provider.boot_timeout, self.node.connection_type)

    def _wants_scan(self):
        label = self.pool.labels.get(self.node.type[0]) if self.node.type else None
        opt = label.options.get("host-key-checking") if label else None
        checking = self.pool.host_key_checking if opt is None else opt
        return checking and self.node.connection_type in (None, "ssh", "network_cli")

    def _apply_instance(self, inst):
        node = self.node
        node.external_id = inst.external_id
        node.public_ipv4 = inst.public_ipv4
        node.private_ipv4 = inst.private_ipv4
        node.public_ipv6 = inst.public_ipv6
        node.interface_ip = (inst.interface_ip or inst.public_ipv4 or inst.public_ipv6
                             or inst.private_ipv4)
        node.az = inst.az or node.az
        node.region = inst.region
        node.cloud = inst.cloud
        node.host_id = inst.host_id
        node.driver_data = inst.driver_data
        if inst.slot is not None:
            node.slot = inst.slot
        node.node_properties = list(inst.node_properties or [])
        if inst.resources:
            node.resources = dict(inst.resources)
        for attr in ("username", "python_path", "shell_type", "connection_type",
                     "connection_port"):
            value = getattr(inst, attr)
            if value is not None:
                setattr(node, attr, value)
        if isinstance(node.connection_port, int):
            node.ssh_port = node.connection_port

    def _ready(self):
        elapsed = time.monotonic() - self.started
        self.log.info("node %s ready on %s/%s as %s (%s) in %.1fs", self.node.id,
                      self.provider.name, self.pool.name, self.node.external_id,
                      self.node.interface_ip, elapsed)
        _count("LAUNCHES", self.provider.name, self.pool.name, self.node.type[0], "ready")
        _observe("LAUNCH_SECONDS", elapsed, self.provider.name, self.node.type[0])
        stats.launch(self.provider.name, self.node.az, self.node.requestor, "ready", elapsed)
        self.worker.on_outcome(self.node, "ready")
        self.worker.last_ready_at = time.monotonic()
        self.final = (NodeState.READY, None)
        self._write_final()

    def abandon(self, reason=None):
        """Stop tracking; make sure the instance does not leak."""
        extid = self._extid()
        if self.scan:
            self.scan.close()
        if extid:
            self.worker.delete_orphan(extid, reason or f"launch of node {self.node.id} abandoned")


class DeleteJob(_Job):
    """Deletes one node: its instance (if any), then its record (and with it the lock).

    The job keeps the node's lock until it is done; while the cloud or the store fails it waits
    (1 s doubling to 5 min) and tries again, so a failing delete is neither dropped nor retried
    every second.  After a transient cloud error, another node's instance deleted meanwhile
    brings the wait back to 1 s."""

    retry_cap = DELETE_RETRY_CAP

    def __init__(self, node, lock, worker, reason, frees_room=False):
        super().__init__()
        self.node = node
        self.lock = lock
        self.worker = worker
        self.reason = reason
        self.frees_room = frees_room
        self.started = time.monotonic()
        self.failures = 0             # tries failed in all
        self.machine = None
        self.done = False

    def step(self):
        node = self.node
        if not self.due(time.monotonic()):
            return False
        try:
            if node.external_id and self.machine is None:
                self.machine = self.worker.adapter.delete_state_machine(node.external_id)
            if self.machine is not None:
                if time.monotonic() - self.started > DELETE_TIMEOUT:
                    raise LaunchTimeout(f"instance {node.external_id} not deleted after "
                                        f"{DELETE_TIMEOUT}s")
                if not self.machine.advance():
                    return False
                # the cloud deleted an instance: it works (a node without one proves nothing)
                self.worker.last_deleted_at = time.monotonic()
                if self.frees_room:
                    self.worker.last_freed_at = self.worker.last_deleted_at
                self.machine = None
                node.external_id = None
            if node.state != NodeState.DELETED:
                node.set_state(NodeState.DELETED)
            try:
                self.worker.store.update_node(node)
            except NotFoundError:
                pass
            self.worker.store.delete_node(node.id)
            self.lock.released = True          # the lock went with the record
            elapsed = time.monotonic() - self.started
            self.worker.log.info("node %s deleted from %s (%s) in %.1fs", node.id,
                                 node.provider, self.reason, elapsed)
            _count("DELETES", node.provider, "success")
            _observe("DELETE_SECONDS", elapsed, node.provider)
        except InstanceNotFound:
            self.machine = None
            node.external_id = None
            return False
        except Exception as exc:
            self.failures += 1
            # after a passing error, another instance deleted meanwhile shows the cloud works
            # (a deleting node keeps its room in the pool).  Other errors, and a delete that
            # failed that often, keep doubling: a delete has no attempt limit, and one that
            # always fails must not hammer the cloud.
            quick = isinstance(exc, TransientCloudError) \
                and self.failures <= QUICK_DELETE_RETRIES
            delay = self.wait_after_error(time.monotonic(),
                                          self.worker.last_deleted_at if quick else None)
            self.machine = None
            if isinstance(exc, LaunchTimeout):
                self.started = time.monotonic()
            _count("DELETES", node.provider, "error")
            metrics.BACKOFFS.labels(node.provider or "", "delete-error").inc()
            self.worker.log.warning("node %s: delete on %s failed (attempt %d, retrying in "
                                    "%.0fs): %s", node.id, node.provider, self.errors, delay,
                                    exc)
            return False
        self.done = True
        return True


class OrphanDelete(_Job):
    """Deletes an instance that has no node record (leaked, or a launch's leftover); while the
    cloud fails it waits and tries again (the leak scan would also find it)."""

    retry_cap = DELETE_RETRY_CAP

    def __init__(self, external_id, worker, reason):
        super().__init__()
        self.external_id = external_id
        self.worker = worker
        self.reason = reason
        self.machine = None
        self.started = time.monotonic()
        self.done = False

    def step(self):
        if not self.due(time.monotonic()):
            return False
        try:
            if self.machine is None:
                self.machine = self.worker.adapter.delete_state_machine(self.external_id)
            if self.machine.advance():
                self.worker.log.info("instance %s on %s deleted (%s)", self.external_id,
                                     self.worker.provider.name, self.reason)
                self.done = True
            elif time.monotonic() - self.started > DELETE_TIMEOUT:
                raise LaunchTimeout("not deleted in time")
        except InstanceNotFound:
            self.done = True
        except Exception as exc:
            self.machine = None
            delay = self.wait_after_error(time.monotonic())
            metrics.BACKOFFS.labels(self.worker.provider.name, "delete-error").inc()
            self.worker.log.warning("instance %s on %s: delete failed (%s), retrying in %.0fs: "
                                    "%s", self.external_id, self.worker.provider.name,
                                    self.reason, delay, exc)
            if self.errors >= 8:
                self.done = True       # the leak scan finds it again if it is still there
        return self.done


class ProviderWorker:
    """Owns one provider's adapter and advances its state machines from one thread."""

    def __init__(self, provider, store, launcher_name, tick=0.05, leak_interval=60,
                 instance_interval=INSTANCE_LIST_SECONDS, on_change=None, on_outcome=None):
        self.provider = provider
        # (node, outcome kind) -> None: per-upload outcomes for image rollout (rollout.py)
        self.on_outcome = on_outcome or (lambda node, kind: None)
        self.store = store
        self.launcher_name = launcher_name
        self.on_change = on_change or (lambda: None)   # wakes the launcher loop
        self.tick = tick
        self.leak_interval = leak_interval
        self.instance_interval = instance_interval
        self.log = logging.getLogger(f"nodepool.launcher.provider.{provider.name}")
        self.start_error = None
        try:
            self.adapter = get_driver(provider.driver).adapter(provider)
        except Exception as exc:
            # e.g. its SDK is not installed: a start error like any other (pools decline with
            # it, and making the adapter is tried again with the start)
            self.adapter = None
            self.start_error = str(exc) or type(exc).__name__
        self._inbox = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retiring = False
        self.launches = {}       # node id -> LaunchJob
        self.last_ready_at = float("-inf")   # when a launch last ended ready (monotonic)
        self.last_deleted_at = float("-inf")  # when a node's instance was last deleted
        self.last_freed_at = float("-inf")    # ... that of a node that was serving
        self.deletes = {}        # node id -> DeleteJob
        self.orphans = {}        # external id -> OrphanDelete
        self._lock = threading.Lock()
        # cloud view (read by the launcher thread; replaced wholesale, never mutated)
        self.instances = []
        self._instances_gen = 0  # bumped with every new listing
        self._unmanaged_key = self._unmanaged = None
        self.instances_time = 0.0
        self.quota_limits = None
        self.quota_time = 0.0
        self.label_costs = {}
        self.broken_labels = {}
        self.cloud_image_ready = {}
        self.azs = []            # the cloud's availability zones (last known)
        self._launching = set()  # node ids submitted for launch and not finished
        self.slot_labels = {}    # pool name -> [frozenset of labels] of its registered slots
        self._leak_suspects = set()
        self._last_leak_scan = 0.0
        self.reconcile_interval = RECONCILE_SECONDS
        self._last_reconcile = -1e9
        self._last_periodic = -1e9
        self.started = False
        self.thread = threading.Thread(target=self._run, name=f"provider-{provider.name}",
                                       daemon=True)

    # -- called from the launcher thread ----------------------------------------------------------

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop.set()
        self._wake.set()

    def retire(self):
        """Take no new work; finish what is in flight, then stop."""
        self._retiring = True
        self._wake.set()

    def join(self, timeout=None):
        self.thread.join(timeout)

    @property
    def busy(self):
        return bool(self.launches or self.deletes or self.orphans or not self._inbox.empty())

    @property
    def in_flight(self):
        return len(self.launches) + self._inbox.qsize()

    def submit_launch(self, node, lock, spec, pool):
        with self._lock:
            self._launching.add(node.id)
        self._inbox.put(("launch", node, lock, spec, pool))
        self._wake.set()

    def is_launching(self, node_id):
        with self._lock:
            return node_id in self._launching

    def launching_ids(self):
        """Ids of nodes whose launch this worker is running (or about to start)."""
        with self._lock:
            return frozenset(self._launching)

    def submit_delete(self, node, lock, reason, frees_room=False):
        """Delete ``node`` (locked by ``lock``).  ``frees_room``: it was serving (ready, in
        use, used, held), so deleting its instance frees room a refused launch may need;
        a failed or refused launch's node frees none worth retrying for."""
        self._inbox.put(("delete", node, lock, reason, frees_room))
        self._wake.set()

    def delete_orphan(self, external_id, reason):
        self._inbox.put(("orphan", external_id, reason))
        self._wake.set()

    def deleting(self, node_id):
        return node_id in self.deletes

    def invalidate_quota(self):
        self.quota_time = 0.0
        self.instances_time = 0.0

    def unmanaged_usage(self, index):
        """Usage in the cloud not ours, worked out again only when the listing or the
        external ids of our records changed (``index``: the pass's ``NodeIndex``)."""
        key = (self._instances_gen, index.external_version[self.provider.name])
        if key != self._unmanaged_key:
            self._unmanaged = cleanup.unmanaged_usage(
                self.instances, index.external_ids(self.provider.name))
            self._unmanaged_key = key
        return self._unmanaged

    def session_lost(self):
        """Locks of the lost session are gone: abandon the launches (cleaning their instances)
        and deletes that held them."""
        self._inbox.put(("lost",))
        self._wake.set()

    # -- the worker thread ------------------------------------------------------------------------

    def _try_start(self):
        """Start the adapter; on failure keep the reason (pools decline with it) and retry."""
        try:
            if self.adapter is None:
                self.adapter = get_driver(self.provider.driver).adapter(self.provider)
            self.adapter.attach_store(self.store)
            self.adapter.start()
        except Exception as exc:
            if str(exc) != self.start_error:
                self.log.error("provider %s cannot start (retrying every %ds): %s",
                               self.provider.name, START_RETRY, exc)
            self.start_error = str(exc) or type(exc).__name__
            self._next_start = time.monotonic() + START_RETRY
            return
        if self.start_error:
            self.log.info("provider %s started after earlier failures", self.provider.name)
        self.start_error = None
        self.started = True
        self._refresh_cloud_view(time.monotonic())
        self.on_change()

    def _run(self):
        self._next_start = 0.0
        while not self._stop.is_set():
            if not self.started and time.monotonic() >= self._next_start:
                self._try_start()
            try:
                self._iteration()
            except Exception:
                self.log.exception("provider %s worker iteration failed", self.provider.name)
                time.sleep(1)
            if self._retiring and not self.busy:
                break
            if self.busy:
                self._wake.wait(self.tick)
            else:
                self._wake.wait(1.0)
            self._wake.clear()
        try:
            if self.adapter is not None:
                self.adapter.stop()
        except Exception:
            self.log.exception("provider %s adapter stop failed", self.provider.name)

    def _iteration(self):
        self._drain_inbox()
        now = time.monotonic()
        if not self.started:
            return
        self._refresh_cloud_view(now)
        for jobs, kind in ((self.launches, "launch"), (self.deletes, "delete"),
                           (self.orphans, "orphan delete")):
            for key, job in list(jobs.items()):
                if self._step(job, key, kind, now):
                    del jobs[key]          # a launch's node record tells the launcher
                    if kind == "launch":
                        with self._lock:
                            self._launching.discard(key)
        if self.leak_interval and now - self._last_leak_scan > self.leak_interval \
                and not self._retiring:
            self._last_leak_scan = now
            self._leak_scan()
        if now - self._last_reconcile >= self.reconcile_interval and not self._retiring:
            self._last_reconcile = now
            self._reconcile_registered()
        if now - self._last_periodic >= PERIODIC_SECONDS:
            self._last_periodic = now
            self.adapter.periodic()

    def _step(self, job, key, kind, now):
        """Advance one job; whatever it raises stays with that job, which waits and retries."""
        if not job.due(now):
            return False
        try:
            return job.step()
        except Exception:
            delay = job.wait_after_error(now)
            self.log.exception("provider %s: unexpected error in %s job %s (retrying in %.0fs)",
                               self.provider.name, kind, key, delay)
            return False

    def _drain_inbox(self):
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = item[0]
            if kind == "launch":
                _, node, lock, spec, pool = item
                self.launches[node.id] = LaunchJob(node, lock, spec, self.provider, pool, self)
            elif kind == "delete":
                _, node, lock, reason, frees_room = item
                self.deletes[node.id] = DeleteJob(node, lock, self, reason, frees_room)
            elif kind == "orphan":
                _, extid, reason = item
                if extid not in self.orphans:
                    self.orphans[extid] = OrphanDelete(extid, self, reason)
            elif kind == "lost":
                self._abandon_lost()

    def _abandon_lost(self):
        """Drop the jobs whose node lock went with the lost session (a launch's instance is
        deleted).  A job whose lock was taken in the new session (the store reconnected
        before the launcher heard of the loss) is kept: dropping it would leave its node
        locked by our live session, which nobody would ever clean up."""
        holds = self.store.holds
        for node_id, job in list(self.launches.items()):
            if not holds(job.lock):
                job.abandon()
                del self.launches[node_id]
                with self._lock:
                    self._launching.discard(node_id)
        for node_id, job in list(self.deletes.items()):
            if not holds(job.lock):
                del self.deletes[node_id]

    def _refresh_cloud_view(self, now):
        if now - self.quota_time > QUOTA_CACHE_SECONDS:
            try:
                self.quota_limits = self.adapter.quota_limits()
            except Exception as exc:
                self.log.warning("provider %s: cannot read quota limits (keeping the last "
                                 "known): %s", self.provider.name, exc)
            self.quota_time = now
            costs, broken = {}, {}
            for label in self.provider.labels():
                try:
                    costs[label.name] = self.adapter.quota_for_label(label)
                except LabelConfigurationError as exc:
                    broken[label.name] = str(exc)
                except Exception as exc:
                    self.log.warning("provider %s: cannot size label %s: %s",
                                     self.provider.name, label.name, exc)
                if label.cloud_image:
                    try:
                        self.cloud_image_ready[label.name] = self.adapter.label_ready(label)
                    except Exception as exc:
                        self.log.warning("provider %s: cannot check image of label %s: %s",
                                         self.provider.name, label.name, exc)
            self.label_costs, self.broken_labels = costs, broken
            try:
                self.azs = [a for a in self.adapter.availability_zones() if a]
            except Exception as exc:
                self.log.warning("provider %s: cannot list availability zones (keeping the last "
                                 "known): %s", self.provider.name, exc)
        # the listing only tells cloud usage not ours, which matters against cloud limits: a
        # cloud without any (the leak scan lists for itself) is not listed every interval
        if self.quota_limits and now - self.instances_time > self.instance_interval:
            self._list_instances(now)

    def _list_instances(self, now):
        try:
            self.instances = self.adapter.list_instances()
            self._instances_gen += 1
        except Exception as exc:
            self.log.warning("provider %s: cannot list instances: %s", self.provider.name, exc)
        self.instances_time = now

    def _leak_scan(self):
        """Delete instances and resources tagged as ours that no node record owns."""
        self._list_instances(time.monotonic())
        try:
            nodes = self.store.list_nodes(shared=True)   # only read
        except StoreError as exc:
            self.log.warning("leak scan skipped: %s", exc)
            return
        busy = set(self.launches) | set(self.deletes)
        candidates = [i for i in self.instances if i.node_id not in busy
                      and i.external_id not in self.orphans]
        to_delete, self._leak_suspects = cleanup.leaked_instances(
            self.provider.name, candidates, nodes, self._leak_suspects)
        for inst in to_delete:
            self.log.warning("leaked instance %s on %s (node %s has no record): deleting",
                             inst.external_id, self.provider.name, inst.node_id)
            _count("LEAKED", self.provider.name, "instances")
            stats.leaked(self.provider.name, "instances")
            self.orphans[inst.external_id] = OrphanDelete(inst.external_id, self, "leaked")
        node_ids = {n.id for n in nodes}
        try:
            resources = self.adapter.list_resources()
        except Exception as exc:
            self.log.warning("provider %s: cannot list resources: %s", self.provider.name, exc)
            resources = []
        for res in resources:
            if res.type == "image":
                continue      # images belong to the builder's retention
            if res.metadata.get(META_PROVIDER) != self.provider.name:
                continue
            if res.metadata.get(META_NODE_ID) in node_ids:
                continue
            try:
                self.adapter.delete_resource(res)
                self.log.warning("leaked %s %s on %s: deleted", res.type, res.id,
                                 self.provider.name)
                _count("LEAKED", self.provider.name, res.type + "s")
                stats.leaked(self.provider.name, res.type + "s")
            except Exception as exc:
                self.log.warning("leaked %s %s on %s: delete failed: %s", res.type, res.id,
                                 self.provider.name, exc)

    # -- registered hosts (static driver) ---------------------------------------------------------
    #
    # Providers of pre-existing hosts answer ``adapter.registered_nodes()`` with the slots that
    # should exist; clouds answer None and skip all of this.  The decision is the pure
    # ``plan_registered_nodes``; the methods below only apply it, each under the node's lock.

    def _reconcile_registered(self):
        """Make node records match the adapter's registered slots (static hosts)."""
        try:
            slots = self.adapter.registered_nodes()
        except Exception:
            self.log.exception("provider %s: cannot list registered hosts", self.provider.name)
            return
        if slots is None:
            return
        by_pool = {}
        for slot in slots:
            by_pool.setdefault(slot.pool, []).append(frozenset(slot.labels))
        self.slot_labels = by_pool
        try:
            nodes = self.store.list_nodes()
            locked = self.store.locked_node_ids()
        except StoreError as exc:
            self.log.warning("provider %s: registered hosts not reconciled: %s",
                             self.provider.name, exc)
            return
        by_ext = {s.external_id: s for s in slots}
        for action in plan_registered_nodes(self.provider.name, slots, nodes, locked):
            try:
                if isinstance(action, RegisterSlot):
                    self._register_slot(by_ext[action.external_id])
                else:
                    self._with_node_lock(action.node_id, action, by_ext.get(action.external_id))
            except StoreError as exc:
                self.log.warning("provider %s: %s not applied: %s", self.provider.name,
                                 action, exc)

    def _register_slot(self, slot):
        node = Node(state=NodeState.READY, provider=self.provider.name, pool=slot.pool,
                    launcher=STATIC_LAUNCHER, cloud=self.provider.name)
        apply_slot(node, slot)
        node = self.store.create_node(node)
        self.log.info("node %s registered: static host %s slot %d on %s/%s (%s)", node.id,
                      slot.interface_ip, slot.slot, self.provider.name, slot.pool,
                      ",".join(slot.labels))

    def _with_node_lock(self, node_id, action, slot):
        """Lock the node, re-check the plan against its current record, apply the action."""
        try:
            lock = self.store.lock_node(node_id)
        except LockError:
            return          # somebody is using it: next round
        try:
            node = self.store.get_node(node_id)
            if node is None:
                return
            if not registered_action_applies(action, node, slot):
                return      # it changed since the snapshot
            if isinstance(action, ReturnToReady):
                node.allocated_to = None
                node.user_data = None
                node.hold_job = None
                node.comment = None
                node.hold_expiration = None
                node.tenant_name = None
                node.requestor = None
                apply_slot(node, slot)
                node.set_state(NodeState.READY)
                self.store.update_node(node)
                self.log.info("node %s (static host %s slot %s) back to ready after use",
                              node.id, node.interface_ip, node.slot)
            elif isinstance(action, RefreshSlot):
                apply_slot(node, slot)
                self.store.update_node(node)
                self.log.info("node %s (static host %s slot %s) updated from the configuration",
                              node.id, node.interface_ip, node.slot)
            else:
                self.store.delete_node(node_id)
                lock.released = True          # the lock went with the record
                if isinstance(action, TakeOutOfService):
                    self.log.warning("node %s (static host %s slot %s) out of service: %s",
                                     node.id, node.interface_ip, node.slot, action.reason)
                else:
                    self.log.info("node %s (static host %s slot %s) removed: %s", node.id,
                                  node.interface_ip, node.slot, action.reason)
        finally:
            lock.release()

    def _write(self, node):
        self.store.update_node(node)

    def _count_launch(self, pool, node, exc, phase=None):
        kind = ("quota" if isinstance(exc, QuotaError) else
                "timeout" if isinstance(exc, LaunchTimeout) else
                "cloud" if isinstance(exc, CloudError) else "unknown")
        _count("LAUNCHES", self.provider.name, pool.name, node.type[0] if node.type else "",
               f"error.{kind}")
        stats.launch(self.provider.name, node.az, node.requestor, stats.launch_result(exc, phase),
                     time.time() - (node.state_time or time.time()))


def build_launch_spec(node, pool, pool_label, launcher_name, image_external_id, request):
    """The adapter's view of a launch: hostname, tags, image, AZ."""
    metadata = {
        META_NODE_ID: node.id,
        META_POOL: pool.name,
        META_PROVIDER: pool.provider,
        META_LAUNCHER: launcher_name,
    }
    return LaunchSpec(hostname=f"np{node.id}", label=pool_label, pool=pool, metadata=metadata,
                      image_external_id=image_external_id, az=node.az, request=request,
                      node_id=node.id)


def choose_az(pool, adapter_azs, rng=random):
    """A random AZ from the pool's list, else from the cloud's (None when it has none)."""
    choices = list(pool.azs) or [a for a in adapter_azs if a]
    return rng.choice(choices) if choices else None


# -- registered hosts: the pure decision ----------------------------------------------------------

@dataclass(frozen=True)
class RegisterSlot:
    """Create a ready node for an answering slot that has none."""
    external_id: str
    node_id: str = None


@dataclass(frozen=True)
class ReturnToReady:
    """A used node of an answering host goes back to ready."""
    node_id: str
    external_id: str


@dataclass(frozen=True)
class RefreshSlot:
    """A ready node's labels, pool, address or host keys differ from its slot: rewrite them."""
    node_id: str
    external_id: str


@dataclass(frozen=True)
class TakeOutOfService:
    """The host stopped answering: drop its free node until it answers again."""
    node_id: str
    external_id: str
    reason: str


@dataclass(frozen=True)
class ForgetNode:
    """The node's slot left the configuration (or is a duplicate): drop the record."""
    node_id: str
    external_id: str
    reason: str


_SLOT_FIELDS = ("pool", "type", "interface_ip", "username", "connection_type", "connection_port",
                "host_keys", "python_path", "shell_type", "slot")


def apply_slot(node, slot):
    """Copy a ``RegisteredSlot`` onto a node record."""
    node.pool = slot.pool
    node.type = list(slot.labels)
    node.external_id = slot.external_id
    node.hostname = slot.interface_ip
    node.interface_ip = slot.interface_ip
    node.public_ipv4 = slot.interface_ip if ":" not in slot.interface_ip else None
    node.username = slot.username
    node.connection_type = slot.connection_type
    node.connection_port = slot.connection_port
    node.ssh_port = slot.connection_port
    node.host_keys = list(slot.host_keys)
    node.python_path = slot.python_path
    node.shell_type = slot.shell_type
    node.slot = slot.slot


def _slot_differs(node, slot):
    probe = Node()
    apply_slot(probe, slot)
    return any(getattr(node, f) != getattr(probe, f) for f in _SLOT_FIELDS)


def _free_registered(node):
    return node.state == NodeState.USED or (node.state == NodeState.READY
                                            and not node.allocated_to)


def registered_action_applies(action, node, slot):
    """Re-check one planned action against the node's current record (taken under its lock)."""
    if isinstance(action, ReturnToReady):
        return node.state == NodeState.USED and slot is not None and bool(slot.answers)
    if isinstance(action, (RefreshSlot, TakeOutOfService)):
        return node.state == NodeState.READY and not node.allocated_to and slot is not None
    return _free_registered(node)


def plan_registered_nodes(provider_name, slots, nodes, locked_node_ids):
    """What to do so ``provider_name``'s node records match its registered ``slots``.

    Only unlocked nodes are touched.  A slot whose host has not been checked yet
    (``answers is None``) is left alone; in-use and held nodes are never touched.
    """
    by_ext = defaultdict(list)
    for node in nodes:
        if node.provider == provider_name and node.state != NodeState.DELETED:
            by_ext[str(node.external_id)].append(node)
    wanted = {s.external_id: s for s in slots}
    actions = []

    def free(node):
        return node.id not in locked_node_ids and _free_registered(node)

    for ext, slot in wanted.items():
        existing = sorted(by_ext.get(ext, []), key=lambda n: n.id or "")
        if not existing:
            if slot.answers:
                actions.append(RegisterSlot(ext))
            continue
        node, duplicates = existing[0], existing[1:]
        for dup in duplicates:
            if free(dup):
                actions.append(ForgetNode(dup.id, ext, "duplicate record of the same slot"))
        if node.id in locked_node_ids:
            continue
        if node.state == NodeState.USED:
            if slot.answers:
                actions.append(ReturnToReady(node.id, ext))
        elif node.state == NodeState.READY and not node.allocated_to:
            if slot.answers is False:
                actions.append(TakeOutOfService(node.id, ext, slot.error or "host does not answer"))
            elif slot.answers and _slot_differs(node, slot):
                actions.append(RefreshSlot(node.id, ext))
    for ext, stale in by_ext.items():
        if ext in wanted:
            continue
        for node in stale:
            if free(node):
                actions.append(ForgetNode(node.id, ext, "its host slot is no longer configured"))
    return actions
