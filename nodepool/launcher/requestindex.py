"""The launcher's copy of the store's requests, with the groupings a pass asks for.

Every pass used to take the whole request listing (sorted by priority) and walk it several
times: to route the waiting ones, to count min-ready stock asked for, to find min-ready requests
to finish, to look up held ones.  While a large fleet fills, thousands of min-ready requests are
outstanding, and those walks were half of the launcher's CPU.  ``RequestIndex`` follows the
store's change feed (``StateStore.request_changes``) and keeps the groupings up to date, so a
pass costs what changed.  The records are the store cache's own objects (never changed in place).
Iterating the index gives every request in no particular order (for the periodic full looks:
cleanup, gauges, image rollout).
"""
from collections import Counter

from ..model.records import NodeRequest
from ..model.states import RequestState
from ..store.cached import ChangeLog
from .feedindex import FeedIndex
from .minready import ASKED_STATES, is_min_ready, min_ready_label


class RequestIndex(FeedIndex):
    def __init__(self):
        super().__init__()             # by_id: request id -> record
        self.waiting = set()           # ids of requests in state ``requested``
        self.min_ready_asked = Counter()    # label -> min-ready requests in ASKED_STATES
        self.min_ready_done = set()    # ids of min-ready requests fulfilled or failed
        self.min_ready_failed = set()  # ids of failed min-ready requests
        self.changes = ChangeLog()     # for readers of this index (held-request planning)

    def _changes(self, store, position):
        return store.request_changes(position)

    def _listing(self, store):
        return store.list_requests(shared=True)

    def __iter__(self):
        return iter(self.by_id.values())

    def __len__(self):
        return len(self.by_id)

    def waiting_requests(self):
        """The requests in state ``requested``, in the order they are served (priority, then
        age)."""
        by_id = self.by_id
        return sorted((by_id[i] for i in self.waiting), key=NodeRequest.sort_key)

    def min_ready_finished(self):
        """The min-ready requests that are fulfilled or failed (``minready.min_ready_to_finish``
        decides which of them are done)."""
        return [self.by_id[i] for i in self.min_ready_done]

    def failed_min_ready(self):
        return [self.by_id[i] for i in self.min_ready_failed]

    def changed_since(self, position):
        """``(position, ids changed since position)``, or ids None when it cannot tell."""
        return self.changes.since(position)

    def _put(self, request_id, record):
        old = self.by_id.get(request_id)
        if old is record:
            return
        if old is not None:
            self._count(old, -1)
        if record is None:
            self.by_id.pop(request_id, None)
        else:
            self.by_id[request_id] = record
            self._count(record, 1)
        self.changes.note(request_id)

    def _count(self, record, sign):
        rid = record.id
        state = record.state
        if state == RequestState.REQUESTED:
            (self.waiting.add if sign > 0 else self.waiting.discard)(rid)
        if not is_min_ready(record):
            return
        if state in (RequestState.FULFILLED, RequestState.FAILED):
            (self.min_ready_done.add if sign > 0 else self.min_ready_done.discard)(rid)
        if state == RequestState.FAILED:
            (self.min_ready_failed.add if sign > 0 else self.min_ready_failed.discard)(rid)
        label = min_ready_label(record)
        if label is not None and state in ASKED_STATES:
            self.min_ready_asked[label] += sign
            if self.min_ready_asked[label] <= 0:
                del self.min_ready_asked[label]
