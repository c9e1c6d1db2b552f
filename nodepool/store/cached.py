"""Records kept parsed between listings and handed out as copies the caller may change.

Launchers list every node and request on each pass of their loop, so the copy is the hot path:
``CachedRecord`` notes once which attributes are containers (flat ones take a shallow copy,
nested ones a JSON-shaped deep copy), which is many times cheaper than ``copy.deepcopy``.
"""

_CONTAINERS = (list, dict)


def json_copy(value):
    """Deep copy of JSON-like data (lists, dicts, scalars); much cheaper than copy.deepcopy."""
    kind = type(value)
    if kind is list:
        return [json_copy(v) if type(v) in _CONTAINERS else v for v in value]
    if kind is dict:
        return {k: (json_copy(v) if type(v) in _CONTAINERS else v) for k, v in value.items()}
    return value


def _is_flat(value):
    items = value.values() if type(value) is dict else value
    return not any(type(v) in _CONTAINERS for v in items)


class CachedRecord:
    """One parsed record and a ``tag`` saying which version of the source it came from (the
    SQLite row generation, the ZooKeeper ``mzxid``)."""

    __slots__ = ("tag", "record", "_shape")

    def __init__(self, record, tag):
        self.tag = tag
        self.record = record
        self._shape = None        # (flat, nested) container attributes, on the first copy

    def fresh(self):
        """A copy the caller may mutate freely (lists and dicts are copied too)."""
        record = self.record
        if self._shape is None:
            containers = [k for k, v in vars(record).items() if type(v) in _CONTAINERS]
            flat = tuple(k for k in containers if _is_flat(getattr(record, k)))
            self._shape = (flat, tuple(k for k in containers if k not in flat))
        flat, nested = self._shape
        new = object.__new__(record.__class__)
        attrs = record.__dict__.copy()
        for key in flat:
            attrs[key] = attrs[key].copy()
        for key in nested:
            attrs[key] = json_copy(attrs[key])
        new.__dict__ = attrs
        return new


def fresh_copy(record):
    """A mutable copy of one record that is not kept in a cache."""
    return CachedRecord(record, None).fresh()


class ChangeLog:
    """Which records of a cache changed, in order, so a reader that keeps the last position it
    read can catch up on what changed since, not the whole fleet.  Only the newest ``keep``
    entries are kept; a reader further behind (or a cache that was re-read whole) is told to
    read everything again.  Not thread-safe on its own: used under its cache's lock."""

    def __init__(self, keep=50000):
        self.keep = keep
        self.seq = 0
        self.floor = 0             # a position before this cannot be caught up from
        self._ids = []             # ids changed at positions floor+1 .. seq

    def note(self, record_id):
        self.seq += 1
        self._ids.append(record_id)
        if len(self._ids) > 2 * self.keep:
            drop = len(self._ids) - self.keep
            del self._ids[:drop]
            self.floor += drop

    def reset(self):
        """Everything may have changed (the cache was read again whole)."""
        self.seq += 1
        self.floor = self.seq
        self._ids = []

    def since(self, position):
        """``(position now, ids changed since position)``, or ids None: read everything."""
        if position is None or position < self.floor or position > self.seq:
            return self.seq, None
        return self.seq, set(self._ids[position - self.floor:])
