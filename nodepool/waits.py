"""How long fulfilled requests waited, split warm (every node came from the ready pool) and cold
(at least one node had to be launched for the request).

Where the history lives: each launcher keeps a bounded ring of its recent fulfilments (and of
recent launch failures) in the ``extra`` of its own *launcher component* record in the store,
rewritten at most every ``FLUSH_SECONDS``.  That record already exists (it is how launchers are
listed), every store implements it (SQLite and ZooKeeper), readers that do not know the field keep
it untouched, and any process that can open the store (the CLI, the web app, another launcher)
reads every launcher's ring with one ``list_components("launcher")``: no network path to a
launcher's web port is needed, and several launchers are merged.  A request record could not hold
it (requests are deleted once the requestor has its nodes).  The price: the ring is as long-lived
as the launcher's registration (a restarted launcher starts an empty ring) and at most
``RING_SIZE`` fulfilments per launcher are kept.
"""
import dataclasses
import math
import threading
import time

RING_SIZE = 500             # fulfilments kept per launcher (each ~50 bytes in the record)
FAILURE_RING_SIZE = 50      # launch failures kept per launcher
FLUSH_SECONDS = 5.0
WAITS_KEY = "recent_waits"
FAILURES_KEY = "recent_failures"


@dataclasses.dataclass(frozen=True)
class Wait:
    time: float            # unix time of fulfilment
    label: str
    provider: str
    warm: bool
    seconds: float

    def to_row(self):
        return [round(self.time, 1), self.label, self.provider, 1 if self.warm else 0,
                round(self.seconds, 3)]

    @classmethod
    def from_row(cls, row):
        t, label, provider, warm, seconds = row
        return cls(float(t), str(label), str(provider), bool(warm), float(seconds))


def waits_of_request(request, provider, warm, seconds, now):
    """One ``Wait`` per distinct label of a fulfilled request."""
    return [Wait(now, label, provider, warm, max(0.0, seconds))
            for label in sorted(set(request.node_types or ()))]


def read_waits(components):
    """Every launcher's recent waits, oldest first.  Malformed rows are skipped."""
    out = []
    for comp in components:
        for row in (comp.extra or {}).get(WAITS_KEY) or ():
            try:
                out.append(Wait.from_row(row))
            except (TypeError, ValueError):
                continue
    out.sort(key=lambda w: w.time)
    return out


def read_failures(components):
    """Every launcher's recent launch failures (dicts), newest first."""
    out = []
    for comp in components:
        for item in (comp.extra or {}).get(FAILURES_KEY) or ():
            if isinstance(item, dict):
                out.append(dict(item, launcher=comp.hostname))
    out.sort(key=lambda f: f.get("time") or 0, reverse=True)
    return out


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a list of numbers; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _stats(waits):
    seconds = [w.seconds for w in waits]
    warm = sum(1 for w in waits if w.warm)
    return {
        "requests": len(waits),
        "warm": warm,
        "cold": len(waits) - warm,
        "warm_ratio": (warm / len(waits)) if waits else None,
        "p50": percentile(seconds, 50),
        "p95": percentile(seconds, 95),
        "p50_warm": percentile([w.seconds for w in waits if w.warm], 50),
        "p50_cold": percentile([w.seconds for w in waits if not w.warm], 50),
    }


def summarize(waits, now=None, window=3600.0):
    """Per label (and per label+provider): request count, warm-hit ratio, p50/p95 wait over the
    last ``window`` seconds.  Returns a list of dicts sorted by label then provider
    (provider ``None`` is the label over every provider)."""
    now = time.time() if now is None else now
    recent = [w for w in waits if now - w.time <= window]
    groups = {}
    for w in recent:
        groups.setdefault((w.label, None), []).append(w)
        groups.setdefault((w.label, w.provider), []).append(w)
    rows = []
    for (label, provider), items in sorted(groups.items(),
                                           key=lambda kv: (kv[0][0], kv[0][1] or "")):
        rows.append(dict(label=label, provider=provider, **_stats(items)))
    return rows


def series(waits, now=None, window=3600.0, buckets=30, label=None):
    """The warm-hit ratio and p50/p95 over time: ``buckets`` equal slices of the last ``window``
    seconds (optionally of one label).  Slices without fulfilments have None values."""
    now = time.time() if now is None else now
    width = window / buckets
    start = now - window
    slots = [[] for _ in range(buckets)]
    for w in waits:
        if label is not None and w.label != label:
            continue
        if w.time < start or w.time > now:
            continue
        slots[min(buckets - 1, int((w.time - start) / width))].append(w)
    out = []
    for i, items in enumerate(slots):
        s = _stats(items)
        out.append({"time": start + (i + 1) * width, "requests": s["requests"],
                    "warm_ratio": s["warm_ratio"], "p50": s["p50"], "p95": s["p95"]})
    return out


class Ring:
    """A bounded, in-memory list of recent rows kept by one launcher (see module docstring)."""

    def __init__(self, size):
        self.size = size
        self.rows = []
        self.dirty = False
        self._lock = threading.Lock()

    def add(self, row):
        with self._lock:            # fulfilments are recorded from several threads
            self.rows.append(row)
            if len(self.rows) > self.size:
                del self.rows[:len(self.rows) - self.size]
            self.dirty = True
