"""Progressive rollout of new image uploads: the pure decisions.

For each (image, provider) pair whose diskimage has a ``rollout`` policy, the launcher asks,
from a snapshot of the upload records (``model.rollout.pair_status``) and the outcome counters
they carry:

* which upload a launch boots (``choose_upload``): the current one, or the candidate for at
  most its step's share of launches, counted since the step began;
* what to change (``plan_pair``): start the rollout of a new candidate, advance a step, make the
  candidate current, or withdraw it when it does worse than the current upload;
* how a validation attempt's result changes the candidate (``after_validation``).

The current upload is never withdrawn by these decisions: only a candidate can be.  Every
function takes and returns plain data; ``validation.py`` applies the actions to the store.
"""
from dataclasses import dataclass

from ..model.rollout import (BAD_OUTCOMES, CURRENT, FAILED, PASSED, PENDING, ROLLING, RUNNING,
                             SKIPPED, VALIDATING, Rollout)

MAX_RETRY_DELAY = 3600.0
CLAIM_TIMEOUT = 120.0        # a claimed validation that never got its request is given up


# -- which upload a launch boots -------------------------------------------------------------------

def candidate_share(cand, policy):
    """Percent of launches the candidate gets now (0 while validating)."""
    if cand.phase != ROLLING:
        return 100 if cand.phase == CURRENT else 0
    steps = policy.steps
    return steps[min(max(cand.step, 0), len(steps) - 1)]


def launches_in_step(cand, cand_launches, current_launches):
    """(candidate, current) launches since the candidate's step began."""
    base = cand.step_base or {}
    return (max(0, cand_launches - int(base.get("candidate") or 0)),
            max(0, current_launches - int(base.get("current") or 0)))


def choose_upload(status, policy, launches, validation_upload=None):
    """The upload a new node boots, or None when the pair has none.

    ``launches(upload)`` is that upload's launch count (the store's plus this launcher's
    not yet written).  ``validation_upload`` is the upload path a validation request asks for:
    it boots that upload whatever its phase.  Otherwise the candidate gets a launch only while
    that keeps its launches since the step began at or below the step's share."""
    if validation_upload:
        for upload in [status.candidate, status.current] + list(status.superseded):
            if upload is not None and upload.path == validation_upload:
                return upload
    cand, current = status.candidate, status.current
    if cand is None or policy is None:
        return current if current is not None else cand
    state = Rollout.of(cand)
    if current is None:
        # nothing else serves (the current upload was deleted): a validated candidate serves
        return cand if state.phase in (ROLLING, CURRENT) else None
    share = candidate_share(state, policy)
    if share <= 0:
        return current
    if share >= 100:
        return cand
    c, p = launches_in_step(state, launches(cand), launches(current))
    return cand if (c + 1) * 100 <= share * (c + p + 1) else current


# -- outcome comparison ----------------------------------------------------------------------------

def attempts_and_bad(outcomes):
    bad = sum(int(outcomes.get(k) or 0) for k in BAD_OUTCOMES)
    return int(outcomes.get("ready") or 0) + bad, bad


def outcomes_since(outcomes, baseline):
    return {k: max(0, int(v or 0) - int((baseline or {}).get(k) or 0))
            for k, v in (outcomes or {}).items()}


def fallback_reason(cand, current, policy):
    """Why the candidate must be withdrawn (it does worse than the current upload by more than
    the margin over at least ``fallback.min-launches`` attempts), or None."""
    if policy is None or not policy.fallback:
        return None
    n, bad = attempts_and_bad(cand.outcomes)
    if n < policy.fallback_min_launches:
        return None
    rate = bad / n
    prev_rate = 0.0
    if current is not None:
        pn, pbad = attempts_and_bad(outcomes_since(current.outcomes, cand.baseline))
        if pn >= policy.fallback_min_launches:
            prev_rate = pbad / pn
    if rate - prev_rate > policy.fallback_margin:
        return (f"{bad} of {n} launch attempts failed ({rate:.0%}), the current upload "
                f"{prev_rate:.0%}: worse by more than the margin {policy.fallback_margin:.0%}")
    return None


# -- actions ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StartRollout:
    """A new candidate: record its phase (validating, or rolling at the first step)."""
    upload: object
    current: object


@dataclass(frozen=True)
class StartValidation:
    """Claim the candidate's validation and ask for a node booted from it."""
    upload: object


@dataclass(frozen=True)
class ResetValidation:
    """A running validation lost its node request (its launcher died): try again later."""
    upload: object
    reason: str


@dataclass(frozen=True)
class AdvanceStep:
    upload: object
    current: object
    to_step: int          # len(policy.steps) means: make it current


@dataclass(frozen=True)
class Withdraw:
    upload: object
    by: str
    reason: str


def plan_pair(status, policy, now, launches, live_requests):
    """What to do for one pair now (at most one action: each is re-decided on a fresh record
    by the compare-and-set that applies it)."""
    cand = status.candidate
    if cand is None or policy is None:
        return None
    state = Rollout.of(cand)
    current = status.current
    if state.phase is None:
        return StartRollout(cand, current)
    if state.phase == VALIDATING:
        val = state.validation
        if policy.validation is None:
            return AdvanceStep(cand, current, 0)       # validation no longer configured
        if val.get("state") == PENDING and (val.get("next_try") or 0) <= now:
            return StartValidation(cand)
        if val.get("state") == RUNNING:
            request = val.get("request")
            if request is None and now - (val.get("claimed_at") or 0) > CLAIM_TIMEOUT:
                return ResetValidation(cand, "claimed but no node was requested")
            if request is not None and request not in live_requests:
                return ResetValidation(cand, f"validation request {request} is gone")
        return None
    if state.phase != ROLLING:
        return None
    cur_state = Rollout.of(current) if current is not None else None
    reason = fallback_reason(state, cur_state, policy)
    if reason:
        return Withdraw(cand, "fallback", reason)
    if state.held:
        return None
    c, _ = launches_in_step(state, launches(cand), launches(current) if current else 0)
    started = state.step_started if state.step_started is not None else now
    if c >= policy.step_min_launches and now - started >= policy.step_min_time:
        return AdvanceStep(cand, current, state.step + 1)
    return None


# -- changes of one record (applied by compare-and-set; False: nothing to change) ------------------

def start_rollout(state, policy, now, current_outcomes, current_path, current_launches):
    if state.phase is not None:
        return False
    state.baseline = dict(current_outcomes or {})
    state.baseline_upload = current_path
    if policy.validation is not None:
        state.phase = VALIDATING
        state.validation = {"state": PENDING, "attempts": 0, "next_try": now}
        state.note(now, "candidate: validating")
    else:
        state.validation = {"state": SKIPPED}
        _enter_step(state, 0, now, state.count("launches"), current_launches)
        state.note(now, f"candidate: rolling out at {policy.steps[0]}%")
    return True


def _enter_step(state, step, now, cand_launches, current_launches):
    state.phase = ROLLING
    state.step = step
    state.step_started = now
    state.step_base = {"candidate": cand_launches, "current": current_launches}


def advance_step(state, policy, to_step, now, current_launches):
    """Move to ``to_step`` (from ``to_step - 1``, or from validating for step 0); past the
    last step the upload becomes current."""
    if state.phase == VALIDATING and to_step == 0:
        state.validation = dict(state.validation, state=state.validation.get("state") or SKIPPED)
    elif state.phase != ROLLING or state.step != to_step - 1:
        return False
    if to_step >= len(policy.steps):
        state.phase = CURRENT
        state.held = False
        state.note(now, "current")
        return True
    _enter_step(state, to_step, now, state.count("launches"), current_launches)
    state.note(now, f"step {to_step + 1}/{len(policy.steps)}: {policy.steps[to_step]}%")
    return True


def retry_delay(policy, attempts):
    base = policy.validation.retry_delay if policy.validation else 30.0
    return min(MAX_RETRY_DELAY, base * (2 ** max(0, attempts - 1)))


def after_validation(state, policy, ok, reason, now, current_launches, counts=True):
    """Apply one validation attempt's result.  Returns the withdrawal reason when the
    candidate has now failed as many attempts as the policy allows, else None.  An attempt
    that could not run (``counts`` false: no node, store trouble) is retried later without
    counting against the upload."""
    if state.phase != VALIDATING:
        return None
    val = dict(state.validation)
    if ok:
        val.update(state=PASSED, request=None, reason=None)
        state.validation = val
        _enter_step(state, 0, now, state.count("launches"), current_launches)
        state.note(now, f"validated; rolling out at {policy.steps[0]}%")
        return None
    attempts = int(val.get("attempts") or 0) + (1 if counts else 0)
    limit = policy.validation.attempts if policy.validation else 1
    val.update(attempts=attempts, request=None, reason=reason)
    if counts and attempts >= limit:
        val["state"] = FAILED
        state.validation = val
        state.note(now, f"validation failed: {reason}")
        return f"validation failed after {attempts} attempt(s): {reason}"
    val.update(state=PENDING, next_try=now + retry_delay(policy, max(1, attempts)))
    state.validation = val
    state.note(now, f"validation attempt {'failed' if counts else 'not run'}: {reason}")
    return None


def rollback_step(state, now):
    """An operator's step back; False when there is no step to go back to."""
    if state.phase != ROLLING or state.step <= 0:
        return False
    state.step -= 1
    state.held = True
    state.step_started = now
    state.note(now, f"rolled back to step {state.step + 1} by an operator (held)")
    return True


def describe(state, policy):
    """The rollout column of ``image-list --rollout``."""
    phase = state.phase
    if phase == ROLLING and policy is not None:
        text = f"step {state.step + 1}/{len(policy.steps)} ({candidate_share(state, policy)}%)"
    elif phase == ROLLING:
        text = f"step {state.step + 1}"
    else:
        text = phase or "-"
    return text + (" held" if state.held else "")


def validation_text(state):
    val = state.validation or {}
    text = val.get("state") or "-"
    if val.get("attempts"):
        text += f" ({val['attempts']} failed)"
    return text


def outcome_kind(exc, phase, scan_state=None):
    """The outcome counter a failed launch attempt adds to (typed, never from the message)."""
    from ..errors import LaunchTimeout
    if phase == "scan":
        return "keyscan_failures" if scan_state == "keyscan" else "boot_timeouts"
    if isinstance(exc, LaunchTimeout):
        return "boot_timeouts"
    return "launch_failures"


def unservable_paths(uploads, rolled_out):
    """Paths of uploads whose ready nodes must not be handed out: of the pairs under rollout
    (``rolled_out(image, provider)``), uploads no longer ``ready`` (withdrawn) and ready ones
    that are not current and not yet validated (a validation node whose request vanished with
    its launcher, or stock an upstream launcher booted from the newest upload)."""
    from ..model.rollout import pair_status
    bad, pairs = set(), set()
    for u in uploads:
        if not rolled_out(u.image, u.provider):
            continue
        pairs.add((u.image, u.provider))
        if str(getattr(u.state, "value", u.state)) != "ready":
            bad.add(u.path)
    for image, provider in pairs:
        status = pair_status(uploads, image, provider, True)
        for u in [status.candidate] + list(status.superseded):
            if u is not None and Rollout.of(u).phase in (None, VALIDATING):
                bad.add(u.path)
    return bad


def nodes_to_retire(nodes, bad_paths):
    """Ready, unallocated nodes booted from an unservable upload."""
    return [n.id for n in nodes
            if n.image_id in bad_paths and not n.allocated_to
            and str(getattr(n.state, "value", n.state)) == "ready"]


def orphan_validation_requests(requests, uploads, requestor, now, grace=CLAIM_TIMEOUT):
    """Ids of validation requests (by ``requestor``) no upload's validation refers to any more,
    older than ``grace`` seconds: their validation was given up or its result recorded, and
    their node must go back (and, being from an unvalidated upload, be deleted)."""
    wanted = {Rollout.of(u).validation.get("request") for u in uploads
              if Rollout.of(u).phase == VALIDATING}

    def born(r):
        return next((t for t in (r.created_time, r.state_time) if t is not None), now)
    return [r.id for r in requests
            if r.requestor == requestor and r.id not in wanted and now - born(r) > grace]


def nodes_to_recheck(nodes, candidate_path, done):
    """Ready, unallocated nodes booted from the rolling candidate not checked yet (``done``)."""
    return [n for n in nodes
            if n.image_id == candidate_path and not n.allocated_to and n.id not in done
            and str(getattr(n.state, "value", n.state)) == "ready"]
