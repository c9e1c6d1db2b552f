"""Resource arithmetic for quota decisions.

A ``Resources`` is a mapping of resource name (``instances``, ``cores``, ``ram``, and any
driver-specific name such as ``volumes`` or an AWS quota code) to an amount.  Missing entries are
0 for usage and unlimited for limits; ``Limits`` makes the latter explicit.
"""
import math


class Resources(dict):
    """Amounts of resources used or needed; missing names count as 0."""

    def __missing__(self, key):
        return 0

    def __add__(self, other):
        out = Resources(self)
        for k, v in other.items():
            out[k] = out[k] + v
        return out

    def __iadd__(self, other):
        """In place: tallies over thousands of nodes each pass must not allocate per node."""
        for k, v in other.items():
            self[k] = self[k] + v
        return self

    def __isub__(self, other):
        for k, v in other.items():
            self[k] = self[k] - v
        return self

    def __sub__(self, other):
        out = Resources(self)
        for k, v in other.items():
            out[k] = out[k] - v
        return out

    def __mul__(self, n):
        return Resources({k: v * n for k, v in self.items()})

    @classmethod
    def of(cls, instances=1, cores=0, ram=0, **more):
        return cls(instances=instances, cores=cores, ram=ram, **more)

    @classmethod
    def total(cls, items):
        out = cls()
        for item in items:
            out += item
        return out


class Limits(dict):
    """Upper bounds per resource; a missing name (or None) is unlimited."""

    def __missing__(self, key):
        return math.inf

    @classmethod
    def of(cls, **limits):
        return cls({k: v for k, v in limits.items() if v is not None})

    def headroom(self, used):
        """Limits minus usage, per limited resource (may go negative)."""
        return {k: v - used.get(k, 0) for k, v in self.items()}

    def fits(self, used, need):
        """True when ``used + need`` stays within every limit."""
        for k, limit in self.items():
            if need.get(k, 0) and used.get(k, 0) + need.get(k, 0) > limit:
                return False
        return True

    def could_ever_fit(self, need):
        """True when ``need`` alone is within every limit (ignoring current usage)."""
        return all(need.get(k, 0) <= limit for k, limit in self.items())

    def combine(self, other):
        """The tighter of two limit sets."""
        out = Limits(self)
        for k, v in other.items():
            out[k] = min(out[k], v)
        return out
