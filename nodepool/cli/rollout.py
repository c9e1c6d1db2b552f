"""Operator control of image rollout: ``image-list --rollout``, ``image-promote``,
``image-hold-rollout`` and ``image-rollback`` (docs/rollout.md).

Each command changes the candidate upload's rollout state by compare-and-set, exactly as the
launchers do; the launchers act on it in their next rollout pass.  ``image-delete`` remains the
manual revert (it withdraws an upload for good).
"""
from ..config.rollout import policy_for
from ..launcher import rollout as ro
from ..model.rollout import (CURRENT, ROLLING, VALIDATING, WITHDRAWN, Rollout, has_rollout,
                             pair_status)
from ..model.states import UploadState
from ..store.base import compare_and_set
from . import tables
from .common import CliError, arg, command

ROLLOUT_LIST = tables.Listing("image-list", (
    tables.Column("id", "Build ID"),
    tables.Column("upload_id", "Upload ID"),
    tables.Column("provider", "Provider"),
    tables.Column("image", "Image"),
    tables.Column("state", "State"),
    tables.Column("role", "Serves"),
    tables.Column("rollout", "Rollout"),
    tables.Column("validation", "Validation"),
    tables.Column("launches", "Launches"),
    tables.Column("failed", "Failed Attempts"),
    tables.Column("reason", "Reason"),
    tables.Column("age", "Age", "epoch_age"),
))


def rollout_rows(config, uploads, builds):
    """One row per upload: its role in its pair, rollout step, validation and outcomes.
    Withdrawn uploads show why; so do builds withdrawn from a provider whose upload record
    the builder has since deleted."""
    roles = {}
    pairs = {(u.image, u.provider) for u in uploads}
    for image, provider in pairs:
        status = pair_status(uploads, image, provider,
                             policy_for(config, image, provider) is not None)
        if status.current is not None:
            roles[id(status.current)] = "current"
        if status.candidate is not None:
            roles[id(status.candidate)] = "candidate"
        for u in status.superseded:
            roles[id(u)] = "superseded"
    rows = []
    for u in uploads:
        state = Rollout.of(u)
        policy = policy_for(config, u.image, u.provider)
        attempts, bad = ro.attempts_and_bad(state.outcomes)
        rows.append({
            "id": u.build_id, "upload_id": u.id, "provider": u.provider, "image": u.image,
            "state": tables._value(u.state), "role": roles.get(id(u), "-"),
            "rollout": ro.describe(state, policy) if has_rollout(u) else "-",
            "validation": ro.validation_text(state) if state.validation else "-",
            "launches": state.count("launches"),
            "failed": f"{bad}/{attempts}" if attempts else "-",
            "reason": (f"{state.withdrawn_by}: {state.reason}" if state.phase == WITHDRAWN
                       else state.validation.get("reason") or ""),
            "age": None if u.state_time is None else int(u.state_time),
        })
    recorded = {(u.image, u.build_id, u.provider) for u in uploads}
    for b in builds:
        for provider, reason in sorted((b.extra.get("withdrawn_reasons") or {}).items()):
            if (b.image, b.id, provider) not in recorded:
                rows.append({"id": b.id, "upload_id": None, "provider": provider,
                             "image": b.image, "state": "withdrawn", "role": "-",
                             "rollout": WITHDRAWN, "validation": "-", "launches": None,
                             "failed": "-", "reason": reason, "age": None})
    return rows


def show(ctx, args):
    now = ctx.clock()
    rows = rollout_rows(ctx.config, ctx.store.list_uploads(), ctx.store.list_builds())
    if getattr(args, "json", False):
        ctx.print(tables.render_json(ROLLOUT_LIST, rows))
    else:
        ctx.print(tables.render_text(ROLLOUT_LIST, rows, now))
    return 0


def _candidate(ctx, image, provider):
    policy = policy_for(ctx.config, image, provider)
    if policy is None:
        raise CliError(f"diskimage {image} has no rollout on provider {provider} in "
                       f"{ctx.config.path}: the newest ready upload serves")
    status = pair_status(ctx.store.list_uploads(image=image, provider=provider), image,
                         provider, True)
    if status.candidate is None:
        current = status.current.id if status.current is not None else "none"
        raise CliError(f"{image} on {provider} has no upload being validated or rolled out "
                       f"(current upload: {current}); to revert the current upload use "
                       f"image-delete")
    return status.candidate, policy


def _change(ctx, upload, change):
    def edit(record):
        if getattr(record.state, "value", record.state) != UploadState.READY.value:
            raise CliError(f"upload {record.id} is {getattr(record.state, 'value', record.state)}")
        state = Rollout.of(record)
        if change(state) is False:
            return False
        state.store(record)
    return compare_and_set(lambda: ctx.store.get_upload(upload.image, upload.build_id,
                                                        upload.provider, upload.id),
                           ctx.store.update_upload, edit) is not None


def _target(args):
    return [arg("image", help="diskimage name"), arg("provider", help="provider name")]


@command("image-promote", "make the upload being validated or rolled out current now "
         "(skips the remaining validation and steps)", _target(None))
def cmd_image_promote(ctx, args):
    upload, _ = _candidate(ctx, args.image, args.provider)
    now = ctx.clock()

    def promote(state):
        if state.phase == CURRENT:
            return False
        state.phase = CURRENT
        state.held = False
        if state.validation.get("state") not in (None, "passed"):
            state.validation = dict(state.validation, state="skipped", request=None)
        state.note(now, "promoted by an operator")
    _change(ctx, upload, promote)
    ctx.print(f"upload {upload.id} of {args.image} build {upload.build_id} is now current on "
              f"{args.provider}")
    return 0


@command("image-hold-rollout", "keep the rollout of an upload at its step (or release it)", [
    *_target(None),
    arg("--release", action="store_true", help="let the rollout advance again"),
])
def cmd_image_hold_rollout(ctx, args):
    upload, _ = _candidate(ctx, args.image, args.provider)
    now = ctx.clock()
    want = not args.release

    def hold(state):
        if state.held == want:
            return False
        state.held = want
        state.note(now, "held by an operator" if want else "released by an operator")
    _change(ctx, upload, hold)
    ctx.print(f"rollout of upload {upload.id} of {args.image} on {args.provider} "
              f"{'held' if want else 'released'}")
    return 0


@command("image-rollback", "move the rollout of an upload one step back, and hold it there",
         _target(None))
def cmd_image_rollback(ctx, args):
    upload, policy = _candidate(ctx, args.image, args.provider)
    state = Rollout.of(upload)
    if state.phase == VALIDATING:
        raise CliError(f"upload {upload.id} is still being validated and serves nothing; "
                       f"use image-delete to withdraw it")
    if state.phase == ROLLING and state.step == 0:
        raise CliError(f"upload {upload.id} is at its first step ({policy.steps[0]}%); use "
                       f"image-hold-rollout to keep it there or image-delete to withdraw it")
    now = ctx.clock()
    if not _change(ctx, upload, lambda s: ro.rollback_step(s, now)):
        raise CliError(f"upload {upload.id} changed meanwhile; look at image-list --rollout")
    step = Rollout.of(ctx.store.get_upload(upload.image, upload.build_id, upload.provider,
                                           upload.id)).step
    ctx.print(f"rollout of upload {upload.id} of {args.image} on {args.provider} back to step "
              f"{step + 1} ({policy.steps[step]}%), held")
    return 0
