"""Exponential backoff per key, for refusals and failures that must not be retried at once.

A cloud refusing capacity, a failing delete, an API error, a request whose handling raised:
each is tried again only after a delay that doubles with every consecutive failure, up to a
cap, and resets on success.  The clock is passed in (``now``), so the rules are plain data in
tests.  Keys are whatever the caller needs: ``(pool key, label)``, a node id, a request id.
"""
from dataclasses import dataclass


@dataclass
class _Entry:
    failures: int
    until: float
    since: float        # when the last failure was recorded


class Backoff:
    def __init__(self, base=1.0, cap=60.0, factor=2.0):
        self.base = base
        self.cap = cap
        self.factor = factor
        self._entries = {}

    def failed(self, key, now):
        """Record one more consecutive failure of ``key``; return the delay now in force."""
        entry = self._entries.get(key)
        failures = entry.failures + 1 if entry else 1
        delay = min(self.cap, self.base * self.factor ** (failures - 1))
        self._entries[key] = _Entry(failures, now + delay, now)
        return delay

    def lift(self, key):
        """End ``key``'s wait now (what it waited for happened), keeping its failure count:
        one more failure waits longer still."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.until = float("-inf")

    def until(self, key):
        """When ``key``'s wait ends (None without an entry; -inf once lifted)."""
        entry = self._entries.get(key)
        return entry.until if entry else None

    def since(self, key):
        """When ``key``'s last failure was recorded (None without an entry)."""
        entry = self._entries.get(key)
        return entry.since if entry else None

    def succeeded(self, key):
        self._entries.pop(key, None)

    def waiting(self, key, now):
        """True while ``key`` must not be tried (its delay has not run out)."""
        entry = self._entries.get(key)
        return entry is not None and now < entry.until

    def failures(self, key):
        entry = self._entries.get(key)
        return entry.failures if entry else 0

    def blocked(self, now):
        """Every key still waiting."""
        return {k for k, e in self._entries.items() if now < e.until}

    def forget(self, keep):
        """Drop every key for which ``keep(key)`` is false (things that are gone)."""
        for key in [k for k in self._entries if not keep(k)]:
            del self._entries[key]

    def keys(self):
        """The keys with an entry (failed and not succeeded since), waiting or not."""
        return set(self._entries)

    def __len__(self):
        return len(self._entries)
