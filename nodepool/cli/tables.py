"""Listings shared by the ``nodepool`` CLI and the status web app.

One place defines, for each listing, its columns (text heading and JSON key) and how a record
becomes a row.  A row is a dict keyed by JSON key holding the JSON value; the text renderer turns
values into cells (lists comma-joined, epoch ages as ``DD:HH:MM:SS``).  So ``nodepool list --json``
and ``GET /node-list`` with ``Accept: application/json`` print the very same objects, and a text
table and its JSON twin can never disagree about columns.

The row builders and renderers are pure (records and a clock reading in, rows and strings out);
``read_listing`` at the end is the one place that reads a store to feed them.
"""
import json
from dataclasses import dataclass

import prettytable

from ..model.states import BuildState, UploadState


@dataclass(frozen=True)
class Column:
    key: str            # JSON key
    heading: str        # text table heading
    kind: str = "text"  # text | list | epoch_age | age | bool | port | hours


@dataclass(frozen=True)
class Listing:
    name: str
    columns: tuple

    @property
    def keys(self):
        return [c.key for c in self.columns]

    def select(self, fields):
        """The columns named by ``fields`` (JSON keys or headings), in the order given.

        Raises ValueError naming every unknown field."""
        if not fields:
            return list(self.columns)
        by_name = {c.key: c for c in self.columns}
        by_name.update({c.heading.lower(): c for c in self.columns})
        chosen, unknown = [], []
        for f in fields:
            col = by_name.get(f) or by_name.get(f.lower())
            if col is None:
                unknown.append(f)
            elif col not in chosen:
                chosen.append(col)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} for {self.name}; "
                             f"known: {', '.join(self.keys)}")
        return chosen


NODE_COLUMNS = (
    Column("id", "ID"),
    Column("provider", "Provider"),
    Column("label", "Label", "list"),
    Column("server_id", "Server ID"),
    Column("public_ipv4", "Public IPv4"),
    Column("ipv6", "IPv6"),
    Column("state", "State"),
    Column("age", "Age", "age"),
    Column("locked", "Locked"),
)
NODE_DETAIL_COLUMNS = (
    Column("pool", "Pool"),
    Column("hostname", "Hostname"),
    Column("private_ipv4", "Private IPv4"),
    Column("AZ", "AZ"),
    Column("username", "Username"),
    Column("connection_port", "Port", "port"),
    Column("launcher", "Launcher"),
    Column("allocated_to", "Allocated To"),
    Column("hold_job", "Hold Job"),
    Column("comment", "Comment"),
    Column("user_data", "User Data"),
    Column("driver_data", "Driver Data"),
)

NODE_LIST = Listing("node-list", NODE_COLUMNS)
NODE_LIST_DETAIL = Listing("node-list", NODE_COLUMNS + NODE_DETAIL_COLUMNS)
IMAGE_LIST = Listing("image-list", (
    Column("id", "Build ID"),
    Column("upload_id", "Upload ID"),
    Column("provider", "Provider"),
    Column("image", "Image"),
    Column("external_name", "Provider Image Name"),
    Column("external_id", "Provider Image ID"),
    Column("state", "State"),
    Column("age", "Age", "epoch_age"),
))
# The 2014 (SQL era) snapshot-image columns, for old scripts that parse them.
LEGACY_IMAGE_LIST = Listing("image-list", (
    Column("id", "ID"),
    Column("provider", "Provider"),
    Column("image", "Image"),
    Column("hostname", "Hostname"),
    Column("version", "Version"),
    Column("image_id", "Image ID"),
    Column("server_id", "Server ID"),
    Column("state", "State"),
    Column("age", "Age (hours)", "hours"),
))
DIB_IMAGE_LIST = Listing("dib-image-list", (
    Column("id", "ID"),
    Column("image", "Image"),
    Column("builder", "Builder"),
    Column("formats", "Formats", "list"),
    Column("state", "State"),
    Column("age", "Age", "epoch_age"),
))
IMAGE_STATUS = Listing("image-status", (
    Column("image", "Image"),
    Column("paused", "Paused", "bool"),
    Column("build_request", "Build Request"),
    Column("build_request_age", "Build Request Age", "epoch_age"),
))
REQUEST_LIST = Listing("request-list", (
    Column("id", "Request ID"),
    Column("relative_priority", "Priority"),
    Column("state", "State"),
    Column("requestor", "Requestor"),
    Column("node_types", "Node Types", "list"),
    Column("nodes", "Nodes", "list"),
    Column("declined_by", "Declined By", "list"),
    Column("event_id", "Event ID"),
))
LABEL_LIST = Listing("label-list", (Column("label", "Label"),))
INFO_IMAGES = Listing("info-images", (
    Column("image", "Image Name"),
    Column("build_id", "Build ID"),
    Column("upload_ids", "Upload IDs", "list"),
))
INFO_NODES = Listing("info-nodes", (Column("id", "ID"), Column("server_id", "Server ID")))


# -- values ---------------------------------------------------------------------------------------

def _value(state):
    return getattr(state, "value", state)


def format_age(seconds):
    """``DD:HH:MM:SS`` for a duration in seconds (negative durations count as 0)."""
    seconds = max(0, int(seconds or 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def age_since(timestamp, now):
    """``DD:HH:MM:SS`` since ``timestamp`` (epoch seconds); empty when unknown."""
    if timestamp is None:
        return ""
    return format_age(now - timestamp)


def format_hours(seconds):
    """Hours with two decimals, as the 2014 CLI printed ages."""
    return f"{max(0.0, float(seconds or 0)) / 3600:.2f}"


def format_port(port):
    """Ports that are not plain integers (e.g. secrets in connection details) are not shown."""
    if isinstance(port, bool) or not isinstance(port, int):
        return "redacted"
    return str(port)


# kinds whose cell for a string value is that string (``format_cell``'s last line)
_STRINGS_AS_IS = frozenset({"text", "list", "age"})


def format_cell(column, value, now):
    """Render one JSON value as a text cell."""
    kind = column.kind
    if kind == "epoch_age":
        return "" if value is None else format_age(now - value)
    if kind == "hours":
        return format_hours(value)
    if kind == "port":
        return format_port(value)
    if kind == "bool":
        return str(bool(value))
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(_value(value))


# -- rows -----------------------------------------------------------------------------------------

def node_row(node, locked, now, detail=False):
    row = {
        "id": node.id,
        "provider": node.provider,
        "label": list(node.type),
        "server_id": node.external_id,
        "public_ipv4": node.public_ipv4,
        "ipv6": node.public_ipv6,
        "state": _value(node.state),
        "age": age_since(node.state_time, now),
        "locked": "locked" if locked else "unlocked",
    }
    if detail:
        row.update({
            "pool": node.pool,
            "hostname": node.hostname,
            "private_ipv4": node.private_ipv4,
            "AZ": node.az,
            "username": node.username,
            "connection_port": node.connection_port,
            "launcher": node.launcher,
            "allocated_to": node.allocated_to,
            "hold_job": node.hold_job,
            "comment": node.comment,
            "user_data": node.user_data,
            "driver_data": node.driver_data,
        })
    return row


def node_rows(nodes, locked_ids, now, detail=False):
    return [node_row(n, n.id in locked_ids, now, detail) for n in nodes]


def upload_row(upload):
    return {
        "id": upload.build_id,
        "upload_id": upload.id,
        "provider": upload.provider,
        "image": upload.image,
        "external_name": upload.external_name,
        "external_id": upload.external_id,
        "state": _value(upload.state),
        "age": None if upload.state_time is None else int(upload.state_time),
    }


def upload_rows(uploads):
    return [upload_row(u) for u in uploads]


def legacy_upload_rows(uploads, now):
    """Uploads in the 2014 columns.

    The newest ready upload of each (provider, image) is shown as ``current`` (the image new nodes
    boot from); the 2014 ``Hostname`` becomes the provider image name, ``Version`` the build id.
    There is no template server any more, so ``Server ID`` is empty.
    """
    current = {}
    for u in uploads:
        if _value(u.state) != UploadState.READY.value:
            continue
        key = (u.provider, u.image)
        best = current.get(key)
        if best is None or (u.state_time or 0) > (best.state_time or 0):
            current[key] = u
    current_ids = {id(u) for u in current.values()}
    rows = []
    for u in uploads:
        rows.append({
            "id": u.id,
            "provider": u.provider,
            "image": u.image,
            "hostname": u.external_name,
            "version": u.build_id,
            "image_id": u.external_id,
            "server_id": None,
            "state": "current" if id(u) in current_ids else _value(u.state),
            "age": None if u.state_time is None else now - u.state_time,
        })
    return rows


def build_row(build, paused):
    state = "paused" if paused else _value(build.state)
    return {
        "id": f"{build.image}-{build.id}",
        "image": build.image,
        "builder": build.builder,
        "formats": build.format_list,
        "state": state,
        "age": None if build.state_time is None else int(build.state_time),
    }


def build_rows(builds, paused_images):
    return [build_row(b, b.image in paused_images) for b in builds]


def image_status_row(image, paused, request_time, building):
    """``building`` when a build request is pending and a build of the image is in progress."""
    if request_time is None:
        build_request = None
    else:
        build_request = "building" if building else "pending"
    return {
        "image": image,
        "paused": bool(paused),
        "build_request": build_request,
        "build_request_age": None if request_time is None else int(request_time),
    }


def image_status_rows(images, paused_images, build_requests, builds):
    """One row per image name; ``build_requests`` maps image -> request time."""
    building = {b.image for b in builds if _value(b.state) == BuildState.BUILDING.value}
    return [image_status_row(i, i in paused_images, build_requests.get(i), i in building)
            for i in sorted(images)]


def request_row(request):
    return {
        "id": request.id,
        "relative_priority": request.relative_priority,
        "state": _value(request.state),
        "requestor": request.requestor,
        "node_types": list(request.node_types),
        "nodes": list(request.nodes),
        "declined_by": list(request.declined_by),
        "event_id": request.event_id,
    }


def request_rows(requests):
    return [request_row(r) for r in requests]


def supported_labels(components):
    """The sorted union of labels served by registered pool components."""
    labels = set()
    for c in components:
        if c.kind == "pool":
            labels.update(c.supported_labels or [])
    return sorted(labels)


def label_rows(components):
    return [{"label": label} for label in supported_labels(components)]


def info_image_rows(uploads):
    """``info PROVIDER``: one row per (image, build) with that provider's upload ids."""
    grouped = {}
    for u in uploads:
        grouped.setdefault((u.image, u.build_id), []).append(u.id)
    return [{"image": image, "build_id": build_id, "upload_ids": ids}
            for (image, build_id), ids in grouped.items()]


def info_node_rows(nodes):
    return [{"id": n.id, "server_id": n.external_id} for n in nodes]


# -- renderers ------------------------------------------------------------------------------------

PLAIN_TABLE_ROWS = 200     # from this many rows on, plain tables skip prettytable's per-cell work


def render_text(listing, rows, now, fields=None):
    """A left-aligned prettytable of ``rows`` (only ``fields`` columns, if given)."""
    columns = listing.select(fields)
    headings = [c.heading for c in columns]
    # a string in a column of these kinds is its own cell: no call per cell for those
    as_is = [c.kind in _STRINGS_AS_IS for c in columns]
    keys = [c.key for c in columns]
    cells = [[v if type(v) is str and plain else str(format_cell(c, v, now))
              for c, plain, v in zip(columns, as_is, map(row.get, keys))] for row in rows]
    if len(cells) >= PLAIN_TABLE_ROWS:
        text = plain_table(headings, cells)
        if text is not None:
            return text
    table = prettytable.PrettyTable(headings)
    table.align = "l"
    for row in cells:
        table.add_row(row)
    return table.get_string()


def plain_table(headings, rows):
    """prettytable's default left-aligned layout, laid out directly: with ten thousand nodes,
    prettytable's per-cell work (display widths, wrapping) was most of ``nodepool list``.
    None when a cell is not plain printable ASCII on one line (prettytable handles those);
    ``tests/unit/test_tables.py`` checks the output is prettytable's, character for character."""
    everything = "".join(headings) + "".join("".join(r) for r in rows)
    if not (everything.isascii() and everything.isprintable()):
        return None
    widths = [max(map(len, column)) for column in zip(headings, *rows)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    line = ("| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |").format   # ljust each cell
    out = [rule, line(*headings), rule]
    out.extend(line(*r) for r in rows)
    out.append(rule)
    return "\n".join(out)


def render_json(listing, rows, fields=None):
    """A JSON list of row objects (only ``fields`` keys, if given)."""
    keys = [c.key for c in listing.select(fields)]
    return json.dumps([{k: row.get(k) for k in keys} for row in rows], default=str)


# -- reading the store ----------------------------------------------------------------------------

def image_status_from_store(store, config=None):
    """Rows of ``image-status``: every image the store or the config knows."""
    images = set(store.list_image_names())
    if config is not None:
        images.update(config.buildable_images())
    paused = {i for i in images if store.is_image_paused(i)}
    requests = {}
    for image in images:
        when = store.get_image_build_request(image)
        if when is not None:
            requests[image] = when
    return image_status_rows(images, paused, requests, store.list_builds())


def read_listing(name, store, now, config=None, detail=False, node_id=None, legacy=False,
                 node_ids=None):
    """``(Listing, rows)`` for the listing ``name`` (the web path without ``/``; ``nodes`` is
    ``node-list``).  ``node_id`` / ``node_ids`` restrict the node listing.

    Raises KeyError for an unknown listing name."""
    if name in ("node-list", "nodes"):
        if node_ids is not None:
            nodes = [n for n in (store.get_node(i) for i in node_ids) if n is not None]
        else:
            nodes = store.list_nodes(shared=True)      # only read here
        if node_id is not None:
            nodes = [n for n in nodes if n.id == node_id]
        listing = NODE_LIST_DETAIL if detail else NODE_LIST
        return listing, node_rows(nodes, store.locked_node_ids(), now, detail)
    if name == "image-list":
        uploads = store.list_uploads()
        if legacy:
            return LEGACY_IMAGE_LIST, legacy_upload_rows(uploads, now)
        return IMAGE_LIST, upload_rows(uploads)
    if name == "dib-image-list":
        builds = store.list_builds()
        paused = {i for i in {b.image for b in builds} if store.is_image_paused(i)}
        return DIB_IMAGE_LIST, build_rows(builds, paused)
    if name == "image-status":
        return IMAGE_STATUS, image_status_from_store(store, config)
    if name == "request-list":
        return REQUEST_LIST, request_rows(store.list_requests())
    if name == "label-list":
        return LABEL_LIST, label_rows(store.list_components("pool"))
    raise KeyError(name)


LISTING_NAMES = ("node-list", "image-list", "dib-image-list", "image-status", "request-list",
                 "label-list")
