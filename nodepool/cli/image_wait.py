"""``nodepool image-build IMAGE --wait``: follow a requested build and its uploads to the end,
with a progress line on a terminal (nothing extra when piped)."""
import time

from .common import CliError
from .progress import Progress

POLL_SECONDS = 1.0


def _state(record):
    return getattr(record.state, "value", record.state)


def upload_targets(config, image):
    """Providers that should receive an upload of ``image`` (they list it and are not paused)."""
    out = []
    for name, prov in config.providers.items():
        pdimg = prov.diskimages.get(image) if prov.manages_images else None
        if pdimg is not None and not pdimg.pause:
            out.append(name)
    return sorted(out)


def build_progress(build, uploads, targets):
    """(finished, exit code or None, text) of a build and its uploads so far."""
    if build is None:
        return False, None, "requested; waiting for a builder to start it"
    state = _state(build)
    short = build.id[:8]
    if state == "failed":
        return True, 1, f"build {short} failed"
    if state != "ready":
        return False, None, f"build {short} {state}"
    ready = sorted({u.provider for u in uploads if _state(u) == "ready"} & set(targets))
    uploading = sorted({u.provider for u in uploads if _state(u) == "uploading"})
    failed = sorted({u.provider for u in uploads if _state(u) == "failed"} - set(ready))
    if set(ready) >= set(targets):
        where = ", ".join(ready) or "no provider"
        return True, 0, f"build {short} ready; uploaded to {where}"
    text = f"build {short} ready; uploads {len(ready)}/{len(targets)} ready"
    if uploading:
        text += f", uploading to {', '.join(uploading)}"
    if failed:
        text += f", failed on {', '.join(failed)} (the builder retries)"
    return False, None, text


def wait_for_build(ctx, image, builds_before, timeout, sleep=time.sleep):
    """Wait for the first build of ``image`` not in ``builds_before`` and its uploads."""
    targets = upload_targets(ctx.config, image)
    deadline = time.monotonic() + timeout
    with Progress(ctx.err) as progress:
        while True:
            new = [b for b in ctx.store.list_builds(image) if b.id not in builds_before]
            build = min(new, key=lambda b: b.state_time or 0) if new else None
            uploads = ctx.store.list_uploads(image, build.id) if build is not None else []
            finished, rc, text = build_progress(build, uploads, targets)
            if finished:
                progress.clear()
                ctx.print(f"image {image}: {text}")
                return rc
            if time.monotonic() >= deadline:
                progress.clear()
                raise CliError(f"image {image}: not finished within {timeout:g}s ({text})")
            progress.update(f"image {image}: {text}")
            sleep(POLL_SECONDS)
