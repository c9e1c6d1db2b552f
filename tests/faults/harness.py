"""What the fault tests share: daemons as processes, a Zuul-like request stream, invariant checks.

``FaultEnv`` extends the launcher fixtures' ``LauncherEnv`` with what killing daemons needs:
launchers started through a wrapper (``faketime``) or with extra environment, builder processes,
and a direct view of the simulated cloud's state file (no injected API errors on the test's own
reads).

``RequestStream`` plays Zuul: a few client threads submit 1- and 2-label requests, wait, lock the
nodes, use them and return them as ``used``.  What a client sees that breaks a promise (a node
accepted for two requests, a node not ready when accepted, a request failed without a reason,
no answer in time) is recorded, never raised in the thread.

``AllocationWatch`` samples the requests while the stream runs: no node may be listed by two
fulfilled requests at once.

``settle`` waits, after the faults, until the system is quiet again and returns what is still
wrong (transitional nodes, leftover requests, instances without a record, records without an
instance); the tests assert it is nothing.

Every random choice comes from ``fault_rng``: the seed is printed and ``NODEPOOL_FAULT_SEED``
replays the same schedule of kills, labels and cloud failures (thread timing still varies).
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

from fixtures.launcher import REPO, LauncherEnv
from fixtures.procs import die_with_parent
from nodepool.client import NodepoolClient
from nodepool.drivers.simulated.cloud import SimulatedCloud
from nodepool.errors import LockError, NotFoundError, StoreError
from nodepool.model import NodeState, RequestState

# The launcher tests' cloud: one pool, a label kept ready and one launched on demand.
CONFIG = """\
launcher:
  leak-interval: 0.5
labels:
  - name: small
    min-ready: 1
  - name: large
providers:
  - name: sim
    driver: simulated
    boot-time: {boot_time}
    count-api-calls: true
    seed: {seed}
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: 14
        labels:
          - name: small
            cloud-image: img
          - name: large
            cloud-image: img
            cores: 2
"""

NODESETS = [["small"], ["large"], ["small", "large"], ["small", "small"]]


# sitecustomize of the daemons: SIGUSR1 dumps their threads, the clock-step test shifts time
DAEMON_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "daemon_site")

# messages the daemons log (with a traceback) when their own code failed; see fixtures.launcher
CRASHES = ("launcher loop failed", "worker iteration failed", "unexpected error launching",
           "worker failed (will retry)", "builder worker", "ZooKeeper cache update failed",
           "launcher observation failed", "recording the wait of")


def fault_rng(name):
    """A ``random.Random`` for one test, from ``NODEPOOL_FAULT_SEED`` or a fresh seed (printed)."""
    seed = os.environ.get("NODEPOOL_FAULT_SEED")
    seed = int(seed) if seed else random.SystemRandom().randrange(1, 2**31)
    print(f"[faults] {name}: NODEPOOL_FAULT_SEED={seed}")
    rng = random.Random(f"{seed}:{name}")
    rng.seed_value = seed
    return rng


def report(name, **figures):
    """Print the figures of a run (and append them to ``$NODEPOOL_FAULT_REPORT`` as JSON)."""
    print(f"[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    path = os.environ.get("NODEPOOL_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}, sort_keys=True) + "\n")


class FaultEnv(LauncherEnv):
    """A ``LauncherEnv`` whose daemons we kill, freeze and restart."""

    def write(self, body):
        """Write the config; a body naming its own ``state-file`` keeps it (one cloud per
        provider), otherwise every simulated provider shares ``cloud.sqlite``."""
        if "state-file:" not in body:
            return super().write(body)
        with open(self.config_path, "w") as f:
            f.write(self.store_yaml + textwrap.dedent(body))
        st = os.stat(self.config_path)
        os.utime(self.config_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return self.config_path

    def spawn_launcher(self, wrapper=(), env=None):
        """``nodepool-launcher -f`` as a process (optionally under ``wrapper``, e.g. faketime)."""
        return self._spawn("launcher", [*wrapper, sys.executable, "-m", "nodepool.cli.launcher",
                                        "-f", "-c", self.config_path, "--no-webapp"], env)

    def spawn_builder(self, env=None):
        return self._spawn("builder", [sys.executable, "-m", "nodepool.cli.builder", "-f", "-c",
                                       self.config_path, "--upload-workers", "2"], env)

    def _spawn(self, kind, argv, env):
        # PYTHONFAULTHANDLER: ``dump_stacks`` (SIGABRT) prints every thread of a stuck daemon
        full_env = dict(os.environ, PYTHONPATH=f"{DAEMON_SITE}:{REPO}", PYTHONFAULTHANDLER="1")
        full_env.update(env or {})
        log = open(self.dir / f"{kind}-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env,
                                preexec_fn=die_with_parent)
        proc.log = log
        proc.kind = kind
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc):
        """SIGKILL one daemon we started (by its PID) and reap it."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def show_stacks(self, kind="launcher"):
        """Have every running daemon of ``kind`` write its threads' stacks to its log."""
        for proc in self.procs:
            if proc.kind == kind and proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)

    @staticmethod
    def dump_stacks(proc):
        """Abort a (stuck) daemon so that it writes the stack of every thread to its log;
        returns the dump."""
        if proc.poll() is not None:
            return f"(process {proc.pid} had already exited with {proc.returncode})"
        proc.send_signal(signal.SIGABRT)
        proc.wait(30)
        proc.log.flush()
        with open(proc.log.name) as f:
            text = f.read()
        start = text.rfind("Fatal Python error")
        return text[start:] if start >= 0 else text[-4000:]

    def cloud(self, name="cloud"):
        """A simulated cloud's state file (``<name>.sqlite``), read directly (no injected API
        errors)."""
        return SimulatedCloud(self.dir / f"{name}.sqlite")

    def log_count(self, text):
        """How many lines of all daemon logs contain ``text``."""
        count = 0
        for proc in self.procs:
            proc.log.flush()
            with open(proc.log.name) as f:
                count += sum(1 for line in f if text in line)
        return count

    def crashes(self):
        """Log lines where a daemon loop caught an exception of our own code (the message is
        followed by a traceback; expected store outages are logged without one)."""
        found = []
        for proc in self.procs:
            proc.log.flush()
            with open(proc.log.name) as f:
                lines = f.read().splitlines()
            for line, after in zip(lines, lines[1:]):
                if any(c in line for c in CRASHES) and after.startswith("Traceback"):
                    found.append(f"{os.path.basename(proc.log.name)}: {line.strip()}")
        return found


def zookeeper_store_yaml(server, chroot, timeout):
    host, port = server.hosts.rsplit(":", 1)
    return (f"zookeeper-servers:\n  - host: {host}\n    port: {port}\n    chroot: {chroot}\n"
            f"zookeeper-timeout: {timeout}\n")


def make_env(request, tmp_path, kind, zk_timeout=2.0):
    """A ``FaultEnv`` on ``kind`` ("sqlite" or "zookeeper", a fresh chroot of the test server)."""
    store_yaml = None
    if kind == "zookeeper":
        server = request.getfixturevalue("zookeeper_server")
        store_yaml = zookeeper_store_yaml(server, request.getfixturevalue("zk_chroot"),
                                          zk_timeout)
    return FaultEnv(tmp_path, store_yaml)


class RequestStream:
    """Zuul-like clients on one store: request, accept, use, return; record what goes wrong."""

    def __init__(self, store, rng, nodesets, clients=3, use_time=(0.0, 0.2),
                 wait_timeout=90, pause=(0.0, 0.1), on_stall=None, stall_after=20):
        self.store = store
        self.nodesets = nodesets
        self.clients = clients
        self.use_time = use_time
        self.pause = pause
        self.wait_timeout = wait_timeout
        self.on_stall = on_stall          # called once with a request id waiting stall_after s
        self.stall_after = stall_after
        self.seeds = [rng.randrange(2**31) for _ in range(clients)]
        self.lock = threading.Lock()
        self.submitted = 0
        self.fulfilled = 0
        self.failed = {}              # request id -> reasons (a failed request must say why)
        self.lost = 0                 # requests that vanished with the client's own session
        self.store_errors = 0         # store calls that failed (the store was unreachable)
        self.accepted = {}            # node id -> request id it was used for
        self.nodes_served = 0
        self.fulfilled_at = []        # time.monotonic() of each request taken
        self.problems = []            # broken promises, as sentences
        self._stop = threading.Event()
        self._threads = []

    def start(self):
        for index in range(self.clients):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True,
                                      name=f"zuul-{index}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout=120):
        """Let each client finish the request in hand, then stop."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                self.problem(f"client {thread.name} did not finish its request in {timeout}s")

    def problem(self, text):
        with self.lock:
            self.problems.append(text)

    def _run(self, index):
        rng = random.Random(self.seeds[index])
        client = NodepoolClient(self.store, requestor=f"zuul-{index}")
        while not self._stop.is_set():
            labels = list(rng.choice(self.nodesets))
            try:
                self._one(client, labels, rng)
            except StoreError as exc:
                self._store_error(client.requestor, exc)
            time.sleep(rng.uniform(*self.pause))

    def _store_error(self, who, exc):
        with self.lock:
            self.store_errors += 1
            count = self.store_errors
        if count % 20 == 1:
            print(f"[faults] {who}: store error #{count}: {exc}")
        time.sleep(0.2)

    def _one(self, client, labels, rng):
        req = client.submit(labels)
        with self.lock:
            self.submitted += 1
        deadline = time.monotonic() + self.wait_timeout
        stall_at = time.monotonic() + self.stall_after if self.on_stall else deadline
        while True:
            # like Zuul, keep waiting for the request through store outages
            try:
                until = min(deadline, stall_at) if stall_at < deadline else deadline
                done = client.wait(req.id, timeout=max(0.1, until - time.monotonic()))
                break
            except TimeoutError:
                if time.monotonic() < deadline:
                    stall_at = deadline              # once per request
                    self.on_stall(req.id)
                    continue
                now = self.store.get_request(req.id)
                self.problem(f"request {req.id} for {labels} not answered in "
                             f"{self.wait_timeout}s (state {now.state if now else 'gone'}, "
                             f"declined by {now.declined_by if now else '-'})")
                client.cancel(req.id)
                return
            except NotFoundError:
                # an ephemeral request goes with its requestor's session (ZooKeeper was away
                # longer than the session timeout): Zuul resubmits
                with self.lock:
                    self.lost += 1
                return
            except StoreError as exc:
                if time.monotonic() > deadline:
                    raise
                self._store_error(client.requestor, exc)
        if done.state == RequestState.FAILED:
            reasons = done.extra.get("declined_reasons") or {}
            with self.lock:
                self.failed[done.id] = reasons
            if not reasons or not all(reasons.values()):
                self.problem(f"request {done.id} for {labels} failed without a reason "
                             f"(declined by {done.declined_by})")
            client.cancel(done.id)
            return
        try:
            nodes = client.accept(done)
        except (LockError, NotFoundError) as exc:
            self.problem(f"request {done.id} for {labels} was fulfilled with {done.nodes} but "
                         f"its nodes could not be taken: {exc}")
            return
        try:
            self._check_nodes(done, labels, nodes)
            client.use(nodes)
            # only now were the nodes used: one whose in-use mark failed (store outage) was
            # never used and may rightly go back to the pool
            self._mark_used(done, nodes)
            time.sleep(rng.uniform(*self.use_time))
        finally:
            client.release(nodes)

    def _mark_used(self, req, nodes):
        with self.lock:
            for node in nodes:
                self.accepted[node.id] = req.id

    def _check_nodes(self, req, labels, nodes):
        with self.lock:
            self.fulfilled += 1
            self.nodes_served += len(nodes)
            self.fulfilled_at.append(time.monotonic())
            for node in nodes:
                other = self.accepted.get(node.id)
                if other is not None:
                    self.problems.append(f"node {node.id} accepted for request {req.id} was "
                                         f"already used for request {other}")
                if node.state != NodeState.READY:
                    self.problems.append(f"node {node.id} was {node.state} (not ready) when "
                                         f"request {req.id} took it")
            got = sorted(label for node in nodes for label in node.type)
            if got != sorted(labels):
                self.problems.append(f"request {req.id} for {labels} got nodes of {got}")


class AllocationWatch:
    """Samples the requests: no node may be listed by two fulfilled requests at once."""

    def __init__(self, store, interval=0.05):
        self.store = store
        self.interval = interval
        self.samples = 0
        self.problems = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="allocation-watch")

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(30)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                requests = self.store.list_requests()
            except StoreError:
                continue
            self.samples += 1
            owner = {}
            for req in requests:
                if req.state != RequestState.FULFILLED:
                    continue
                for node_id in req.nodes:
                    if owner.get(node_id, req.id) != req.id and len(self.problems) < 20:
                        self.problems.append(f"node {node_id} is listed by fulfilled requests "
                                             f"{owner[node_id]} and {req.id} at once")
                    owner[node_id] = req.id


def describe_requests(store):
    """Requests, their locks and the registered pools, one per line (for failure messages)."""
    try:
        locked = store.locked_request_ids()
        lines = [f"request {r.id} {r.state} {','.join(r.node_types)} nodes={r.nodes} "
                 f"declined_by={r.declined_by} locked={r.id in locked}"
                 for r in store.list_requests()]
        lines += [f"component {c.kind} {c.hostname} {getattr(c, 'id', '')} "
                  f"{c.to_dict().get('state')}" for c in store.list_components()]
        nodes = [n for n in store.list_nodes() if n.state != NodeState.DELETED]
        lines += [f"node {n.id} {n.state} {n.allocated_to}" for n in nodes]
        return "\n".join(lines)
    except StoreError as exc:
        return f"(store error: {exc})"


def snapshot(store):
    """Nodes (after a sync, so a cached store shows everything) and requests."""
    store.sync_nodes()
    return store.list_nodes(), store.list_requests()


def whats_wrong(store, cloud, expect_ready=None):
    """Everything that keeps the system from being quiet and consistent, as sentences."""
    nodes, requests = snapshot(store)
    wrong = []
    live = [n for n in nodes if n.state != NodeState.DELETED]
    for node in live:
        if node.state != NodeState.READY:
            wrong.append(f"node {node.id} ({','.join(node.type)}) is {node.state}")
        elif node.allocated_to:
            wrong.append(f"ready node {node.id} is still allocated to {node.allocated_to}")
    for req in requests:
        wrong.append(f"request {req.id} ({req.requestor}, {','.join(req.node_types)}) is left "
                     f"in state {req.state}")
    instances = {inst.id: inst for inst in cloud.list_instances()}
    records = {n.external_id: n for n in live if n.external_id}
    for extid in sorted(set(instances) - set(records)):
        meta = instances[extid].metadata
        wrong.append(f"instance {extid} (node id tag {meta.get('nodepool_node_id')}) has no "
                     f"node record")
    for extid in sorted(set(records) - set(instances)):
        wrong.append(f"node {records[extid].id} records instance {extid}, which is gone")
    for extid, inst in instances.items():
        if extid in records and inst.status != "ACTIVE":
            wrong.append(f"instance {extid} of ready node {records[extid].id} is {inst.status}")
    if expect_ready is not None:
        for label, count in expect_ready.items():
            have = sum(1 for n in live if n.state == NodeState.READY and label in n.type)
            if have < count:
                wrong.append(f"label {label}: {have} ready node(s), min-ready {count}")
    return wrong


# How long the system gets to become quiet after the faults: an unlocked ``init`` node (its
# launcher lost its session while creating it) is deleted as abandoned only after 60 s
# (INIT_GRACE in nodepool/launcher/launcher.py)
SETTLE = 75


def settle(store, cloud, timeout, expect_ready=None):
    """Wait until ``whats_wrong`` is empty; returns what was still wrong at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wrong = whats_wrong(store, cloud, expect_ready)
        except StoreError as exc:
            wrong = [f"store error: {exc}"]
        if not wrong or time.monotonic() > deadline:
            return wrong
        time.sleep(0.25)


def retrying(func, timeout=30):
    """``func()``, retried while the store is unreachable (ZooKeeper restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return func()
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_until(cond, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except StoreError:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
