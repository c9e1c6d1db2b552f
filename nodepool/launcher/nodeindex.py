"""The launcher's copy of the store's node records, with the groupings a pass asks for.

A pass used to walk every node record several times (failed launches, returned nodes, cloud
usage not ours, the usage tallies): with ten thousand nodes that walking was most of an idle
launcher's CPU and of a ready node's latency.  ``NodeIndex`` follows the store's change feed
(``StateStore.node_changes``) instead, so a pass costs what changed since the last one.  The
records are the store cache's own objects (never changed in place: a change replaces them),
and the index is only a cache: when the store cannot tell what changed, it is read again whole.
"""
from collections import Counter, defaultdict

from ..model.states import NodeState
from ..store.cached import ChangeLog
from .feedindex import FeedIndex


class NodeIndex(FeedIndex):
    def __init__(self):
        super().__init__()             # by_id: node id -> record
        self.used = set()              # ids of nodes returned as used
        self.failed = set()            # ids of nodes whose launch failed (failure_reason)
        self.free_ready = set()        # ids of ready nodes allocated to nobody
        self._busy = set()             # ids of every other node
        self._external = defaultdict(Counter)   # provider -> external ids of its records
        self.external_version = Counter()       # provider -> bumped when those ids change
        self.changes = ChangeLog()     # for readers of this index (the fleet tallies)

    def _changes(self, store, position):
        return store.node_changes(position)

    def _listing(self, store):
        return store.list_nodes(shared=True)

    def nodes(self):
        """Every record, ordered by id (for the periodic full passes: cleanup, gauges)."""
        return sorted(self.by_id.values(), key=_node_id)

    def cleanup_candidates(self, aged_labels=()):
        """The records a cleanup pass must look at, ordered by id: every node but the ready,
        unallocated ones, which cleanup leaves alone unless their label has a max-ready-age
        (``aged_labels``: those labels' free ready nodes are included).  With a large idle
        fleet this is the few nodes in flux, not the whole fleet."""
        ids = list(self._busy)
        if aged_labels:
            by_id = self.by_id
            ids.extend(i for i in self.free_ready
                       if by_id[i].type and by_id[i].type[0] in aged_labels)
        ids.sort()
        return [self.by_id[i] for i in ids]

    def external_ids(self, provider):
        """External ids (instance ids) the records of ``provider`` carry."""
        return self._external[provider]

    def changed_since(self, position):
        """``(position, {id: record or None})`` since an earlier position of this index, or a
        None mapping when it cannot tell (first call, too far behind): use ``by_id``."""
        position, ids = self.changes.since(position)
        if ids is None:
            return position, None
        return position, {i: self.by_id.get(i) for i in ids}

    def _put(self, node_id, record):
        old = self.by_id.get(node_id)
        if old is record:
            return
        self.used.discard(node_id)
        self.failed.discard(node_id)
        self.free_ready.discard(node_id)
        self._busy.discard(node_id)
        if record is None:
            self.by_id.pop(node_id, None)
        else:
            self.by_id[node_id] = record
            if record.state == NodeState.READY and not record.allocated_to:
                self.free_ready.add(node_id)
            else:
                self._busy.add(node_id)
            if record.state == NodeState.USED:
                self.used.add(node_id)
            if (record.extra or {}).get("failure_reason"):
                self.failed.add(node_id)
        was, now = _external(old), _external(record)
        if was != now:
            if was is not None:
                ids = self._external[was[0]]
                ids[was[1]] -= 1
                if ids[was[1]] <= 0:
                    del ids[was[1]]
                self.external_version[was[0]] += 1
            if now is not None:
                self._external[now[0]][now[1]] += 1
                self.external_version[now[0]] += 1
        self.changes.note(node_id)


def _external(node):
    return (node.provider, node.external_id) if node is not None and node.external_id else None


def _node_id(node):
    return node.id
