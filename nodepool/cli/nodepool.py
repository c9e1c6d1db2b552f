"""``nodepool``: the operator CLI.

It reads and changes the shared state store directly, like Nodepool's own CLI does with
ZooKeeper; the daemons pick the changes up (a node set to ``deleting`` is deleted by a launcher,
a build set to ``deleting`` by a builder).  Names, arguments and table columns follow Nodepool 11.

Each subcommand is one function registered in ``COMMANDS`` (see ``common.py``).  Errors are one
line on stderr and exit code 1 (2 for usage errors); ``--debug`` shows the traceback.
"""
import argparse
import importlib
import logging
import sys
import time
import traceback

from .. import __version__
from ..errors import ConfigError, LockError, NodepoolError
from ..gcpause import collector_paused
from ..model.states import BuildState, NodeState, UploadState
from ..builder.planner import WITHDRAWN_KEY, withdrawn_providers
from ..store.base import compare_and_set
from . import tables
from .common import (CLI_LOCK_IDENTIFIER, COMMANDS, LOCK_TIMEOUT, CliError, CommandContext, arg,
                     command)

# Modules that register more subcommands when they exist (e.g. the client's ``request``).
EXTRA_COMMAND_MODULES = ("nodepool.cli.request", "nodepool.cli.openstack_commands",
                         "nodepool.cli.image_data", "nodepool.cli.wait_times",
                         "nodepool.cli.rollout")

DELETE_NOW_POLL_MAX = 2.0


# -- helpers --------------------------------------------------------------------------------------

def _show(ctx, args, name, **options):
    """Print the listing ``name`` as a text table, or JSON with ``--json``.  (One burst of
    objects that all live until the table is printed: no cyclic collection meanwhile.)"""
    now = ctx.clock()
    config = ctx.config
    with collector_paused():
        listing, rows = tables.read_listing(name, ctx.store, now, config=config, **options)
        if getattr(args, "json", False):
            text = tables.render_json(listing, rows)
        else:
            text = tables.render_text(listing, rows, now)
    ctx.print(text)
    return 0


def _get_node(ctx, node_id):
    node = ctx.store.get_node(node_id)
    if node is None:
        raise CliError(f"node {node_id} not found")
    return node


def _lock_node(ctx, node_id):
    try:
        return ctx.store.lock_node(node_id, blocking=True, timeout=LOCK_TIMEOUT,
                                   identifier=CLI_LOCK_IDENTIFIER)
    except LockError:
        raise CliError(f"node {node_id} is locked by another process "
                       f"(not acquired within {LOCK_TIMEOUT}s); try again later")


def _print_node(ctx, node, locked, detail=False):
    now = ctx.clock()
    listing = tables.NODE_LIST_DETAIL if detail else tables.NODE_LIST
    ctx.print(tables.render_text(listing, [tables.node_row(node, locked, now, detail)], now))


def _known_image(ctx, image):
    """The config's diskimage ``image``; CliError if unknown."""
    diskimage = ctx.config.diskimages.get(image)
    if diskimage is None:
        known = ", ".join(sorted(ctx.config.buildable_images())) or "none"
        raise CliError(f"image {image!r} is not a diskimage in {ctx.config.path} (known: {known})")
    return diskimage


def _nodes_using(ctx, upload_paths):
    """Nodes (not being deleted) booted from any of the upload paths."""
    paths = set(upload_paths)
    gone = {NodeState.DELETING.value, NodeState.DELETED.value}
    return [n for n in ctx.store.list_nodes()
            if n.image_id in paths and getattr(n.state, "value", n.state) not in gone]


def _report_users(ctx, what, nodes):
    if nodes:
        ids = ", ".join(n.id for n in nodes)
        ctx.warn(f"note: {len(nodes)} node(s) still use {what}: {ids}")


def _mark_deleting(get, update, deleting, refuse):
    """Mark a build or upload ``deleting`` by compare-and-set (a builder may write it at the
    same moment); ``refuse(record)`` raises CliError when it must not be deleted now."""
    def change(record):
        refuse(record)
        if record.state == deleting:
            return False
        record.set_state(deleting)
    compare_and_set(get, update, change)


def _mark_upload_deleting(ctx, upload):
    def refuse(rec):
        if getattr(rec.state, "value", rec.state) == UploadState.UPLOADING.value:
            raise CliError(f"upload {rec.image}/{rec.build_id}/{rec.provider}/{rec.id} "
                           f"is still uploading; wait for it to finish or fail")

    _mark_deleting(lambda: ctx.store.get_upload(upload.image, upload.build_id, upload.provider,
                                                upload.id),
                   ctx.store.update_upload, UploadState.DELETING, refuse)

    def withdraw(build):
        # the builder must not upload this build to this provider again (a revert sticks)
        if upload.provider in withdrawn_providers(build):
            return False
        build.extra[WITHDRAWN_KEY] = sorted(withdrawn_providers(build) | {upload.provider})

    compare_and_set(lambda: ctx.store.get_build(upload.image, upload.build_id),
                    ctx.store.update_build, withdraw)
    ctx.print(f"upload {upload.id} of {upload.image} build {upload.build_id} on "
              f"{upload.provider} marked for deletion")
    _report_users(ctx, f"upload {upload.id}", _nodes_using(ctx, [upload.path]))


# -- node commands --------------------------------------------------------------------------------

@command("list", "list nodes", [
    arg("--detail", action="store_true", help="show more columns"),
    arg("--json", action="store_true", help="print a JSON list of objects"),
])
def cmd_list(ctx, args):
    return _show(ctx, args, "node-list", detail=args.detail)


@command("delete", "delete a node", [
    arg("id", help="node id"),
    arg("--now", action="store_true",
        help="delete the instance in the cloud now, from this process, and then the record"),
])
def cmd_delete(ctx, args):
    node = _get_node(ctx, args.id)
    lock = _lock_node(ctx, node.id)
    try:
        node = _get_node(ctx, node.id)        # re-read under the lock
        if args.now:
            _delete_now(ctx, node)
            _print_node(ctx, node, locked=False)
            return 0
        if node.state != NodeState.DELETING:
            node.set_state(NodeState.DELETING)
            ctx.store.update_node(node)
    finally:
        lock.release()
    _print_node(ctx, node, locked=False)
    return 0


def _delete_now(ctx, node):
    """Run the driver's delete state machine to completion, then remove the record."""
    from ..drivers import get_driver
    provider = ctx.config.providers.get(node.provider)
    if provider is None:
        raise CliError(f"node {node.id}: provider {node.provider!r} is not in "
                       f"{ctx.config.path}; cannot delete its instance (use delete without --now)")
    if node.state != NodeState.DELETING:
        # recorded first, so a launcher finishes the job if this process fails half way
        node.set_state(NodeState.DELETING)
        ctx.store.update_node(node)
    if node.external_id:
        try:
            adapter = get_driver(provider.driver).adapter(provider)
        except ValueError as exc:
            raise CliError(f"provider {provider.name}: {exc}")
        adapter.start()
        try:
            timeout = provider.options.get("delete-timeout", provider.launch_timeout)
            machine = adapter.delete_state_machine(node.external_id)
            deadline = time.monotonic() + timeout
            pause = 0.05
            while not machine.advance():
                if time.monotonic() > deadline:
                    raise CliError(f"node {node.id}: instance {node.external_id} on "
                                   f"{provider.name} not deleted within {timeout}s")
                time.sleep(pause)
                pause = min(pause * 2, DELETE_NOW_POLL_MAX)
        finally:
            adapter.stop()
    node.set_state(NodeState.DELETED)
    ctx.store.delete_node(node.id)


@command("hold", "hold a node (keep it until deleted by an operator)", [
    arg("id", help="node id"),
    arg("--reason", default=None, help="why the node is held (stored as its comment)"),
])
def cmd_hold(ctx, args):
    node = _get_node(ctx, args.id)
    with _lock_node(ctx, node.id):
        node = _get_node(ctx, node.id)
        try:
            node.set_state(NodeState.HOLD)
        except ValueError as exc:
            raise CliError(f"node {node.id} cannot be held: {exc}")
        if args.reason is not None:
            node.comment = args.reason
        ctx.store.update_node(node)
    _print_node(ctx, node, locked=False)
    return 0


@command("request-list", "list node requests", [
    arg("--json", action="store_true", help="print a JSON list of objects"),
])
def cmd_request_list(ctx, args):
    return _show(ctx, args, "request-list")


@command("label-list", "list labels served by running launcher pools", [
    arg("--json", action="store_true", help="print a JSON list of objects"),
])
def cmd_label_list(ctx, args):
    return _show(ctx, args, "label-list")


@command("info", "show the store's records of one provider", [
    arg("provider", help="provider name"),
])
def cmd_info(ctx, args):
    now = ctx.clock()
    uploads = ctx.store.list_uploads(provider=args.provider)
    nodes = [n for n in ctx.store.list_nodes() if n.provider == args.provider]
    if args.provider not in ctx.config.providers:
        ctx.warn(f"note: provider {args.provider!r} is not in {ctx.config.path}")
    ctx.print(tables.render_text(tables.INFO_IMAGES, tables.info_image_rows(uploads), now))
    ctx.print(tables.render_text(tables.INFO_NODES, tables.info_node_rows(nodes), now))
    return 0


@command("erase", "forget every upload and node record of a provider (no cloud calls)", [
    arg("provider", help="provider name"),
    arg("--force", action="store_true", help="do not ask for confirmation"),
])
def cmd_erase(ctx, args):
    store = ctx.store
    uploads = store.list_uploads(provider=args.provider)
    nodes = [n for n in store.list_nodes() if n.provider == args.provider]
    if not args.force:
        ctx.out.write(f"This removes {len(uploads)} upload record(s) and {len(nodes)} node "
                      f"record(s) of provider {args.provider} from the store; cloud resources "
                      f"are left alone. It cannot be undone.\nErase? [y/N] ")
        ctx.out.flush()
        answer = ctx.stdin.readline().strip().lower()
        if answer != "y":
            ctx.print("Not erased.")
            return 1
    for u in uploads:
        store.delete_upload(u.image, u.build_id, u.provider, u.id)
    for n in nodes:
        store.delete_node(n.id)
    ctx.print(f"Erased {len(uploads)} upload(s) and {len(nodes)} node(s) of provider "
              f"{args.provider}.")
    return 0


@command("config-validate", "validate the configuration file", [
    arg("--check-clouds", action="store_true",
        help="also load every provider's cloud configuration (clouds.yaml entry, profile, "
             "credentials) and report each one that cannot be loaded"),
], needs_store=False)
def cmd_config_validate(ctx, args):
    """The file only, like Nodepool's: a host without cloud credentials can validate it.
    ``--check-clouds`` adds what each provider's start would find."""
    try:
        from ..config import validate_config
    except ImportError:           # fall back to the loader's own checks
        from ..config import load_config as validate_config
    try:
        result = validate_config(ctx.config_path, ctx.secure_path)
    except ConfigError as exc:
        result = exc
    if not isinstance(result, (ConfigError, tuple, list)) and not hasattr(result, "problems"):
        result = None             # the loader returned a Config: nothing to report
    problems, warnings = _validation_outcome(result, ctx.config_path)
    for w in warnings:
        ctx.warn(f"warning: {w}")
    if args.check_clouds and not problems:
        from ..drivers import cloud_problems
        problems = cloud_problems(ctx.config)
    for p in problems:
        ctx.warn(p)
    if problems:
        ctx.print(f"Config is invalid: {len(problems)} problem(s)")
        return 1
    ctx.print("Config is valid")
    return 0


def _validation_outcome(result, path):
    """Normalise what ``validate_config`` returns into (problems, warnings) lists of strings.

    Accepts a ConfigError, a (problems, warnings) pair, an object with ``problems`` and
    ``warnings`` attributes, or a list of problems."""
    def lines(items):
        out = []
        for item in items or []:
            if isinstance(item, tuple) and len(item) == 2:
                key, message = item
                out.append(f"{path}: {key}: {message}" if key else f"{path}: {message}")
            else:
                out.append(str(item))
        return out

    if result is None:
        return [], []
    if isinstance(result, ConfigError):
        return lines(result.problems), []
    if isinstance(result, tuple) and len(result) == 2:
        return lines(result[0]), lines(result[1])
    if hasattr(result, "problems"):
        return lines(result.problems), lines(getattr(result, "warnings", []))
    return lines(result), []


# -- image commands -------------------------------------------------------------------------------

@command("image-list", "list image uploads", [
    arg("--json", action="store_true", help="print a JSON list of objects"),
    arg("--legacy", action="store_true",
        help="print the 2014 columns (ID, Provider, Image, Hostname, Version, Image ID, "
             "Server ID, State, Age (hours))"),
    arg("--rollout", action="store_true",
        help="print which upload serves, its rollout step, validation, outcomes and why an "
             "upload was withdrawn (docs/rollout.md)"),
])
def cmd_image_list(ctx, args):
    if args.rollout:
        from . import rollout
        return rollout.show(ctx, args)
    return _show(ctx, args, "image-list", legacy=args.legacy)


@command("dib-image-list", "list image builds", [
    arg("--json", action="store_true", help="print a JSON list of objects"),
])
def cmd_dib_image_list(ctx, args):
    return _show(ctx, args, "dib-image-list")


@command("image-status", "show pause flags and manual build requests", [
    arg("--json", action="store_true", help="print a JSON list of objects"),
])
def cmd_image_status(ctx, args):
    return _show(ctx, args, "image-status")


@command("image-build", "ask the builders to build an image now", [
    arg("image", help="diskimage name"),
    arg("--wait", action="store_true",
        help="wait until the build and its uploads are ready (progress shown on a terminal)"),
    arg("--timeout", type=float, default=28800, metavar="SECONDS",
        help="with --wait: give up after this long (28800)"),
])
def cmd_image_build(ctx, args):
    diskimage = _known_image(ctx, args.image)
    if diskimage.abstract:
        raise CliError(f"image {args.image!r} is abstract (a template); it is never built")
    if diskimage.pause:
        raise CliError(f"image {args.image!r} is paused in {ctx.config.path}")
    before = {b.id for b in ctx.store.list_builds(args.image)} if args.wait else set()
    ctx.store.request_image_build(args.image)
    ctx.print(f"build of {args.image} requested")
    if args.wait:
        from .image_wait import wait_for_build
        return wait_for_build(ctx, args.image, before, args.timeout)
    return 0


@command("image-delete", "mark an image upload for deletion", [
    arg("id", nargs="?", help="upload id (the 2014 form; must be unambiguous)"),
    arg("--provider", help="provider name"),
    arg("--image", help="image name"),
    arg("--build-id", help="build id"),
    arg("--upload-id", help="upload id"),
], aliases=("delete-image",))
def cmd_image_delete(ctx, args):
    full = (args.provider, args.image, args.build_id, args.upload_id)
    if args.id is None and not all(full):
        raise CliError("image-delete needs --provider, --image, --build-id and --upload-id "
                       "(or one upload id)")
    if args.id is not None and any(full):
        raise CliError("image-delete takes either an upload id or the four options, not both")
    if args.id is None:
        upload = ctx.store.get_upload(args.image, args.build_id, args.provider, args.upload_id)
        if upload is None:
            raise CliError(f"upload {args.upload_id} of {args.image} build {args.build_id} on "
                           f"{args.provider} not found")
    else:
        matches = [u for u in ctx.store.list_uploads() if u.id == args.id]
        if not matches:
            raise CliError(f"upload {args.id} not found")
        if len(matches) > 1:
            where = "; ".join(f"--provider {u.provider} --image {u.image} --build-id "
                              f"{u.build_id} --upload-id {u.id}" for u in matches)
            raise CliError(f"upload id {args.id} is ambiguous; use one of: {where}")
        upload = matches[0]
    _mark_upload_deleting(ctx, upload)
    return 0


@command("dib-image-delete", "mark an image build (and its uploads) for deletion", [
    arg("id", help="<image>-<build id>, as shown by dib-image-list"),
])
def cmd_dib_image_delete(ctx, args):
    image, sep, build_id = args.id.rpartition("-")
    if not sep or not image or not build_id:
        raise CliError(f"build {args.id!r} is not of the form <image>-<build id>")
    if ctx.store.get_build(image, build_id) is None:
        raise CliError(f"build {build_id} of image {image} not found")

    def refuse(build):
        if getattr(build.state, "value", build.state) == BuildState.BUILDING.value:
            raise CliError(f"build {args.id} is still building; wait for it to finish or fail")

    _mark_deleting(lambda: ctx.store.get_build(image, build_id), ctx.store.update_build,
                   BuildState.DELETING, refuse)
    ctx.print(f"build {args.id} marked for deletion")
    paths = [u.path for u in ctx.store.list_uploads(image=image, build_id=build_id)]
    _report_users(ctx, f"build {args.id}", _nodes_using(ctx, paths))
    return 0


@command("image-pause", "stop building an image", [arg("image", help="diskimage name")])
def cmd_image_pause(ctx, args):
    _known_image(ctx, args.image)
    ctx.store.set_image_paused(args.image, True)
    ctx.print(f"image {args.image} paused")
    return 0


@command("image-unpause", "resume building an image", [arg("image", help="diskimage name")])
def cmd_image_unpause(ctx, args):
    _known_image(ctx, args.image)
    ctx.store.set_image_paused(args.image, False)
    ctx.print(f"image {args.image} unpaused")
    return 0


# -- entry point ----------------------------------------------------------------------------------

def _load_extra_commands():
    for name in EXTRA_COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def build_parser():
    parser = argparse.ArgumentParser(
        prog="nodepool", description="Inspect and change the state of a Nodepool installation.")
    parser.add_argument("-c", dest="config", default="/etc/nodepool/nodepool.yaml",
                        help="path to the config file")
    parser.add_argument("-s", dest="secure", help="path to the secure config file")
    parser.add_argument("-l", dest="logconfig", help="path to a logging config file")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=f"nodepool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, aliases=cmd.aliases)
        for a, kw in cmd.arguments:
            p.add_argument(*a, **kw)
        p.set_defaults(_command=cmd)
    return parser


def _one_line(exc):
    if isinstance(exc, ConfigError):
        first = exc.describe().splitlines()[0] if exc.problems else str(exc)
        more = len(exc.problems) - 1
        return first + (f" (and {more} more problem(s); run config-validate)" if more > 0 else "")
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def main(argv=None, out=None, err=None, stdin=None):
    """Run one subcommand; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    _load_extra_commands()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:        # usage errors (2), --help/--version (0)
        return exc.code if isinstance(exc.code, int) else 2
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, stream=err)
    elif args.logconfig:
        from .launcher import setup_logging
        setup_logging(False, args.logconfig)
    else:
        logging.basicConfig(level=logging.WARNING, stream=err)
    ctx = CommandContext(args.config, args.secure, out=out, err=err,
                         stdin=stdin or sys.stdin)
    try:
        return args._command.func(ctx, args)
    except NodepoolError as exc:
        if args.debug:
            traceback.print_exc(file=err)
        print(f"nodepool: {_one_line(exc)}", file=err)
        return 1
    except KeyboardInterrupt:
        print("nodepool: interrupted", file=err)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc(file=err)
        print(f"nodepool: {args.command} failed: {type(exc).__name__}: {_one_line(exc)}",
              file=err)
        return 1
    finally:
        try:
            ctx.close()
        except Exception as exc:
            print(f"nodepool: closing the store failed: {_one_line(exc)}", file=err)


if __name__ == "__main__":
    sys.exit(main())
