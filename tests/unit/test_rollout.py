"""The pure rollout decisions: which upload serves, step shares, fallback, validation results."""
import math

from hypothesis import given, settings, strategies as st

from nodepool.config.rollout import RolloutPolicy, Validation
from nodepool.launcher import rollout as ro
from nodepool.model import ImageUpload
from nodepool.model.rollout import (CURRENT, FAILED, PASSED, PENDING, ROLLING, RUNNING,
                                    VALIDATING, Rollout, pair_status)

POLICY = RolloutPolicy(validation=Validation(attempts=2, retry_delay=10), steps=(10, 50, 100),
                       step_min_launches=5, step_min_time=0, fallback_margin=0.2,
                       fallback_min_launches=10)


def up(n, rollout=None, state="ready", provider="p"):
    u = ImageUpload(image="img", build_id=f"b{n}", provider=provider, state=state,
                    state_time=1000.0 + n)
    u.id = f"{n:010d}"
    if rollout is not None:
        rollout.store(u)
    return u


def roll(**kw):
    return Rollout(**kw)


# -- pair_status -----------------------------------------------------------------------------------

def test_without_rollout_the_newest_ready_upload_is_current():
    ups = [up(1), up(2), up(3, state="deleting")]
    status = pair_status(ups, "img", "p", enabled=False)
    assert status.current is ups[1] and status.candidate is None


def test_first_upload_is_current_and_a_newer_one_is_the_candidate():
    old, new = up(1), up(2)
    status = pair_status([new, old], "img", "p", enabled=True)
    assert status.current is old and status.candidate is new
    assert pair_status([old], "img", "p", True).current is old


def test_explicit_current_wins_and_middle_candidates_are_superseded():
    a, b = up(1), up(2, roll(phase=CURRENT))
    c, d = up(3, roll(phase=VALIDATING)), up(4)
    status = pair_status([a, b, c, d], "img", "p", True)
    assert status.current is b and status.candidate is d and status.superseded == [c]


def test_other_pairs_and_states_are_ignored():
    status = pair_status([up(1, provider="q"), up(2, state="uploading")], "img", "p", True)
    assert status.current is None and status.candidate is None


def test_rollout_state_round_trips_through_the_record_json():
    u = up(1, roll(phase=ROLLING, step=1, outcomes={"ready": 3}))
    again = ImageUpload.from_dict(u.to_dict())
    assert Rollout.of(again).step == 1 and Rollout.of(again).count("ready") == 3
    assert again.to_dict()["state"] == "ready"


# -- choose_upload ---------------------------------------------------------------------------------

def test_validating_candidate_never_serves_but_validation_requests_boot_it():
    old, new = up(1), up(2, roll(phase=VALIDATING))
    status = pair_status([old, new], "img", "p", True)
    for _ in range(5):
        assert ro.choose_upload(status, POLICY, lambda u: 0) is old
    assert ro.choose_upload(status, POLICY, lambda u: 0, validation_upload=new.path) is new


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.integers(1, 99), min_size=1, max_size=3, unique=True),
       step=st.integers(0, 2), launches=st.integers(1, 300),
       base=st.tuples(st.integers(0, 50), st.integers(0, 50)))
def test_share_of_launches_on_the_candidate_never_exceeds_the_step(steps, step, launches, base):
    steps = tuple(sorted(steps)) + (100,)
    step = min(step, len(steps) - 2) if len(steps) > 1 else 0
    policy = RolloutPolicy(steps=steps)
    counts = {"new": base[0], "old": base[1]}
    new = up(2, roll(phase=ROLLING, step=step,
                     step_base={"candidate": base[0], "current": base[1]}))
    old = up(1)
    status = pair_status([old, new], "img", "p", True)

    def count(u):
        return counts["new" if u is new else "old"]

    on_new = 0
    for n in range(1, launches + 1):
        chosen = ro.choose_upload(status, policy, count)
        key = "new" if chosen is new else "old"
        counts[key] += 1
        on_new += key == "new"
        assert on_new * 100 <= steps[step] * n
    # and it does get its share (within one launch)
    assert on_new >= math.floor(steps[step] * launches / 100) - 1


# -- plan_pair -------------------------------------------------------------------------------------

def test_new_candidate_starts_validating_with_the_current_outcomes_as_baseline():
    old = up(1, roll(outcomes={"ready": 7, "launch_failures": 1}))
    new = up(2)
    action = ro.plan_pair(pair_status([old, new], "img", "p", True), POLICY, 50.0,
                          lambda u: 0, set())
    assert isinstance(action, ro.StartRollout)
    state = Rollout()
    assert ro.start_rollout(state, POLICY, 50.0, {"ready": 7}, old.path, 8)
    assert state.phase == VALIDATING and state.validation["state"] == PENDING
    assert state.baseline == {"ready": 7} and state.baseline_upload == old.path
    no_validation = RolloutPolicy(steps=(20, 100))
    state = Rollout()
    ro.start_rollout(state, no_validation, 50.0, {}, old.path, 8)
    assert state.phase == ROLLING and state.step == 0 and state.step_base["current"] == 8


def test_pending_validation_starts_when_due_and_lost_requests_are_reset():
    old = up(1)

    def plan(val, now=100.0, live=()):
        new = up(2, roll(phase=VALIDATING, validation=val))
        return ro.plan_pair(pair_status([old, new], "img", "p", True), POLICY, now,
                            lambda u: 0, set(live))
    assert isinstance(plan({"state": PENDING, "next_try": 90}), ro.StartValidation)
    assert plan({"state": PENDING, "next_try": 110}) is None
    assert plan({"state": RUNNING, "request": "r1"}, live={"r1"}) is None
    assert isinstance(plan({"state": RUNNING, "request": "r1"}), ro.ResetValidation)
    assert plan({"state": RUNNING, "request": None, "claimed_at": 90}) is None
    assert isinstance(plan({"state": RUNNING, "request": None, "claimed_at": 0}, now=500.0),
                      ro.ResetValidation)


def test_steps_advance_after_enough_launches_and_time_then_become_current():
    policy = RolloutPolicy(steps=(10, 100), step_min_launches=3, step_min_time=60)
    old = up(1)

    def plan(step, launched, now):
        new = up(2, roll(phase=ROLLING, step=step, step_started=0.0,
                         step_base={"candidate": 0, "current": 0}))
        return ro.plan_pair(pair_status([old, new], "img", "p", True), policy, now,
                            lambda u: launched if u is new else 100, set())
    assert plan(0, 2, 100) is None
    assert plan(0, 3, 30) is None
    action = plan(0, 3, 60)
    assert isinstance(action, ro.AdvanceStep) and action.to_step == 1
    state = Rollout(phase=ROLLING, step=1)
    assert ro.advance_step(state, policy, 2, 61.0, 0) and state.phase == CURRENT
    assert not ro.advance_step(Rollout(phase=ROLLING, step=0), policy, 2, 61.0, 0)


def test_held_rollout_does_not_advance_but_is_still_withdrawn_when_bad():
    old = up(1)
    new = up(2, roll(phase=ROLLING, step=0, held=True, outcomes={"launch_failures": 10}))
    status = pair_status([old, new], "img", "p", True)
    action = ro.plan_pair(status, POLICY, 1e9, lambda u: 1000, set())
    assert isinstance(action, ro.Withdraw) and action.upload is new and action.by == "fallback"
    fine = up(2, roll(phase=ROLLING, step=0, held=True, outcomes={"ready": 10}))
    assert ro.plan_pair(pair_status([old, fine], "img", "p", True), POLICY, 1e9,
                        lambda u: 1000, set()) is None


def test_fallback_compares_with_the_current_upload_since_the_rollout_began():
    bad = {"ready": 6, "launch_failures": 4}        # 40%
    cand = Rollout(phase=ROLLING, outcomes=bad, baseline={"ready": 100, "launch_failures": 0})
    quiet = Rollout(outcomes={"ready": 100})         # nothing since: no sample, rate 0
    assert ro.fallback_reason(cand, quiet, POLICY)
    flaky_cloud = Rollout(outcomes={"ready": 110, "launch_failures": 5})   # 33% since then
    assert ro.fallback_reason(cand, flaky_cloud, POLICY) is None
    small = Rollout(phase=ROLLING, outcomes={"launch_failures": 9})
    assert ro.fallback_reason(small, quiet, POLICY) is None         # below the minimum sample
    assert ro.fallback_reason(cand, quiet, RolloutPolicy(fallback=False)) is None


phases = st.sampled_from([None, VALIDATING, ROLLING, CURRENT])
outcome_dicts = st.fixed_dictionaries({
    "ready": st.integers(0, 50), "launch_failures": st.integers(0, 50),
    "boot_timeouts": st.integers(0, 5), "keyscan_failures": st.integers(0, 5),
    "launches": st.integers(0, 100)})


@settings(max_examples=200, deadline=None)
@given(records=st.lists(st.tuples(phases, outcome_dicts, st.booleans()), min_size=1,
                        max_size=5),
       now=st.floats(0, 1e6), launched=st.integers(0, 100))
def test_never_withdraw_or_move_the_current_upload(records, now, launched):
    ups = []
    for n, (phase, outcomes, held) in enumerate(records):
        state = Rollout(phase=phase, outcomes=outcomes, held=held,
                        validation={"state": PENDING} if phase == VALIDATING else {})
        ups.append(up(n + 1, state if phase or any(outcomes.values()) else None))
    status = pair_status(ups, "img", "p", True)
    action = ro.plan_pair(status, POLICY, now, lambda u: launched, set())
    if action is not None:
        assert action.upload is status.candidate
        assert action.upload is not status.current
    if status.current is not None:
        assert ro.choose_upload(status, POLICY, lambda u: launched) in (status.current,
                                                                         status.candidate)


# -- validation results ----------------------------------------------------------------------------

def test_failed_validation_retries_with_backoff_then_withdraws():
    state = Rollout(phase=VALIDATING, validation={"state": RUNNING, "attempts": 0})
    assert ro.after_validation(state, POLICY, False, "exit 1", 100.0, 0) is None
    assert state.validation["state"] == PENDING and state.validation["next_try"] == 110.0
    # an attempt that could not run does not count, and backs off as well
    assert ro.after_validation(state, POLICY, False, "no node", 120.0, 0, counts=False) is None
    assert state.validation["attempts"] == 1 and state.validation["next_try"] > 120.0
    reason = ro.after_validation(state, POLICY, False, "exit 1", 200.0, 0)
    assert reason and "2 attempt" in reason and state.validation["state"] == FAILED


def test_passed_validation_starts_the_first_step():
    state = Rollout(phase=VALIDATING, validation={"state": RUNNING, "attempts": 1})
    assert ro.after_validation(state, POLICY, True, "ok", 100.0, 42) is None
    assert state.phase == ROLLING and state.step == 0
    assert state.validation["state"] == PASSED and state.step_base["current"] == 42


def test_operator_rollback_goes_one_step_back_and_holds():
    state = Rollout(phase=ROLLING, step=2)
    assert ro.rollback_step(state, 5.0) and state.step == 1 and state.held
    assert not ro.rollback_step(Rollout(phase=ROLLING, step=0), 5.0)
    assert not ro.rollback_step(Rollout(phase=CURRENT), 5.0)


def test_outcome_kinds_are_typed():
    from nodepool.errors import CloudError, LaunchTimeout
    assert ro.outcome_kind(CloudError("x"), "create") == "launch_failures"
    assert ro.outcome_kind(LaunchTimeout("x"), "create") == "boot_timeouts"
    assert ro.outcome_kind(LaunchTimeout("x"), "scan", "connect") == "boot_timeouts"
    assert ro.outcome_kind(LaunchTimeout("x"), "scan", "keyscan") == "keyscan_failures"


def test_ready_nodes_of_withdrawn_or_unvalidated_uploads_are_retired():
    from nodepool.model import Node
    old, cand = up(1), up(2, roll(phase=VALIDATING))
    gone = up(3, roll(phase="withdrawn"), state="deleting")
    other = up(4, provider="q")                       # a pair without rollout
    uploads = [old, cand, gone, other]
    bad = ro.unservable_paths(uploads, lambda image, provider: provider == "p")
    assert bad == {cand.path, gone.path}
    nodes = [Node(state="ready", image_id=cand.path, id="1"),
             Node(state="ready", image_id=gone.path, id="2", allocated_to="r"),
             Node(state="in-use", image_id=gone.path, id="3"),
             Node(state="ready", image_id=old.path, id="4"),
             Node(state="ready", image_id=other.path, id="5")]
    assert ro.nodes_to_retire(nodes, bad) == ["1"]
    # once rolling, the candidate's nodes serve like any other
    rolling = up(2, roll(phase=ROLLING))
    assert rolling.path not in ro.unservable_paths([old, rolling], lambda i, p: True)


def test_validation_requests_nobody_follows_are_swept_after_a_grace():
    from nodepool.model import NodeRequest
    followed = up(2, roll(phase=VALIDATING, validation={"state": RUNNING, "request": "100-1"}))

    def req(rid, requestor="nodepool-rollout", t=0.0):
        r = NodeRequest(requestor=requestor, created_time=t)
        r.id = rid
        return r
    reqs = [req("100-1"), req("100-2"), req("100-3", t=990.0), req("100-4", requestor="zuul")]
    assert ro.orphan_validation_requests(reqs, [up(1), followed], "nodepool-rollout",
                                         1000.0) == ["100-2"]
    # once the upload was promoted (or withdrawn) nobody follows its request any more
    promoted = up(2, roll(phase=CURRENT, validation={"state": RUNNING, "request": "100-1"}))
    assert ro.orphan_validation_requests(reqs, [up(1), promoted], "nodepool-rollout",
                                         1000.0) == ["100-1", "100-2"]


def test_only_unchecked_ready_stock_of_the_candidate_is_rechecked():
    from nodepool.model import Node
    nodes = [Node(state="ready", image_id="/c", id="1"),
             Node(state="ready", image_id="/c", id="2", allocated_to="r"),
             Node(state="ready", image_id="/c", id="3"),
             Node(state="building", image_id="/c", id="4"),
             Node(state="ready", image_id="/old", id="5")]
    assert [n.id for n in ro.nodes_to_recheck(nodes, "/c", {"3"})] == ["1"]


def test_withdrawals_not_yet_recorded_in_their_build_are_found():
    from nodepool.launcher.validation import unremembered_withdrawals
    from nodepool.model import ImageBuild
    gone = up(2, roll(phase="withdrawn", withdrawn_by="fallback", reason="bad"),
              state="deleting")
    build = ImageBuild(image="img", state="ready")
    build.id = "b2"
    assert unremembered_withdrawals([gone, up(1)], [build]) == [
        ("img", "b2", "p", "fallback: bad")]
    build.extra["withdrawn_from"] = ["p"]
    assert unremembered_withdrawals([gone], [build]) == []


def test_dashboard_shows_the_serving_upload_as_current_under_rollout():
    from nodepool.config.model import Config, DiskImage, Provider, ProviderDiskImage
    from nodepool.web.dashboard import image_table
    config = Config()
    config.diskimages["img"] = DiskImage(name="img", rollout=POLICY)
    config.providers["p"] = Provider(name="p", driver="simulated",
                                     diskimages={"img": ProviderDiskImage("img")})
    a, b, c = up(1), up(2, roll(phase=CURRENT)), up(3, roll(phase=VALIDATING))
    row = image_table([a, b, c], 2000.0, config)[0]
    assert row["current"]["build"] == "b2" and row["previous"]["build"] == "b1"
    assert row["candidate"]["build"] == "b3"
    plain = image_table([a, b, c], 2000.0)[0]              # no rollout: newest is current
    assert plain["current"]["build"] == "b3" and "candidate" not in plain
