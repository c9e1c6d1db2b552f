"""``export-image-data`` / ``import-image-data``: back up and restore the image records.

The file is Nodepool's: a JSON object mapping each record's ZooKeeper path to its JSON text,
for every build, upload and pause flag, so a file written by Nodepool 11 imports here and the
other way round, whichever store each side runs on.  Import is meant for an empty (or freshly
rebuilt) store while the builders are stopped: it checks the whole file first and writes
nothing if any entry is malformed or already exists.
"""
import json
import os

from ..model.records import ImageBuild, ImageUpload
from ..store.zk import paths as P
from .common import CliError, arg, command


def _records(store):
    """Every (path, JSON text) of builds, uploads and pause flags, in creation order."""
    out = {}
    for build in store.list_builds():
        out[P.build_path(build.image, build.id)] = json.dumps(build.to_dict())
    for upload in store.list_uploads():
        path = P.upload_path(upload.image, upload.build_id, upload.provider, upload.id)
        out[path] = json.dumps(upload.to_dict())
    for image in store.list_image_names():
        if store.is_image_paused(image):
            out[P.pause_path(image)] = ""
    return out


@command("export-image-data", "write every image build, upload and pause flag to a JSON file", [
    arg("path", help="file to write (created with mode 0600)"),
])
def cmd_export_image_data(ctx, args):
    data = _records(ctx.store)
    fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    ctx.print(f"exported {len(data)} image record(s) to {args.path}")
    return 0


def _parse(path, text, source):
    """One entry of the file as ("build", ImageBuild) / ("upload", ImageUpload) /
    ("pause", image); CliError naming the entry when it is not one of those."""
    what = P.parse_image_path(path) if isinstance(path, str) else None
    if what is None:
        raise CliError(f"{source}: {path!r} is not an image build, upload or pause path")
    if what[0] == "pause":
        return ("pause", what[1])
    try:
        fields = json.loads(text) if isinstance(text, str) else None
    except ValueError as exc:
        raise CliError(f"{source}: {path}: not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise CliError(f"{source}: {path}: the record is not a JSON object")
    if what[0] == "build":
        record = ImageBuild.from_dict(fields, id=what[2])
        record.image = what[1]
        return ("build", record)
    record = ImageUpload.from_dict(fields, id=what[4])
    record.image, record.build_id, record.provider = what[1], what[2], what[3]
    return ("upload", record)


@command("import-image-data", "restore image builds, uploads and pause flags from "
                              "export-image-data's file", [
    arg("path", help="file written by export-image-data (ours or Nodepool's)"),
])
def cmd_import_image_data(ctx, args):
    try:
        with open(args.path) as f:
            data = json.load(f)
    except OSError as exc:
        raise CliError(f"cannot read {args.path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"{args.path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CliError(f"{args.path}: expected a JSON object of path -> record")
    entries = [_parse(path, text, args.path) for path, text in data.items()]
    builds = [r for kind, r in entries if kind == "build"]
    uploads = sorted((r for kind, r in entries if kind == "upload"),
                     key=lambda u: (u.image, u.build_id, u.provider, int(u.id)))
    pauses = [r for kind, r in entries if kind == "pause"]
    store = ctx.store
    build_keys = {(b.image, b.id) for b in builds}
    problems = [f"build {b.image}-{b.id} already exists" for b in builds
                if store.get_build(b.image, b.id) is not None]
    problems += [f"upload {u.id} of {u.image}-{u.build_id} on {u.provider} already exists"
                 for u in uploads if store.get_upload(u.image, u.build_id, u.provider, u.id)]
    problems += [f"upload {u.id} of {u.image}-{u.build_id} on {u.provider}: its build is "
                 f"neither in the file nor in the store" for u in uploads
                 if (u.image, u.build_id) not in build_keys
                 and store.get_build(u.image, u.build_id) is None]
    if problems:
        raise CliError(f"{args.path}: nothing imported: " + "; ".join(problems))
    for build in builds:
        store.create_build(build)
    for upload in uploads:
        store.restore_upload(upload)
    for image in pauses:
        store.set_image_paused(image, True)
    ctx.print(f"imported {len(builds)} build(s), {len(uploads)} upload(s) and "
              f"{len(pauses)} pause flag(s) from {args.path}")
    return 0
