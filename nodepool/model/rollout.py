"""Rollout state of an image upload, kept in the upload record itself.

Nodepool 11 records know nothing of validation or rollout, so the state lives under one extra
JSON key (``ROLLOUT_KEY``) of the upload record: other programs keep it when they rewrite the
record (ours do; Nodepool's ``ImageUpload.toDict`` does not, see docs/rollout.md) and ignore it
otherwise.  Every launcher sharing the store reads and writes it (compare-and-set), so the
rollout step, the validation attempts and the outcome counters survive any one process.

This module holds the record accessors and the one question the builder, the launcher and the
CLI all ask: of the ready uploads of an image to a provider, which one is *current* (serves
every launch not given to the candidate), which one is the *candidate* being validated or rolled
out, and which ones are superseded.  Everything here is pure.
"""
import copy
from dataclasses import dataclass, field
from typing import Optional

from .states import UploadState

ROLLOUT_KEY = "rollout"

# phases of an upload (docs/rollout.md has the diagram)
VALIDATING = "validating"     # ready, not serving: a validation node boots from it
ROLLING = "rolling"           # serving a share of launches (``step`` indexes the steps)
CURRENT = "current"           # serving every launch; the previous upload is now only kept
WITHDRAWN = "withdrawn"       # marked deleting by validation, fallback or an operator

# validation states
PENDING = "pending"
RUNNING = "running"
PASSED = "passed"
FAILED = "failed"
SKIPPED = "skipped"

# outcome counters (per upload; summed by every launcher)
OUTCOMES = ("launches", "ready", "launch_failures", "boot_timeouts", "keyscan_failures",
            "recheck_failures", "returned_unused")
BAD_OUTCOMES = ("launch_failures", "boot_timeouts", "keyscan_failures", "recheck_failures",
                "returned_unused")


@dataclass
class Rollout:
    """The decoded ``rollout`` key of one upload (a fresh copy: edit and ``store`` it back)."""
    phase: Optional[str] = None
    step: int = 0
    step_started: Optional[float] = None      # epoch seconds the step began
    step_base: dict = field(default_factory=dict)    # launches of candidate/current at step start
    held: bool = False
    validation: dict = field(default_factory=dict)   # state, attempts, next_try, request, ...
    outcomes: dict = field(default_factory=dict)     # OUTCOMES -> count
    baseline: dict = field(default_factory=dict)     # the current upload's outcomes at start
    baseline_upload: Optional[str] = None            # path of that current upload
    reason: Optional[str] = None                     # why it was withdrawn
    withdrawn_by: Optional[str] = None               # validation | fallback | operator
    history: list = field(default_factory=list)      # [time, event] lines, newest last

    @classmethod
    def of(cls, upload):
        data = (upload.extra or {}).get(ROLLOUT_KEY)
        if not isinstance(data, dict):
            return cls()
        known = {k: copy.deepcopy(v) for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return cls()

    def store(self, upload):
        """Write this state into ``upload.extra`` (the record still has to be saved)."""
        upload.extra[ROLLOUT_KEY] = {
            "phase": self.phase, "step": self.step, "step_started": self.step_started,
            "step_base": dict(self.step_base), "held": self.held,
            "validation": dict(self.validation), "outcomes": dict(self.outcomes),
            "baseline": dict(self.baseline), "baseline_upload": self.baseline_upload,
            "reason": self.reason, "withdrawn_by": self.withdrawn_by,
            "history": list(self.history[-HISTORY_LINES:]),
        }

    def note(self, when, event):
        self.history.append([round(when, 3), event])

    def count(self, name):
        return int(self.outcomes.get(name) or 0)

    @property
    def validation_state(self):
        return self.validation.get("state")


HISTORY_LINES = 20


def has_rollout(upload):
    return isinstance((upload.extra or {}).get(ROLLOUT_KEY), dict)


def _is_ready(upload):
    return str(getattr(upload.state, "value", upload.state)) == UploadState.READY.value


@dataclass
class PairStatus:
    """The ready uploads of one image on one provider, by role."""
    current: object = None            # serves every launch not given to the candidate
    candidate: object = None          # being validated or rolled out
    superseded: list = field(default_factory=list)   # newer than current, older than candidate


def pair_status(uploads, image, provider, enabled):
    """Roles of the ready uploads of ``image`` on ``provider``.

    Without rollout (``enabled`` false) the newest ready upload is current, as in Nodepool.
    With it, the current upload is the newest one whose phase is ``current``; an upload with no
    rollout state is current only when no older upload is (the first upload of a pair, or one
    from before rollout was configured).  The newest ready upload newer than the current one is
    the candidate; any between the two are superseded (never served)."""
    ready = sorted((u for u in uploads if _is_ready(u) and u.image == image
                    and u.provider == provider),
                   key=lambda u: (u.state_time or 0, u.id or ""))
    if not ready:
        return PairStatus()
    if not enabled:
        return PairStatus(current=ready[-1])
    current_index = None
    for index, upload in enumerate(ready):
        phase = Rollout.of(upload).phase
        if phase == CURRENT or (phase is None and current_index is None):
            current_index = index
    if current_index is None:
        # every ready upload is a candidate (the current one was withdrawn): the newest is
        # the candidate and nothing else serves
        return PairStatus(candidate=ready[-1], superseded=ready[:-1])
    newer = ready[current_index + 1:]
    return PairStatus(current=ready[current_index],
                      candidate=newer[-1] if newer else None, superseded=newer[:-1])


def upload_key(upload):
    return (upload.image, upload.build_id, upload.provider, upload.id)
