"""``RequestIndex`` keeps, change by change, what a pass used to work out from every request:
checked against the pure functions over the whole listing, for any sequence of changes."""
from hypothesis import given, settings, strategies as st

from nodepool.launcher import minready
from nodepool.launcher.planner import MIN_READY_REQUESTOR
from nodepool.launcher.requestindex import RequestIndex
from nodepool.model import NodeRequest
from nodepool.model.states import RequestState

STATES = [s.value for s in (RequestState.REQUESTED, RequestState.PENDING,
                            RequestState.FULFILLED, RequestState.FAILED)]


class Feed:
    """A store's request change feed: what changed since the last call, or (``reread``)
    'cannot tell': the index reads the listing."""

    def __init__(self):
        self.records = {}
        self.pending = {}
        self.reread = False
        self.position = 0

    def put(self, record):
        self.records[record.id] = record
        self.pending[record.id] = record

    def drop(self, request_id):
        self.records.pop(request_id, None)
        self.pending[request_id] = None

    def request_changes(self, since):
        self.position += 1
        changes, self.pending = self.pending, {}
        return self.position, (None if self.reread else changes)

    def list_requests(self, shared=False):
        return list(self.records.values())


change = st.tuples(
    st.integers(0, 7),                                   # which request
    st.sampled_from(STATES + ["deleted"]),
    st.sampled_from([(MIN_READY_REQUESTOR, ("small",)), (MIN_READY_REQUESTOR, ("big",)),
                     (MIN_READY_REQUESTOR, ("small", "big")), ("zuul", ("small",))]),
    st.integers(100, 300),                               # priority
    st.floats(900.0, 1100.0),                            # state time (failures held or not)
    st.booleans())                                       # the feed cannot tell: read all


@settings(max_examples=200, deadline=None)
@given(st.lists(change, max_size=40))
def test_groupings_match_the_whole_listing(changes):
    feed, index, now = Feed(), RequestIndex(), 1000.0 + minready.FAILED_HOLD / 2
    for n, state, (requestor, labels), priority, state_time, reread in changes:
        rid = f"{priority}-{n:010d}"
        for other in [r for r in feed.records if r.endswith(f"{n:010d}") and r != rid]:
            feed.drop(other)                             # one request per number
        if state == "deleted":
            feed.drop(rid)
        else:
            feed.put(NodeRequest(id=rid, state=state, requestor=requestor,
                                 node_types=list(labels), state_time=state_time))
        feed.reread = reread
        index.refresh(feed)
        listing = feed.list_requests()
        assert index.by_id == feed.records
        assert [r.id for r in index.waiting_requests()] == [
            r.id for r in sorted(listing, key=NodeRequest.sort_key)
            if r.state == RequestState.REQUESTED]
        pending = index.min_ready_asked + minready.held_failures(index.failed_min_ready(), now)
        assert pending == minready.pending_min_ready(listing, now)
        assert sorted(minready.min_ready_to_finish(index.min_ready_finished(), (), now)) == \
            sorted(minready.min_ready_to_finish(listing, (), now))
        assert sorted(r.id for r in index) == sorted(feed.records)
