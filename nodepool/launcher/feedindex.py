"""What ``NodeIndex`` and ``RequestIndex`` share: following one of the store's change feeds.

A subclass names the feed (``_changes``: ``StateStore.node_changes`` or ``request_changes``) and
the listing to read when the feed cannot tell what changed (``_listing``), and keeps its
groupings up to date in ``_put(id, record or None)``.
"""


class FeedIndex:
    def __init__(self):
        self._position = None          # our position in the store's change feed
        self.by_id = {}                # id -> record (shared with the store's cache, read-only)

    def refresh(self, store):
        """Catch up with the store: apply what changed, or read everything when it cannot
        tell."""
        position, changes = self._changes(store, self._position)
        if changes is None:
            fresh = {r.id: r for r in self._listing(store)}
            for record_id in [i for i in self.by_id if i not in fresh]:
                self._put(record_id, None)
            for record_id, record in fresh.items():
                self._put(record_id, record)
        else:
            for record_id, record in changes.items():
                self._put(record_id, record)
        self._position = position
        return self

    def _changes(self, store, position):
        raise NotImplementedError

    def _listing(self, store):
        raise NotImplementedError

    def _put(self, record_id, record):
        raise NotImplementedError
