"""Nodepool 11's ZooKeeper layout: building and parsing paths (pure functions)."""

ROOT = "/nodepool"
NODE_ROOT = "/nodepool/nodes"
REQUEST_ROOT = "/nodepool/requests"
REQUEST_LOCK_ROOT = "/nodepool/requests-lock"
IMAGE_ROOT = "/nodepool/images"
COMPONENT_ROOT = "/nodepool/components"
COMPONENT_KINDS = ("launcher", "builder", "pool")


def node_path(node_id):
    return f"{NODE_ROOT}/{node_id}"


def request_path(request_id):
    return f"{REQUEST_ROOT}/{request_id}"


def image_path(image):
    return f"{IMAGE_ROOT}/{image}"


def builds_path(image):
    return f"{IMAGE_ROOT}/{image}/builds"


def build_path(image, build_id):
    return f"{IMAGE_ROOT}/{image}/builds/{build_id}"


def providers_path(image, build_id):
    return f"{build_path(image, build_id)}/providers"


def uploads_path(image, build_id, provider):
    return f"{build_path(image, build_id)}/providers/{provider}/images"


def upload_path(image, build_id, provider, upload_id):
    return f"{uploads_path(image, build_id, provider)}/{upload_id}"


def pause_path(image):
    return f"{IMAGE_ROOT}/{image}/pause"


def build_request_path(image):
    return f"{IMAGE_ROOT}/{image}/request-build"


def component_root(kind):
    return f"{COMPONENT_ROOT}/{kind}"


def classify(path):
    """What a changed znode is, for the caches: ``(kind, id)`` or ``(None, None)``.

    kinds: ``node`` (a node record), ``node-lock`` (its lock dir or a contender in it),
    ``request``, ``request-lock``.
    """
    parts = path.split("/")
    # ['', 'nodepool', <root>, <id>, ...]
    if len(parts) < 4 or parts[1] != "nodepool" or not parts[3]:
        return None, None
    root, record_id = parts[2], parts[3]
    if root == "nodes":
        if len(parts) == 4:
            return "node", record_id
        if parts[4] == "lock":
            return "node-lock", record_id
    elif root == "requests" and len(parts) == 4:
        return "request", record_id
    elif root == "requests-lock":
        return "request-lock", record_id
    return None, None


def parse_image_path(path):
    """The record an image-data path names (``export-image-data`` keys), or None:
    ``("build", image, build_id)``, ``("upload", image, build_id, provider, upload_id)`` or
    ``("pause", image)``."""
    parts = path.split("/")
    if len(parts) < 5 or parts[:3] != ["", "nodepool", "images"] or not parts[3]:
        return None
    image = parts[3]
    if len(parts) == 5 and parts[4] == "pause":
        return ("pause", image)
    if parts[4] != "builds" or len(parts) < 6 or not parts[5] or parts[5] == "lock":
        return None
    if len(parts) == 6:
        return ("build", image, parts[5])
    if len(parts) == 10 and parts[6] == "providers" and parts[7] and parts[8] == "images" \
            and parts[9].isdigit():
        return ("upload", image, parts[5], parts[7], parts[9])
    return None


def is_lock_contender(name):
    """A child created by kazoo's Lock (``<uuid>__lock__<seq>``) or ReadLock/WriteLock."""
    return "__lock__" in name or "__rlock__" in name
