"""Pure questions about image builds and uploads, shared by the builder, launcher and CLI.

"Newest" is always by ``state_time`` (the time the record reached its state), as Nodepool does:
the newest ``ready`` upload of an image to a provider is the one new nodes boot from, so deleting
it by hand makes the previous one current again.
"""
import os
import re

from .states import BuildState, UploadState

DEFAULT_IMAGE_FORMAT = "qcow2"

# Local build files are ``<image>-<build_id><suffix>``; build ids are uuid4 hex (Nodepool >= 8)
# or 10-digit sequences (older builds).
_BUILD_FILE = re.compile(r"^(?P<image>.+)-(?P<build_id>[0-9a-f]{32}|[0-9]{10})(?P<suffix>\..*)?$")


def _is(record, state):
    return str(getattr(record.state, "value", record.state)) == state.value


def _newest_first(records):
    return sorted(records, key=lambda r: (r.state_time or 0, r.id or ""), reverse=True)


def ready_builds(builds, image=None):
    """``ready`` builds (of ``image``, or of all images), newest first."""
    return _newest_first(b for b in builds
                         if _is(b, BuildState.READY) and (image is None or b.image == image))


def newest_ready_build(builds, image):
    """The newest ``ready`` build of ``image``, or None."""
    ready = ready_builds(builds, image)
    return ready[0] if ready else None


def ready_uploads(uploads, image, provider):
    """``ready`` uploads of ``image`` to ``provider`` (across all builds), newest first."""
    return _newest_first(u for u in uploads if _is(u, UploadState.READY)
                         and u.image == image and u.provider == provider)


def newest_ready_upload(uploads, image, provider):
    """The upload new nodes of ``image`` on ``provider`` boot from: the newest ``ready`` one."""
    ready = ready_uploads(uploads, image, provider)
    return ready[0] if ready else None


def provider_image_format(provider):
    """The disk format a provider wants uploads in (driver option ``image-format``)."""
    return (provider.options or {}).get("image-format") or DEFAULT_IMAGE_FORMAT


def build_base_path(images_dir, image, build_id):
    """``<images-dir>/<image>-<build_id>``: the ``-o`` argument of the build command."""
    return os.path.join(images_dir, f"{image}-{build_id}")


def build_file_path(images_dir, image, build_id, fmt):
    """The local file of one format of a build (the format name is the file extension)."""
    return f"{build_base_path(images_dir, image, build_id)}.{fmt}"


def parse_build_file_name(name):
    """``(image, build_id)`` of a local build file or manifest dir name, or None for others."""
    match = _BUILD_FILE.match(name)
    if not match:
        return None
    return match.group("image"), match.group("build_id")
