"""``nodepool wait-times``: how long requests waited per label, and how often the ready pool
served them (warm hits), over a recent window, read from every launcher's record in the store."""
import json

import prettytable

from .. import waits
from .common import arg, command


def _secs(value):
    return "-" if value is None else f"{value:.1f}"


def wait_rows(store, now, window, by_provider=False):
    """The summary rows (dicts) of ``waits.summarize`` for the launchers registered in ``store``."""
    rows = waits.summarize(waits.read_waits(store.list_components("launcher")), now, window)
    return [r for r in rows if (r["provider"] is not None) == by_provider]


@command("wait-times", "per label: p50/p95 request wait and warm-hit ratio over a recent window", [
    arg("--window", type=float, default=3600, metavar="SECONDS",
        help="look back this many seconds (3600)"),
    arg("--by-provider", action="store_true", help="one row per label and provider"),
    arg("--json", action="store_true", help="print a JSON list of objects"),
])
def cmd_wait_times(ctx, args):
    rows = wait_rows(ctx.store, ctx.clock(), args.window, args.by_provider)
    if args.json:
        ctx.print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not rows:
        ctx.print(f"no request was fulfilled in the last {args.window:g}s")
        return 0
    table = prettytable.PrettyTable()
    names = ["Label"] + (["Provider"] if args.by_provider else []) + [
        "Requests", "Warm hits", "p50 wait (s)", "p95 wait (s)", "p50 warm", "p50 cold"]
    table.field_names = names
    table.align = "l"
    for r in rows:
        ratio = r["warm_ratio"]
        table.add_row([r["label"]] + ([r["provider"]] if args.by_provider else []) + [
            r["requests"], f"{ratio * 100:.0f}% ({r['warm']}/{r['requests']})",
            _secs(r["p50"]), _secs(r["p95"]), _secs(r["p50_warm"]), _secs(r["p50_cold"])])
    ctx.print(table.get_string())
    ctx.print(f"window: last {args.window:g}s; warm = every node came from the ready pool")
    return 0
