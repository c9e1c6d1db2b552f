"""No request and no provider can hang: the accepted-request lifecycle under faults.

Each test reproduces one way a request used to be left waiting forever or a launcher made to
spin (issue 10 of the tracker), with a real store (embedded SQLite, and ZooKeeper where
sessions or races are involved) and the simulated cloud.  Faults are injected by wrapping the
launcher's store (``FaultyStore``) or patching one provider's adapter in this process.
"""
import threading
import time

import pytest

from fixtures.launcher import wait_until
from integration.test_launcher import basic, cloud_instances, ready_unallocated
from nodepool import metrics
from nodepool.errors import PermanentCloudError, StoreError, TransientCloudError
from nodepool.model import NodeState, RequestState


class FaultyStore:
    """Passes every call to a real store, except an armed one which raises ``StoreError``
    once; can also hide nodes from one ``list_nodes`` or ``node_changes`` answer (a cache that
    lags: the change is delivered on a later call)."""

    def __init__(self, store):
        self._store = store
        self._armed = {}
        self._hide = set()
        self._late = {}           # thread -> ids hidden from it, to be delivered late
        self._mutex = threading.Lock()
        self.fired = []

    def arm(self, method, nth=1):
        with self._mutex:
            self._armed[method] = nth

    def hide_once(self, node_id, thread_ident):
        """Leave ``node_id`` out of the next listing or change-feed answer to that thread."""
        with self._mutex:
            self._hide.add((node_id, thread_ident))

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args, **kw):
            with self._mutex:
                left = self._armed.get(name)
                if left is not None:
                    if left <= 1:
                        del self._armed[name]
                        self.fired.append(name)
                        raise StoreError(f"injected fault in {name}")
                    self._armed[name] = left - 1
            result = attr(*args, **kw)
            if name == "list_nodes" and (self._hide or self._late):
                hidden = self._hidden_now()
                result = [n for n in result if n.id not in hidden]
            elif name == "node_changes" and result[1] is not None and (self._hide or self._late):
                # a lagging cache: the change arrives, only later (on a call that hides none)
                position, changes = result
                hidden = self._hidden_now()
                me = threading.get_ident()
                with self._mutex:
                    late = set() if hidden else self._late.pop(me, set())
                changes = {i: r for i, r in changes.items() if i not in hidden}
                for node_id in late - set(changes):
                    changes[node_id] = self._store.get_node(node_id)
                result = position, changes
            return result
        return call

    def _hidden_now(self):
        """The ids hidden from this thread's answer now (they are delivered late)."""
        me = threading.get_ident()
        with self._mutex:
            hidden = {nid for nid, ident in self._hide if ident == me}
            self._hide = {(nid, ident) for nid, ident in self._hide if ident != me}
            if hidden:
                self._late.setdefault(me, set()).update(hidden)
        return hidden


def faulty_launcher(env, **kw):
    store = FaultyStore(env.store())
    return env.start_launcher(store=store, **kw), store


def ended(client, request_id, timeout=30):
    req = client.wait(request_id, timeout=timeout)
    assert req.state in (RequestState.FULFILLED, RequestState.FAILED), req
    if req.state == RequestState.FAILED:
        assert req.extra.get("declined_reasons"), "a failed request says why"
    return req


# -- 2 and the done-criterion: a store error at any call of the accept/launch/fulfil/delete paths

# (``get_node`` and ``get_request`` are not among them: these paths write the pass's records
# compare-and-set and read one only when that write loses, which this scenario never causes)
# (nor ``lock_request``, ``update_request`` and ``delete_request``: an accept tries the
# request's and its nodes' locks with ``try_locks``; accepts, fulfilments and finished min-ready
# requests write (and delete) with ``update_together``)
FAULT_SITES = ["try_locks", "update_together", "lock_node", "update_node",
               "create_node", "delete_node", "lock", "sync_nodes", "node_changes",
               "submit_request"]


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("site", FAULT_SITES)
def test_a_store_error_at_any_call_ends_every_request(sqlite_launcher_env, site, nth):
    env = sqlite_launcher_env
    basic(env, min_ready=2)          # stock taken and replenished: every site is called twice
    launcher, store = faulty_launcher(env)
    client = env.client()
    wait_until(lambda: ready_unallocated(client.store), message="min-ready stock")
    store.arm(site, nth)
    from_stock = client.submit(["small"])
    launched = client.submit(["small", "big"])
    served = []
    for req in (from_stock, launched):
        done = ended(client, req.id)
        if done.state == RequestState.FULFILLED:
            served += client.accept(done)
    client.release(served)
    # the provider keeps serving (from stock and launching), and every returned node is deleted
    more = client.request(["small", "big"], timeout=30)
    client.release(more)
    wait_until(lambda: not [n for n in client.store.list_nodes()
                            if n.state in (NodeState.USED, NodeState.DELETING,
                                           NodeState.BUILDING, NodeState.INIT)],
               message="returned nodes deleted")
    assert site in store.fired, f"the fault in {site} never fired"
    wait_until(lambda: not [r for r in launcher.active if not r.startswith("900-")],
               message="no client request left held")


# -- 1: one failed launch (whose record went meanwhile) must not wedge its provider -------------

def test_failed_launch_of_a_deleted_node_does_not_wedge_the_provider(sqlite_launcher_env):
    env = sqlite_launcher_env
    basic(env, boot_time=1.0, boot_failure_rate=1.0, retries=1)
    env.start_launcher()
    client = env.client()
    req = client.submit(["small"])
    node = wait_until(lambda: next((n for n in client.store.list_nodes()
                                    if n.state == NodeState.BUILDING and n.external_id), None),
                      message="a node booting")
    client.store.delete_node(node.id)      # an operator's `nodepool delete --now`
    done = ended(client, req.id)
    assert done.state == RequestState.FAILED
    # the worker still deletes: the boot-failed instances go, nothing is left behind
    wait_until(lambda: not cloud_instances(env), message="instances removed")
    wait_until(lambda: not client.store.list_nodes(), message="node records removed")


# -- 4: min-ready for a label no pool can launch does not spin -------------------------------------

def test_min_ready_of_a_drained_pool_is_not_requested(launcher_env):
    basic(launcher_env, min_ready=2, max_servers=0)
    launcher = launcher_env.start_launcher()
    store = launcher_env.store()
    seen = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        seen |= {r.id for r in store.list_requests()}
        time.sleep(0.01)
    assert launcher.ready and not seen


# -- 5: refusals back off ------------------------------------------------------------------------

def _quota_errors():
    return metrics.LAUNCHES.labels("sim", "main", "small", "error.quota")._value.get()


def test_capacity_refusal_backs_off_instead_of_hammering_the_cloud(sqlite_launcher_env):
    env = sqlite_launcher_env
    env.write(QUOTA_IGNORED)
    env.start_launcher()
    client = env.client()
    held = client.request(["small"], timeout=30)
    before = _quota_errors()
    waiting = client.submit(["small"])
    time.sleep(3.0)
    refusals = _quota_errors() - before
    # 2 s, then 4 s between tries: at most two refusals in 3 s (it was one per pass)
    assert 1 <= refusals <= 2
    assert client.store.get_request(waiting.id).state == RequestState.PENDING
    client.release(held)
    done = ended(client, waiting.id, timeout=30)
    assert done.state == RequestState.FULFILLED
    client.release(client.accept(done))


def _one_node_held_one_waiting(env):
    """A cloud with room for one instance: a client holds its node, a second request waits
    for quota.  Returns (launcher, client, held nodes, waiting request)."""
    env.write(QUOTA_IGNORED)
    launcher = env.start_launcher()
    client = env.client()
    held = client.request(["small"], timeout=30)
    return launcher, client, held, client.submit(["small"])


def test_room_freed_by_deleting_a_used_node_is_used_at_once(sqlite_launcher_env):
    """A label waiting after quota refusals is launched again as soon as the cloud deleted a
    node of its provider that was in use, not when its timed wait runs out."""
    launcher, client, held, waiting = _one_node_held_one_waiting(sqlite_launcher_env)
    backoff, key = launcher.requests.pool_backoff, ("sim/main", "small")
    wait_until(lambda: backoff.failures(key) >= 3, timeout=60, message="three refusals")
    timer_ends = backoff.until(key)          # 8 s after the third refusal
    client.release(held)                     # used: deleted, which frees the one instance
    done = ended(client, waiting.id, timeout=60)
    assert done.state == RequestState.FULFILLED
    assert time.monotonic() < timer_ends, "the launch waited for its timer, not for the room"
    assert backoff.failures(key) == 0        # the launch that went through reset it
    client.release(client.accept(done))


QUOTA_IGNORED = """\
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    boot-time: 0.05
    quota: {instances: 1}
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: 10
        ignore-provider-quota: true
        labels:
          - name: small
            cloud-image: img
"""


def test_failing_delete_backs_off_and_keeps_its_lock(sqlite_launcher_env):
    env = sqlite_launcher_env
    basic(env)
    launcher = env.start_launcher()
    client = env.client()
    (node,) = client.request(["small"], timeout=30)
    adapter = launcher.workers["sim"].adapter
    calls = []
    real = adapter.delete_state_machine

    def failing(external_id):
        calls.append(time.monotonic())
        raise TransientCloudError("503 from the test")
    adapter.delete_state_machine = failing
    client.release([node])
    wait_until(lambda: calls, message="a delete attempt")
    time.sleep(2.5)
    # 1 s, then 2 s: three tries in 2.5 s at most (it was one per cleanup pass, 0.2 s here)
    assert len(calls) <= 3
    assert client.store.is_node_locked(node.id)        # nobody else starts a second delete
    adapter.delete_state_machine = real
    wait_until(lambda: client.store.get_node(node.id) is None, timeout=30,
               message="the node deleted once the cloud answers")


# -- 6: a failed node does not release its siblings while they launch ---------------------------

def test_failed_sibling_leaves_the_other_launch_alone(sqlite_launcher_env):
    env = sqlite_launcher_env
    basic(env, boot_time=1.0, retries=1)
    launcher = env.start_launcher()
    adapter = launcher.workers["sim"].adapter
    real = adapter.create_state_machine

    def create(spec):
        if spec.label.name == "big":
            raise PermanentCloudError("flavor refused by the test")
        return real(spec)
    adapter.create_state_machine = create
    client = env.client()
    req = client.submit(["small", "big"])
    done = ended(client, req.id)
    assert done.state == RequestState.FAILED
    assert "flavor refused" in " ".join(done.extra["declined_reasons"].values())
    smalls = [n for n in client.store.list_nodes() if n.type == ["small"]]
    assert len(smalls) == 1
    # the sibling finishes its launch and becomes stock instead of being deleted mid-launch
    stock = wait_until(lambda: ready_unallocated(client.store), message="the sibling ready")
    assert [n.id for n in stock] == [smalls[0].id]


# -- 7: no cloud call on the launcher's loop -----------------------------------------------------

def test_availability_zones_are_never_asked_on_the_loop_thread(sqlite_launcher_env):
    env = sqlite_launcher_env
    basic(env)
    launcher = env.start_launcher()
    adapter = launcher.workers["sim"].adapter
    callers = []
    real = adapter.availability_zones

    def zones():
        callers.append(threading.get_ident())
        return real()
    adapter.availability_zones = zones
    launcher.workers["sim"].invalidate_quota()     # the worker refreshes its cloud facts
    launcher.workers["sim"].quota_time = 0.0
    client = env.client()
    client.release(client.request(["small", "big"], timeout=30))
    wait_until(lambda: callers, message="the worker to refresh the zones")
    assert launcher.thread.ident not in callers


# -- 8: a provider removed while a request waits for its quota -----------------------------------

def test_provider_removed_while_a_request_waits_gives_the_request_back(sqlite_launcher_env):
    env = sqlite_launcher_env
    launcher, client, held, waiting = _one_node_held_one_waiting(env)
    wait_until(lambda: waiting.id in launcher.active and launcher.paused_pools,
               message="the request waiting for quota")
    env.write(QUOTA_IGNORED.replace("name: sim\n", "name: sim2\n")
              .replace("instances: 1", "instances: 5"))
    done = ended(client, waiting.id, timeout=30)
    assert done.state == RequestState.FULFILLED
    (node,) = client.accept(done)
    assert node.provider == "sim2"
    assert any("removed from the configuration" in r
               for r in done.extra["declined_reasons"].values())
    client.release([node] + held)


# -- 9: a node missing from a lagging snapshot is looked up, not taken for gone ------------------

def test_node_missing_from_the_snapshot_is_verified_before_failing(launcher_env):
    basic(launcher_env, boot_time=0.5)
    launcher, store = faulty_launcher(launcher_env)
    client = launcher_env.client()
    req = client.submit(["small"])
    node = wait_until(lambda: next((n for n in client.store.list_nodes()
                                    if n.allocated_to == req.id), None), message="a launch")
    for _ in range(5):
        store.hide_once(node.id, launcher.thread.ident)
        time.sleep(0.05)
    done = ended(client, req.id)
    assert done.state == RequestState.FULFILLED and done.nodes == [node.id]
    client.release(client.accept(done))


# -- 10: a launcher whose request changed hands does not write over it ---------------------------

def test_request_taken_over_meanwhile_is_not_overwritten(launcher_env):
    basic(launcher_env, boot_time=1.5)
    # no lost-request cleanup in this test: the request must stay as the other launcher left it
    launcher = launcher_env.start_launcher(cleanup_interval=1e9)
    client = launcher_env.client()
    req = client.submit(["small"])
    wait_until(lambda: req.id in launcher.active
               and client.store.get_request(req.id).state == RequestState.PENDING,
               message="the request accepted")
    # what another launcher does after our session expired: the request is its now
    other = client.store.get_request(req.id)
    other.extra["taken-over-by"] = "another launcher"
    client.store.update_request(other)
    node = wait_until(lambda: next((n for n in client.store.list_nodes()
                                    if n.state == NodeState.READY), None),
                      timeout=30, message="our launch to finish")
    wait_until(lambda: req.id not in launcher.active, message="the launcher to let it go")
    after = client.store.get_request(req.id)
    assert after.state == RequestState.PENDING and after.nodes == []
    assert after.extra["taken-over-by"] == "another launcher"
    # our node went back to the pool instead of to a request that is not ours any more
    wait_until(lambda: client.store.get_node(node.id).allocated_to is None,
               message="the node returned to the pool")
    client.store.delete_request(req.id)


# -- a provider whose adapter cannot even be made declines instead of leaving requests waiting --

def test_provider_without_its_sdk_declines_its_requests(sqlite_launcher_env, monkeypatch):
    from nodepool.drivers.simulated import SimulatedDriver

    def no_sdk(self, provider, rate_limiter=None):
        raise RuntimeError("the cloud SDK is not installed (from the test)")
    monkeypatch.setattr(SimulatedDriver, "adapter", no_sdk)
    basic(sqlite_launcher_env)
    sqlite_launcher_env.start_launcher()
    client = sqlite_launcher_env.client()
    done = ended(client, client.submit(["small"]).id)
    assert done.state == RequestState.FAILED
    assert "SDK is not installed" in " ".join(done.extra["declined_reasons"].values())


# -- a session-lost notice handled after the store reconnected -----------------------------------

def test_session_lost_notice_spares_work_begun_in_the_new_session(launcher_env):
    """The store reconnects (a new session) before the launcher's loop hears that the old one
    was lost; meanwhile it may accept a request or start a delete under the new session.
    Handling the notice must let go only of what held locks of the lost session: dropping the
    rest left a node stuck ``deleting`` or a request stuck ``pending``, locked by our live
    session for good (seen in the ZooKeeper restart and freeze fault tests)."""
    basic(launcher_env, boot_time=1.5, delete_time=1.5)
    launcher = launcher_env.start_launcher()
    client = launcher_env.client()
    req = client.submit(["small"])
    wait_until(lambda: req.id in launcher.active
               and client.store.get_request(req.id).state == RequestState.PENDING,
               message="the request accepted and launching")
    launcher._on_session("lost")          # the notice, late: every lock is the current session's
    done = ended(client, req.id)
    assert done.state == RequestState.FULFILLED
    nodes = client.accept(done)
    node_id = nodes[0].id
    client.release(nodes)                 # used: the launcher deletes it (taking 1.5 s)
    wait_until(lambda: launcher.providers.workers["sim"].deleting(node_id),
               message="the delete started")
    launcher._on_session("lost")
    wait_until(lambda: client.store.get_node(node_id) is None, timeout=30,
               message="the used node deleted")
    wait_until(lambda: not cloud_instances(launcher_env), message="its instance gone")
