"""Requesting nodes the way Zuul does it.

Protocol (reference ``nodepool-11-detail.md`` §4.6): submit a request with labels; wait until it
is ``fulfilled`` (or ``failed``); lock every node and check it is still allocated to the request;
delete the request; mark the nodes ``in-use`` while using them; finally mark them ``used`` (or
``hold``) and unlock them, after which the launcher deletes them.  A client that dies takes its
ephemeral requests and its node locks with it: the launcher returns unlocked ready nodes to the
pool and deletes unlocked in-use nodes.

    with NodepoolClient(store) as client:
        with client.nodes(["ubuntu-jammy"], timeout=600) as nodes:
            run_job(nodes[0].interface_ip)
"""
import contextlib
import time

from ..errors import LockError, NodepoolError, NotFoundError
from ..model.records import NodeRequest
from ..model.states import NodeState, RequestState


class RequestFailed(NodepoolError):
    """Every pool that could serve the request declined it."""


class NodepoolClient:
    def __init__(self, store, requestor="nodepool-client"):
        self.store = store
        self.requestor = requestor

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, labels, priority="100", relative_priority=0, tenant_name=None,
               provider=None, reuse=True, ephemeral=True, requestor_data=None, event_id=None):
        """Create a node request for ``labels`` (a list; duplicates allowed)."""
        if not labels:
            raise ValueError("a node request needs at least one label")
        req = NodeRequest(node_types=list(labels), requestor=self.requestor,
                          requestor_data=requestor_data, provider=provider,
                          relative_priority=relative_priority, tenant_name=tenant_name,
                          reuse=reuse, event_id=event_id, created_time=time.time())
        return self.store.submit_request(req, priority=priority, ephemeral=ephemeral)

    def wait(self, request_id, timeout=None, on_poll=None):
        """Wait until the request is fulfilled or failed and return it.

        ``on_poll(request)`` is called with each unfinished copy read (about once a second, e.g.
        to show progress).  Raises ``TimeoutError`` when ``timeout`` passes first and
        ``NotFoundError`` when the request vanished."""
        watcher = self.store.watch_request(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            req = self.store.read_request(request_id, watcher)
            if req is None:
                raise NotFoundError(f"request {request_id} does not exist (any more)")
            if req.state in (RequestState.FULFILLED, RequestState.FAILED):
                return req
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"request {request_id} not fulfilled within {timeout}s "
                                   f"(state {req.state})")
            if on_poll is not None:
                on_poll(req)
            watcher.wait(1.0 if left is None else min(left, 1.0))

    def accept(self, request, lock_timeout=30):
        """Lock the nodes of a fulfilled request and delete the request.

        Returns the nodes (in ``node_types`` order), each with a ``lock`` attribute.  On any
        problem every lock taken is released and the request is deleted, so the launcher can
        reuse the nodes; a ``RequestFailed`` is raised for a failed request."""
        try:
            if request.state == RequestState.FAILED:
                reasons = request.extra.get("declined_reasons") or {}
                detail = "; ".join(sorted(set(reasons.values()))) or "declined by every pool"
                raise RequestFailed(f"request {request.id} for {','.join(request.node_types)} "
                                    f"failed: {detail}")
            nodes = []
            try:
                for node_id in request.nodes:
                    lock = self.store.lock_node(node_id, blocking=True, timeout=lock_timeout,
                                                identifier=self.requestor)
                    node = self.store.get_node(node_id)
                    if node is None or node.allocated_to != request.id:
                        lock.release()
                        raise NotFoundError(f"node {node_id} is no longer allocated to "
                                            f"request {request.id}")
                    node.lock = lock
                    nodes.append(node)
            except (LockError, NotFoundError):
                for node in nodes:
                    node.lock.release()
                raise
            return nodes
        finally:
            self.store.delete_request(request.id)

    def request(self, labels, timeout=None, **kwargs):
        """Submit, wait and accept: the locked nodes, ready to use."""
        req = self.submit(labels, **kwargs)
        try:
            req = self.wait(req.id, timeout)
        except TimeoutError:
            self.store.delete_request(req.id)
            raise
        return self.accept(req)

    def cancel(self, request_id):
        self.store.delete_request(request_id)

    # -- using nodes -------------------------------------------------------------------------------

    def use(self, nodes, user_data=None):
        """Mark locked nodes ``in-use``."""
        for node in nodes:
            node.set_state(NodeState.IN_USE)
            if user_data is not None:
                node.user_data = user_data
            self.store.update_node(node)

    def release(self, nodes, hold=False, comment=None, hold_expiration=None):
        """Return nodes: ``used`` (the launcher deletes them) or ``hold`` for debugging."""
        for node in nodes:
            try:
                if hold:
                    node.set_state(NodeState.HOLD)
                    node.comment = comment
                    node.hold_expiration = hold_expiration
                else:
                    node.set_state(NodeState.USED)
                self.store.update_node(node)
            except NotFoundError:
                pass
            finally:
                lock = getattr(node, "lock", None)
                if lock is not None:
                    lock.release()

    @contextlib.contextmanager
    def nodes(self, labels, timeout=None, user_data=None, **kwargs):
        """Context manager: nodes in use inside the block, returned as used afterwards."""
        nodes = self.request(labels, timeout=timeout, **kwargs)
        try:
            self.use(nodes, user_data)
            yield nodes
        finally:
            self.release(nodes)
