"""What the builder should do now, decided from plain data.

Every function here takes the loaded ``Config``, lists of ``ImageBuild``/``ImageUpload`` records
and a few sets (pause flags, build requests, held locks) and returns small action objects.  The
daemon (``builder.py``) gathers that snapshot from the store and applies the actions; nothing in
this module touches the store, a cloud or the clock.

Retention rule (Nodepool's promise to operators): for every configured image-provider pair the
current and the next most recent ``ready`` upload are never deleted, nor are the two newest
``ready`` builds of a configured image; everything older, failed or abandoned is removed.
"""
from dataclasses import dataclass
from typing import Optional

from ..model.images import (newest_ready_build, parse_build_file_name, provider_image_format,
                            ready_builds)
from ..config.rollout import policy_for
from ..model.rollout import pair_status
from ..model.states import BuildState, UploadState
from ..store.base import image_build_lock_path, upload_lock_path

KEEP_BUILDS = 2
KEEP_UPLOADS = 2


def _state(record):
    return str(getattr(record.state, "value", record.state))


@dataclass(frozen=True)
class BuildNeeded:
    """Build ``image`` now; ``manual`` when an operator asked (``nodepool image-build``)."""
    image: str
    reason: str
    manual: bool = False


@dataclass(frozen=True)
class UploadNeeded:
    """Upload ``build_id`` of ``image`` to ``provider`` as its ``format`` file."""
    image: str
    build_id: str
    provider: str
    format: str


@dataclass(frozen=True)
class DeleteUpload:
    """Mark the upload ``deleting``, delete its cloud image, then its record."""
    image: str
    build_id: str
    provider: str
    upload_id: str
    reason: str


@dataclass(frozen=True)
class DeleteBuild:
    """Mark the build ``deleting`` and remove its local files; remove its record once it has no
    upload records left (their deletion is planned alongside)."""
    image: str
    build_id: str
    reason: str


def buildable_images(config):
    """Configured diskimages that can be built at all: not abstract, with at least one format."""
    return {name: d for name, d in config.diskimages.items() if not d.abstract and d.formats}


def image_paused(config, name, paused_images):
    image = config.diskimages.get(name)
    return bool(image is not None and image.pause) or name in paused_images


# -- builds -----------------------------------------------------------------------------------------

def images_needing_build(config, builds, paused_images=(), build_requests=(), now=0.0):
    """Images to build now, manual requests first.

    An image is built when an operator asked for it, when it has no ``ready`` build, when its
    newest ready build is older than ``rebuild-age``, or when that build lacks a format the
    config now needs.  Never for an abstract image, one without formats, or one paused in the
    config or by the store's pause flag.  A failed build leaves no ready build, so the next cycle
    tries again.  ``build_requests`` holds the image names with a pending manual request.
    """
    paused_images = set(paused_images)
    manual, scheduled = [], []
    for name, image in sorted(buildable_images(config).items()):
        if image_paused(config, name, paused_images):
            continue
        if name in build_requests:
            manual.append(BuildNeeded(name, "requested by an operator", manual=True))
            continue
        newest = newest_ready_build(builds, name)
        if newest is None:
            scheduled.append(BuildNeeded(name, "no ready build"))
        elif now - (newest.state_time or 0) > image.rebuild_age:
            scheduled.append(BuildNeeded(name, f"newest ready build {newest.id} is older than "
                                               f"rebuild-age {image.rebuild_age}s"))
        elif not set(image.formats) <= set(newest.format_list):
            missing = ",".join(sorted(set(image.formats) - set(newest.format_list)))
            scheduled.append(BuildNeeded(name, f"newest ready build {newest.id} lacks "
                                               f"format {missing}"))
    return manual + scheduled


# -- uploads ----------------------------------------------------------------------------------------

WITHDRAWN_KEY = "withdrawn_from"


def withdrawn_providers(build):
    """Providers an operator withdrew this build from (``nodepool image-delete`` of its upload).

    Kept in the build record (an extra JSON key other programs ignore), so that reverting a bad
    image by deleting its upload is not undone by the next upload pass."""
    return set(build.extra.get(WITHDRAWN_KEY) or [])

def uploads_needed(config, builds, uploads, local_build_ids=None):
    """(build, provider) uploads to make: the newest ready build of each image, to every provider
    listing the image whose provider diskimage is not paused and whose format the build has, when
    that pair has no ``ready`` or ``uploading`` upload yet.

    ``local_build_ids``, when given, limits uploads to builds whose files are on this builder.
    """
    active = {(u.image, u.build_id, u.provider) for u in uploads
              if _state(u) in (UploadState.READY.value, UploadState.UPLOADING.value)}
    images = buildable_images(config)
    needed = []
    for prov_name, prov in sorted(config.providers.items()):
        fmt = provider_image_format(prov)
        for name, pimage in sorted(prov.diskimages.items()):
            if pimage.pause or name not in images:
                continue
            build = newest_ready_build(builds, name)
            if build is None or fmt not in build.format_list:
                continue
            if local_build_ids is not None and build.id not in local_build_ids:
                continue
            if (name, build.id, prov_name) in active:
                continue
            if prov_name in withdrawn_providers(build):
                continue      # an operator deleted this build's upload here: do not bring it back
            needed.append(UploadNeeded(name, build.id, prov_name, fmt))
    return needed


# -- retention --------------------------------------------------------------------------------------

def lock_paths_to_probe(builds, uploads):
    """The lock paths ``plan_retention`` needs to know about (ask the store which are held)."""
    paths = {image_build_lock_path(b.image) for b in builds
             if _state(b) == BuildState.BUILDING.value}
    paths |= {upload_lock_path(u.image, u.build_id, u.provider) for u in uploads
              if _state(u) == UploadState.UPLOADING.value}
    return paths


def listed_pairs(config):
    """(image, provider) pairs the config still uploads: a configured, buildable image listed by
    the provider's ``diskimages``."""
    images = buildable_images(config)
    return {(name, prov_name) for prov_name, prov in config.providers.items()
            for name in prov.diskimages if name in images}


def kept_builds(config, builds):
    """Ids of the builds retention keeps: the two newest ready builds of each configured image."""
    kept = set()
    for name in buildable_images(config):
        kept |= {b.id for b in ready_builds(builds, name)[:KEEP_BUILDS]}
    return kept


def kept_uploads(config, builds, uploads):
    """Keys ``(image, build_id, provider, upload_id)`` of the two newest ready uploads of each
    listed image-provider pair, across the image's ready builds."""
    ready_build_ids = {(b.image, b.id) for b in ready_builds(builds)}
    pairs = listed_pairs(config)
    by_pair = {}
    for u in uploads:
        if (_state(u) == UploadState.READY.value and (u.image, u.build_id) in ready_build_ids
                and (u.image, u.provider) in pairs):
            by_pair.setdefault((u.image, u.provider), []).append(u)
    kept = set()
    for (image, provider), pair_uploads in by_pair.items():
        pair_uploads.sort(key=lambda u: (u.state_time or 0, u.id or ""), reverse=True)
        kept |= {_upload_key(u) for u in pair_uploads[:KEEP_UPLOADS]}
        if policy_for(config, image, provider) is not None:
            # under rollout the upload that serves may be older than the two newest (newer
            # candidates are still validating or rolling out): it stays while it serves
            current = pair_status(pair_uploads, image, provider, True).current
            if current is not None:
                kept.add(_upload_key(current))
    return kept


def _upload_key(upload):
    return (upload.image, upload.build_id, upload.provider, upload.id)


def _upload_deletion_reason(upload, build, pairs, kept_build_ids, kept_upload_keys, held_locks):
    """Why this upload should go, or None to keep it."""
    state = _state(upload)
    if state == UploadState.DELETING.value:
        return "marked deleting"
    if state == UploadState.FAILED.value:
        return "upload failed"
    if state == UploadState.UPLOADING.value:
        if upload_lock_path(upload.image, upload.build_id, upload.provider) in held_locks:
            return None
        return "abandoned upload (its lock is free)"
    if state != UploadState.READY.value:
        return None                      # a state from a newer program: do not judge
    if _upload_key(upload) in kept_upload_keys:
        return None
    if (upload.image, upload.provider) not in pairs:
        return "provider no longer lists the image"
    if build is None or build.id not in kept_build_ids:
        return "older than the two newest ready uploads"
    return None


def plan_retention(config, builds, uploads, held_locks=()):
    """Deletions that keep images tidy: uploads first, then builds.

    ``held_locks`` is the set of lock paths (from ``lock_paths_to_probe``) someone holds: a
    ``building`` build whose image build lock is held, or an ``uploading`` upload whose upload
    lock is held, is in progress and left alone; with the lock free it was abandoned by a dead
    builder and is removed.
    """
    held_locks = set(held_locks)
    pairs = listed_pairs(config)
    kept_build_ids = kept_builds(config, builds)
    kept_upload_keys = kept_uploads(config, builds, uploads)
    builds_by_key = {(b.image, b.id): b for b in builds}
    uploads_by_build = {}
    for u in uploads:
        uploads_by_build.setdefault((u.image, u.build_id), []).append(u)

    actions = []
    doomed_uploads = set()
    for u in sorted(uploads, key=lambda u: (u.image, u.build_id, u.provider, u.id or "")):
        reason = _upload_deletion_reason(u, builds_by_key.get((u.image, u.build_id)), pairs,
                                         kept_build_ids, kept_upload_keys, held_locks)
        if reason:
            actions.append(DeleteUpload(u.image, u.build_id, u.provider, u.id, reason))
            doomed_uploads.add(_upload_key(u))

    images = buildable_images(config)
    for b in sorted(builds, key=lambda b: (b.image, b.state_time or 0, b.id or "")):
        reason = _build_deletion_reason(b, images, kept_build_ids, held_locks)
        if reason is None:
            continue
        remaining = [u for u in uploads_by_build.get((b.image, b.id), [])
                     if _upload_key(u) not in doomed_uploads]
        if remaining:
            continue                     # it still carries a kept or in-progress upload
        actions.append(DeleteBuild(b.image, b.id, reason))
    return actions


def action_key(action):
    """The record a deletion is about, to find the same decision in a fresh plan."""
    if isinstance(action, DeleteUpload):
        return ("upload", action.image, action.build_id, action.provider, action.upload_id)
    return ("build", action.image, action.build_id)


def replanned(action, fresh_actions):
    """``action`` as a plan made from a fresher snapshot decides it (its reason may have
    changed), or None when that plan keeps the record.  A deletion planned from one snapshot
    must be confirmed by a newer one before it is applied: records change between the two."""
    key = action_key(action)
    return next((a for a in fresh_actions if action_key(a) == key), None)


def _build_deletion_reason(build, images, kept_build_ids, held_locks):
    state = _state(build)
    if state == BuildState.BUILDING.value:
        if image_build_lock_path(build.image) in held_locks:
            return None
        return "abandoned build (its image build lock is free)"
    if state == BuildState.DELETING.value:
        return "marked deleting"
    if state == BuildState.FAILED.value:
        return "build failed"
    if state != BuildState.READY.value:
        return None
    if build.image not in images:
        return "image no longer in the configuration"
    if build.id in kept_build_ids:
        return None
    return "older than the two newest ready builds"


# -- local files ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DropFormat:
    """Remove one format's local file of a ready build (``delete-after-upload``)."""
    image: str
    build_id: str
    format: str


def formats_to_drop(config, builds, uploads):
    """Local format files ``delete-after-upload`` lets go: for a ready build of such an image,
    a format (not in ``keep-formats``) that every provider uploading in it has a ``ready`` upload
    of this build in.  Formats no provider uploads are kept."""
    ready_pairs = {(u.image, u.build_id, u.provider) for u in uploads
                   if _state(u) == UploadState.READY.value}
    drops = []
    for b in sorted(builds, key=lambda b: (b.image, b.id or "")):
        image = config.diskimages.get(b.image)
        if image is None or not image.delete_after_upload or _state(b) != BuildState.READY.value:
            continue
        for fmt in b.format_list:
            if fmt in (image.keep_formats or []):
                continue
            users = [name for name, prov in config.providers.items()
                     if b.image in prov.diskimages and provider_image_format(prov) == fmt]
            if users and all((b.image, b.id, p) in ready_pairs for p in users):
                drops.append(DropFormat(b.image, b.id, fmt))
    return drops


def local_files_to_remove(file_names, builds):
    """Names (in images-dir) of build files whose build is gone, failed or being deleted.

    Files of ``building`` and ``ready`` builds stay; names that are not build files (such as
    ``builder_id.txt``) are never touched.
    """
    states = {(b.image, b.id): _state(b) for b in builds}
    doomed = []
    for name in sorted(file_names):
        parsed = parse_build_file_name(name)
        if parsed is None:
            continue
        state: Optional[str] = states.get(parsed)
        if state is None or state in (BuildState.FAILED.value, BuildState.DELETING.value):
            doomed.append(name)
    return doomed
