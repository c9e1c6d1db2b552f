"""``nodepool request LABEL...``: get nodes from a script or a shell, the way Zuul does.

The nodes are requested, locked, marked ``in-use`` and printed; then, by default, returned as
``used`` (the launcher deletes them).  ``--run CMD`` runs a command while the nodes are held (their
details in ``NODEPOOL_NODES``, JSON, and ``NODEPOOL_NODE_IPS``, space separated) and returns them
when it exits, with its exit code; ``--use-for N`` keeps them N seconds; ``--hold REASON`` puts them
on hold for debugging instead of returning them.
"""
import json
import os
import subprocess
import time

from ..client import NodepoolClient, RequestFailed
from . import tables
from .common import CliError, arg, command
from .progress import Progress


@command("request", "request nodes, print them, and return them (or hold them)", arguments=[
    arg("labels", nargs="+", metavar="LABEL", help="labels of the nodes (one node per label)"),
    arg("--timeout", type=float, default=300, help="seconds to wait for fulfilment (300)"),
    arg("--priority", default="100", help="request priority, 3 digits, lower first (100)"),
    arg("--tenant", help="tenant name (for tenant-resource-limits)"),
    arg("--provider", help="preferred provider"),
    arg("--run", metavar="CMD", help="run CMD (via the shell) while holding the nodes"),
    arg("--use-for", type=float, default=0, metavar="SECONDS",
        help="keep the nodes in use this long before returning them"),
    arg("--hold", metavar="REASON", help="put the nodes on hold instead of returning them"),
    arg("--json", action="store_true", help="print the nodes as JSON"),
])
def cmd_request(ctx, args):
    if not (len(args.priority) == 3 and args.priority.isdigit()):
        raise CliError(f"--priority must be 3 digits, not {args.priority!r}")
    known = set(ctx.config.labels)
    unknown = [lbl for lbl in args.labels if lbl not in known]
    if unknown:
        ctx.warn(f"warning: label(s) not in this config: {', '.join(unknown)}")
    client = NodepoolClient(ctx.store, requestor="nodepool-cli")
    req = client.submit(args.labels, priority=args.priority, tenant_name=args.tenant,
                        provider=args.provider)
    started = time.monotonic()
    progress = Progress(ctx.err)

    def show(current):
        declined = (f", declined by {len(current.declined_by)} pool(s)"
                    if current.declined_by else "")
        progress.update(f"request {current.id} for {' '.join(args.labels)}: {current.state}"
                        f"{declined} (timeout {args.timeout:g}s)")
    try:
        with progress:
            req = client.wait(req.id, timeout=args.timeout, on_poll=show)
    except TimeoutError:
        client.cancel(req.id)
        raise CliError(f"request {req.id} for {' '.join(args.labels)} not fulfilled within "
                       f"{args.timeout:g}s; cancelled")
    try:
        nodes = client.accept(req)
    except RequestFailed as exc:
        raise CliError(str(exc))
    waited = time.monotonic() - started
    try:
        client.use(nodes, user_data={"requestor": "nodepool-cli"})
        listing, rows = tables.read_listing("nodes", ctx.store, ctx.clock(), detail=True,
                                            node_ids=[n.id for n in nodes])
        if args.json:
            ctx.print(tables.render_json(listing, rows))
        else:
            ctx.print(f"request {req.id} fulfilled in {waited:.2f}s")
            ctx.print(tables.render_text(listing, rows, ctx.clock()))
        rc = 0
        if args.run:
            env = dict(os.environ,
                       NODEPOOL_NODES=json.dumps([_node_env(n) for n in nodes]),
                       NODEPOOL_NODE_IPS=" ".join(n.interface_ip or "" for n in nodes))
            rc = subprocess.call(args.run, shell=True, env=env)
        if args.use_for > 0:
            time.sleep(args.use_for)
    except BaseException:
        client.release(nodes)
        raise
    if args.hold:
        client.release(nodes, hold=True, comment=args.hold)
        ctx.print(f"node(s) {', '.join(n.id for n in nodes)} held: {args.hold}")
    else:
        client.release(nodes)
        ctx.print(f"node(s) {', '.join(n.id for n in nodes)} returned as used")
    return rc


def _node_env(node):
    return {"id": node.id, "label": node.type[0] if node.type else None,
            "interface_ip": node.interface_ip, "username": node.username,
            "connection_port": node.connection_port, "host_keys": node.host_keys,
            "provider": node.provider}
