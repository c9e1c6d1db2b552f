"""Record states and their legal transitions, in one table per record kind.

The values are the strings Nodepool writes to ZooKeeper, so records stay wire compatible.
``check_transition`` is called by the record setters; an illegal move fails where it happens.
"""
import enum


class NodeState(str, enum.Enum):
    INIT = "init"
    BUILDING = "building"
    TESTING = "testing"
    READY = "ready"
    IN_USE = "in-use"
    USED = "used"
    HOLD = "hold"
    DELETING = "deleting"
    FAILED = "failed"
    ABORTED = "aborted"
    DELETED = "deleted"

    def __str__(self):
        return self.value


class RequestState(str, enum.Enum):
    REQUESTED = "requested"
    PENDING = "pending"
    FULFILLED = "fulfilled"
    FAILED = "failed"

    def __str__(self):
        return self.value


class BuildState(str, enum.Enum):
    BUILDING = "building"
    READY = "ready"
    DELETING = "deleting"
    FAILED = "failed"

    def __str__(self):
        return self.value


class UploadState(str, enum.Enum):
    UPLOADING = "uploading"
    READY = "ready"
    DELETING = "deleting"
    FAILED = "failed"

    def __str__(self):
        return self.value


N = NodeState
NODE_TRANSITIONS = {
    N.INIT: {N.BUILDING, N.READY, N.DELETING, N.FAILED, N.ABORTED},
    N.BUILDING: {N.READY, N.FAILED, N.ABORTED, N.DELETING, N.BUILDING},
    N.TESTING: {N.READY, N.FAILED, N.DELETING},
    # ready -> building happens for static hosts re-registered after a failed check
    N.READY: {N.IN_USE, N.USED, N.HOLD, N.DELETING, N.FAILED, N.READY},
    N.IN_USE: {N.USED, N.HOLD, N.DELETING, N.IN_USE, N.READY},
    N.USED: {N.DELETING, N.READY},          # static hosts go back to ready after use
    N.HOLD: {N.USED, N.DELETING, N.READY, N.IN_USE},
    N.DELETING: {N.DELETED, N.DELETING},
    N.FAILED: {N.DELETING},
    N.ABORTED: {N.DELETING},
    N.DELETED: set(),
}

R = RequestState
REQUEST_TRANSITIONS = {
    R.REQUESTED: {R.PENDING, R.FULFILLED, R.FAILED, R.REQUESTED},  # fulfilled at once from ready nodes
    R.PENDING: {R.FULFILLED, R.REQUESTED, R.FAILED, R.PENDING},
    R.FULFILLED: {R.REQUESTED},             # a lost fulfilled min-ready request may be reset
    R.FAILED: set(),
}

B = BuildState
BUILD_TRANSITIONS = {
    B.BUILDING: {B.READY, B.FAILED, B.DELETING},
    B.READY: {B.DELETING},
    B.FAILED: {B.DELETING},
    B.DELETING: {B.DELETING},
}

U = UploadState
UPLOAD_TRANSITIONS = {
    U.UPLOADING: {U.READY, U.FAILED, U.DELETING},
    U.READY: {U.DELETING},
    U.FAILED: {U.DELETING},
    U.DELETING: {U.DELETING},
}

_TABLES = {
    NodeState: NODE_TRANSITIONS,
    RequestState: REQUEST_TRANSITIONS,
    BuildState: BUILD_TRANSITIONS,
    UploadState: UPLOAD_TRANSITIONS,
}


class IllegalTransition(ValueError):
    pass


def check_transition(old, new):
    """Raise IllegalTransition unless moving a record from ``old`` to ``new`` is allowed.

    ``old`` may be None (a record being created: any state is allowed) or a state written by
    another program that we do not know (then we do not judge).
    """
    if old is None or old == new:
        return
    table = _TABLES[type(new)]
    try:
        old = type(new)(old)
    except ValueError:
        return
    if new not in table[old]:
        raise IllegalTransition(f"{type(new).__name__} cannot go from {old.value} to {new.value}")
