"""The ``metastatic`` driver: nodes carved out of nodes of another label.

A metastatic pool label names a ``backing-label``.  To launch a node, the adapter finds a
backing node of that label with a free slot, or asks for a new one with a node request like
Zuul does (any provider may serve it), locks it and keeps it ``in-use``; each backing node
serves ``max-parallel-jobs`` metastatic nodes at once, all with its address and login.  An
empty backing node is returned (``used``: its provider deletes it) once ``grace-time`` has
passed since its last slot was freed and ``min-retention-time`` since it was taken; one older
than ``max-age`` gets no new slots and is returned as soon as it is empty.  See ``adapter.py``
and ``docs/metastatic.md`` for what is guaranteed across errors and restarts.
"""
import voluptuous as v

from ..base import Driver

# the keys every label sharing one backing label must agree on (they share its nodes)
SHARED_KEYS = ("max-parallel-jobs", "grace-time", "min-retention-time", "max-age")


def _seconds(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise v.Invalid("expected a number of seconds")
    if value < 0:
        raise v.Invalid(f"must be >= 0, got {value}")
    return value


def _count(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise v.Invalid("expected int")
    if value < 1:
        raise v.Invalid(f"must be >= 1, got {value}")
    return value


class MetastaticDriver(Driver):
    name = "metastatic"
    labels_need_image = False
    # no cloud of its own: no API rate, no images, no cloud quota or zones
    unused_common_keys = {
        "provider": {"rate", "image-name-format", "image-upload-timeout", "post-upload-hook",
                     "diskimages", "cloud-images"},
        "pool": {"max-cores", "max-ram", "availability-zones", "ignore-provider-quota"},
        "label": {"diskimage", "cloud-image"},
    }
    provider_defaults = {"rate": 0, "boot-timeout": 60, "launch-timeout": 3600,
                         "launch-retries": 3}

    def label_schema(self):
        return {
            v.Required("backing-label"): v.All(str, v.Length(min=1)),
            v.Optional("max-parallel-jobs", default=1): _count,
            v.Optional("grace-time", default=60): _seconds,
            v.Optional("min-retention-time", default=0): _seconds,
            v.Optional("max-age"): _seconds,
            v.Optional("host-key-checking"): bool,
        }

    def check_provider(self, provider, config):
        problems = []
        shared = {}
        own = {label.name for label in provider.labels()}
        for pool_index, pool in enumerate(provider.pools.values()):
            for label_index, label in enumerate(pool.labels.values()):
                where = f"pools[{pool_index}].labels[{label_index}]"
                backing = label.options["backing-label"]
                if backing not in config.labels:
                    problems.append((f"{where}.backing-label",
                                     f"label {label.name}: backing-label {backing} is not a "
                                     f"top-level label"))
                elif backing in own:
                    problems.append((f"{where}.backing-label",
                                     f"label {label.name}: backing-label {backing} is a label "
                                     f"of this metastatic provider itself"))
                values = tuple(label.options.get(k) for k in SHARED_KEYS)
                first = shared.setdefault(backing, (where, label.name, values))
                if first[2] != values:
                    problems.append((where, f"label {label.name}: labels backed by {backing} "
                                            f"share its nodes and must agree on "
                                            f"{', '.join(SHARED_KEYS)} (see label {first[1]})"))
        return problems

    def adapter(self, provider, rate_limiter=None):
        from .adapter import MetastaticAdapter
        return MetastaticAdapter(provider, rate_limiter)


DRIVER = MetastaticDriver()
