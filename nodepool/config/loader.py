"""Load ``nodepool.yaml`` (and the optional secure file) into ``nodepool.config.model``.

Stages, each collecting every problem it finds before stopping: read the file and substitute
``%(NODEPOOL_*)`` variables; parse YAML; validate against the schema (common keys plus each
provider's driver keys); merge the secure file; then build the dataclasses and cross-check names.
A problem is ``(file, key_path, message)``; ``load_config`` raises them as one ``ConfigError``,
``validate_config`` returns them as lines for ``nodepool config-validate``.

Daemons notice edits by comparing ``Config.source_mtimes`` (see ``Config.files_changed``).
"""
import copy
import difflib
import math
import os
import re

import voluptuous as v
import yaml

from .. import drivers
from ..errors import ConfigError
from ..model.quota import Limits
from . import schema
from .rollout import build_policy
from .model import (BuilderSettings, CloudImage, Config, DiskImage, EmbeddedStore, Label,
                    LauncherSettings, Pool, PoolLabel, Provider, ProviderDiskImage, TenantLimit,
                    WebApp, ZooKeeperServer, ZooKeeperTLS)

ENV_REFERENCE = re.compile(r"%\((NODEPOOL_[A-Za-z0-9_]*)\)")

# diskimage keys a child does not take from its parent
NOT_INHERITED = ("name", "abstract", "parent", "metadata")

DISKIMAGE_DEFAULTS = {
    "elements": [], "release": None, "env-vars": {}, "formats": [], "rebuild-age": 86400,
    "build-timeout": 28800, "pause": False, "dib-cmd": "disk-image-create", "username": "zuul",
    "python-path": "auto", "shell-type": None, "abstract": False, "delete-after-upload": False,
    "keep-formats": [], "metadata": {}, "rollout": None,
}

TENANT_RESOURCE_NAMES = {"max-servers": "instances", "max-cores": "cores", "max-ram": "ram",
                         "max-volumes": "volumes", "max-volume-gb": "volume-gb"}

DEFAULT_IMAGE_FORMAT = "qcow2"


class ValidationReport(list):
    """What ``validate_config`` returns: problem lines (``file: key: message``), empty when the
    configuration is valid, plus ``warnings`` that do not make it invalid."""

    def __init__(self, problems=(), warnings=()):
        super().__init__(problems)
        self.warnings = list(warnings)

    @property
    def problems(self):
        return list(self)


def load_config(path, secure_path=None):
    """The ``Config`` in ``path`` (plus ``secure_path``); raises ``ConfigError`` listing every
    problem found."""
    config, problems = _load(path, secure_path)
    if problems:
        raise _config_error(path, problems)
    return config


def validate_config(path, secure_path=None):
    """Every problem of the configuration as one-line strings (empty when valid); the report's
    ``warnings`` lists what is suspicious but allowed."""
    config, problems = _load(path, secure_path)
    lines = [_line(f, key, msg) for f, key, msg in problems]
    return ValidationReport(lines, config.warnings if config is not None else [])


def _line(path, key, message):
    return f"{path}: {key}: {message}" if key else f"{path}: {message}"


def _config_error(path, problems):
    """One ``ConfigError`` for ``path``; problems of another file (the secure one) carry their
    file name in front of the key."""
    files = {f for f, _, _ in problems}
    if files == {str(path)} or len(files) > 1:
        owner = str(path)
    else:
        owner = files.pop()
    pairs = [(key if f == owner else (f"{f}: {key}" if key else f), msg)
             for f, key, msg in problems]
    return ConfigError(owner, pairs)


# -- reading --------------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""


def _construct_unique_mapping(loader, node, deep=False):
    # checked before flattening, as keys merged in by ``<<: *anchor`` may be overridden
    seen = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:
            pass            # unhashable key: construct_mapping reports it
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


def substitute_env(text, environ):
    """``text`` with ``%(NODEPOOL_X)`` replaced by ``environ['NODEPOOL_X']``, and the problems
    ``(key, message)`` for references to unset variables."""
    problems = []

    def replace(match):
        name = match.group(1)
        if name in environ:
            return environ[name]
        line = text.count("\n", 0, match.start()) + 1
        problems.append(("", f"line {line}: environment variable {name} is not set"))
        return match.group(0)

    return ENV_REFERENCE.sub(replace, text), problems


def read_document(path, environ=None):
    """The parsed top-level mapping of a YAML file and problems ``(key, message)``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None, [("", "file does not exist")]
    except IsADirectoryError:
        return None, [("", "is a directory, not a file")]
    except PermissionError:
        return None, [("", "file is not readable (permission denied)")]
    except UnicodeDecodeError as exc:
        return None, [("", f"file is not UTF-8 text ({exc.reason} at byte {exc.start})")]
    except OSError as exc:
        return None, [("", f"cannot read file: {exc.strerror or exc}")]
    text, problems = substitute_env(text, os.environ if environ is None else environ)
    if problems:
        return None, problems
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "malformed YAML"
        return None, [("", f"invalid YAML at {where}{what}")]
    except yaml.YAMLError as exc:
        return None, [("", f"invalid YAML: {exc}")]
    if data is None:
        return None, [("", "file is empty")]
    if not isinstance(data, dict):
        return None, [("", f"top level must be a mapping of keys, not a {_yaml_type(data)}")]
    return data, []


def _yaml_type(value):
    return {list: "list", str: "string", int: "number", float: "number",
            bool: "boolean"}.get(type(value), type(value).__name__)


def key_path(parts):
    """``['providers', 0, 'pools', 1, 'max-servers']`` -> ``providers[0].pools[1].max-servers``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _schema_problems(exc):
    problems = []
    for err in getattr(exc, "errors", [exc]):
        message = err.msg
        if message == "required key not provided":
            message = "required key is missing"
        elif message == "extra keys not allowed":
            message = "unknown key"
        problems.append((key_path(err.path), message))
    return problems


def validate_document(data, validator):
    """``(validated dict, problems)``; the dict is None when there are problems."""
    try:
        return validator(data), []
    except v.Invalid as exc:
        return None, _schema_problems(exc)


# -- the pipeline ---------------------------------------------------------------------------------

def _load(path, secure_path):
    """``(Config or None, [(file, key, message)])``."""
    path = str(path)
    problems = []
    data, found = read_document(path)
    if not found:
        document = data
        data, found = validate_document(copy.deepcopy(document), schema.config_schema())
        if found:
            found += cross_check_despite(path, document, found)
    problems += [(path, k, m) for k, m in found]

    secure = None
    if secure_path:
        secure_path = str(secure_path)
        secure, found = read_document(secure_path)
        if not found:
            secure, found = validate_document(secure, schema.secure_schema())
        problems += [(secure_path, k, m) for k, m in found]
    if problems:
        return None, problems

    base_dir = os.path.dirname(os.path.abspath(path))
    _resolve_paths(data, base_dir)
    if secure is not None:
        _resolve_paths(secure, os.path.dirname(os.path.abspath(secure_path)))
        problems += [(secure_path, k, m) for k, m in merge_secure(data, secure)]

    builder = _Builder(path, data)
    config = builder.build()
    problems += [(path, k, m) for k, m in builder.problems]
    config.source_mtimes = _mtimes([path, secure_path])
    return config, problems


# keys whose removal would change what the rest of an entry means
NEVER_PRUNED = ("name", "driver")


def cross_check_despite(path, document, schema_problems, rounds=4):
    """The cross-check problems (unknown names, driver rules) of a document that failed the
    schema, so that one run reports them together with the schema's.

    The optional keys the schema refused are removed and the rest validated again (a few
    rounds); if that makes it valid, the builder's problems are returned, except those about a
    removed key or the entry holding it.  When a problem cannot be removed that way (a missing
    required key, a bad list item, a bad name or driver), nothing more is reported."""
    doc = copy.deepcopy(document)
    validator = schema.config_schema()
    pruned = []
    for _ in range(rounds):
        try:
            valid = validator(copy.deepcopy(doc))
        except v.Invalid as exc:
            removed = set()
            for err in getattr(exc, "errors", [exc]):
                parts = list(err.path)
                if not parts or not isinstance(parts[-1], str) or parts[-1] in NEVER_PRUNED:
                    return []
                parent = _walk(doc, parts[:-1])
                where = key_path(parts)
                if isinstance(parent, dict) and parts[-1] in parent:
                    del parent[parts[-1]]
                    removed.add(where)
                elif where not in removed:
                    return []
            pruned.extend(removed)
            continue
        builder = _Builder(path, valid)
        builder.build()
        known = {key for key, _ in schema_problems}
        return [(key, message) for key, message in builder.problems
                if key not in known and not any(_related(key, p) for p in pruned)]
    return []


def _walk(doc, parts):
    for part in parts:
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


def _related(key, other):
    """Whether one key path is the other or contains it."""
    def inside(a, b):
        return a == b or a.startswith(b + ".") or a.startswith(b + "[")
    return inside(key, other) or inside(other, key)


def _mtimes(paths):
    out = {}
    for p in paths:
        if p:
            try:
                out[os.path.abspath(p)] = os.stat(p).st_mtime_ns
            except OSError:
                pass
    return out


def _resolve(value, base_dir):
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _resolve_paths(data, base_dir):
    """Make the file and directory keys absolute, relative to the file that names them."""
    for key in ("images-dir", "build-log-dir"):
        if data.get(key):
            data[key] = _resolve(data[key], base_dir)
    if data.get("elements-dir"):            # an ELEMENTS_PATH: may be several, colon separated
        data["elements-dir"] = ":".join(_resolve(p, base_dir)
                                        for p in data["elements-dir"].split(":") if p)
    store = data.get("embedded-store")
    if store and store.get("path"):
        store["path"] = _resolve(store["path"], base_dir)
    tls = data.get("zookeeper-tls")
    if tls:
        for key in ("ca", "cert", "key"):
            tls[key] = _resolve(tls[key], base_dir)


def merge_secure(data, secure):
    """Apply the secure file to the validated main config in place; returns problems."""
    problems = []
    if "zookeeper-servers" in secure:
        data["zookeeper-servers"] = secure["zookeeper-servers"]
    if "zookeeper-tls" in secure:
        data["zookeeper-tls"] = secure["zookeeper-tls"]
    images = {d["name"]: d for d in data.get("diskimages", [])}
    for index, entry in enumerate(secure.get("diskimages") or []):
        image = images.get(entry["name"])
        if image is None:
            hint = _did_you_mean(entry["name"], images)
            problems.append((f"diskimages[{index}].name",
                             f"diskimage {entry['name']!r} is not in the main config{hint}"))
            continue
        image["env-vars"] = {**(image.get("env-vars") or {}), **entry["env-vars"]}
    return problems


def _did_you_mean(name, known):
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_diskimages(entries):
    """``({name: merged dict with defaults}, problems)`` after ``parent`` inheritance.

    Scalars override the parent's, ``elements`` append, ``env-vars`` update; ``metadata`` and
    ``abstract`` belong to each entry alone."""
    by_name = {}
    for entry in entries:
        by_name.setdefault(entry["name"], entry)
    index_of = {e["name"]: i for i, e in reversed(list(enumerate(entries)))}
    resolved, problems, broken = {}, [], set()

    def merged(name, chain):
        if name in resolved:
            return resolved[name]
        entry = by_name[name]
        parent = entry.get("parent")
        out = {}
        if parent is not None:
            where = f"diskimages[{index_of[name]}].parent"
            if parent not in by_name:
                problems.append((where, f"unknown parent diskimage {parent!r}"
                                        f"{_did_you_mean(parent, by_name)}"))
                broken.add(name)
            elif parent in chain:
                cycle = " -> ".join(chain[chain.index(parent):] + [parent])
                problems.append((where, f"parent chain is cyclic: {cycle}"))
                broken.add(name)
            else:
                base = merged(parent, chain + [parent])
                out = {k: copy.deepcopy(val) for k, val in base.items()
                       if k not in NOT_INHERITED}
        for key, value in entry.items():
            if key == "elements":
                out["elements"] = list(out.get("elements") or []) + list(value)
            elif key == "env-vars":
                out["env-vars"] = {**(out.get("env-vars") or {}), **value}
            else:
                out[key] = copy.deepcopy(value)
        resolved[name] = out
        return out

    for name in by_name:
        merged(name, [name])
    full = {}
    for name, values in resolved.items():
        item = copy.deepcopy(DISKIMAGE_DEFAULTS)
        item.update(values)
        full[name] = item
    return full, problems


class _Builder:
    """Builds the dataclasses from the validated dict and cross-checks names."""

    def __init__(self, path, data):
        self.path = path
        self.data = data
        self.problems = []
        self.warnings = []

    def problem(self, key, message):
        self.problems.append((key, message))

    def build(self):
        data = self.data
        config = Config(path=self.path, raw=copy.deepcopy(data))
        config.labels = self.labels(data["labels"])
        config.diskimages = self.diskimages(data["diskimages"])
        config.tenant_limits = self.tenant_limits(data["tenant-resource-limits"])
        config.max_hold_age = data["max-hold-age"]
        web = data["webapp"]
        config.webapp = WebApp(port=web["port"], listen_address=web["listen_address"])
        config.zookeeper_servers = [ZooKeeperServer(host=s["host"], port=s["port"],
                                                    chroot=s.get("chroot"))
                                    for s in data["zookeeper-servers"]]
        tls = data.get("zookeeper-tls")
        config.zookeeper_tls = ZooKeeperTLS(tls["ca"], tls["cert"], tls["key"]) if tls else None
        config.zookeeper_timeout = data["zookeeper-timeout"]
        store = data["embedded-store"]
        config.embedded_store = EmbeddedStore(path=store["path"],
                                              session_timeout=store["session-timeout"])
        config.launcher = LauncherSettings(leak_interval=data["launcher"]["leak-interval"])
        builder = data["builder"]
        config.builder = BuilderSettings(build_interval=builder["build-interval"],
                                         upload_interval=builder["upload-interval"],
                                         cleanup_interval=builder["cleanup-interval"])
        config.images_dir = data.get("images-dir")
        config.build_log_dir = data["build-log-dir"]
        config.build_log_retention = data["build-log-retention"]
        config.elements_dir = data.get("elements-dir")

        built = []
        for index, raw in enumerate(data["providers"]):
            where = f"providers[{index}]"
            if raw["name"] in config.providers:
                self.problem(f"{where}.name", f"duplicate provider name {raw['name']!r}")
                continue
            driver = drivers.get_driver(raw["driver"])    # known: the schema checked it
            provider = self.provider(where, raw, driver, config)
            config.providers[provider.name] = provider
            built.append((where, provider, driver))
        for where, provider, driver in built:
            for key, message in driver.check_provider(provider, config) or []:
                if not str(key).startswith("providers"):
                    key = f"{where}.{key}" if key else where
                self.problem(key, message)
        if not self.problems:
            # only a valid config is finalized; drivers may add pool labels or image formats
            for _, provider, driver in built:
                driver.finalize(provider, config)
            self.image_formats(config)
            self.unused_labels(config)
        config.warnings = self.warnings
        return config

    # -- top-level lists --------------------------------------------------------------------------

    def labels(self, entries):
        out = {}
        for index, entry in enumerate(entries):
            name = entry["name"]
            if name in out:
                self.problem(f"labels[{index}].name", f"duplicate label name {name!r}")
                continue
            min_ready = entry["min-ready"]
            if min_ready < 0:
                self.warnings.append(f"labels[{index}] ({name}): min-ready {min_ready} acts "
                                     "like 0")
                min_ready = 0
            out[name] = Label(name=name, min_ready=min_ready,
                              max_ready_age=entry["max-ready-age"])
        return out

    def diskimages(self, entries):
        seen = set()
        for index, entry in enumerate(entries):
            if entry["name"] in seen:
                self.problem(f"diskimages[{index}].name",
                             f"duplicate diskimage name {entry['name']!r}")
            seen.add(entry["name"])
        resolved, problems = resolve_diskimages(entries)
        for key, message in problems:
            self.problem(key, message)
        out = {}
        for name, d in resolved.items():
            out[name] = DiskImage(
                name=name, elements=d["elements"], release=d["release"],
                env_vars=d["env-vars"], formats=list(d["formats"]),
                rebuild_age=d["rebuild-age"], build_timeout=d["build-timeout"],
                pause=d["pause"], dib_cmd=d["dib-cmd"], username=d["username"],
                python_path=d["python-path"], shell_type=d["shell-type"],
                parent=d.get("parent"), abstract=d["abstract"],
                delete_after_upload=d["delete-after-upload"], keep_formats=d["keep-formats"],
                metadata=d["metadata"],
                rollout=self.rollout(*self._rollout_key(entries, name), d.get("rollout")))
        return out

    @staticmethod
    def _rollout_key(entries, name):
        """Where a diskimage's problems with ``rollout`` are reported, and whether they are:
        an inherited policy is reported once, at the entry that writes it."""
        index, entry = next(((i, e) for i, e in enumerate(entries) if e["name"] == name),
                            (0, {}))
        return f"diskimages[{index}].rollout", "rollout" in entry

    def rollout(self, key, report, data):
        """The ``RolloutPolicy`` of a ``rollout`` mapping (None when absent)."""
        if data is None:
            return None
        policy, problems = build_policy(data, os.path.dirname(os.path.abspath(self.path)))
        for sub, message in problems if report else ():
            self.problem(f"{key}.{sub}", message)
        return policy

    def tenant_limits(self, entries):
        out = {}
        for index, entry in enumerate(entries):
            tenant = entry["tenant-name"]
            if tenant in out:
                self.problem(f"tenant-resource-limits[{index}].tenant-name",
                             f"duplicate tenant {tenant!r}")
                continue
            limits = Limits()
            for key, value in entry.items():
                if key == "tenant-name":
                    continue
                if key not in TENANT_RESOURCE_NAMES:
                    hint = _did_you_mean(key, schema.TENANT_LIMIT_KEYS)
                    if hint:
                        self.warnings.append(f"tenant-resource-limits[{index}].{key}: taken as "
                                             f"a driver resource name{hint}")
                limits[TENANT_RESOURCE_NAMES.get(key, key)] = value
            out[tenant] = TenantLimit(tenant_name=tenant, limits=limits)
        return out

    # -- providers --------------------------------------------------------------------------------

    def provider(self, where, raw, driver, config):
        own = schema.driver_key_names(driver)
        # keys a driver does not take (``unused_common_keys``) are absent: the driver's
        # defaults, else the model's
        model = Provider(name="", driver="")
        driver_defaults = getattr(driver, "provider_defaults", None) or {}
        common = {key: raw.get(key, driver_defaults.get(key,
                                                        getattr(model, key.replace("-", "_"))))
                  for key in ("rate", "boot-timeout", "launch-timeout", "launch-retries",
                              "image-name-format", "image-upload-timeout")}
        prov = Provider(
            name=raw["name"], driver=raw["driver"], priority=raw["priority"], rate=common["rate"],
            boot_timeout=common["boot-timeout"], launch_timeout=common["launch-timeout"],
            launch_retries=common["launch-retries"], max_concurrency=raw["max-concurrency"],
            image_name_format=common["image-name-format"],
            post_upload_hook=raw.get("post-upload-hook"),
            image_upload_timeout=common["image-upload-timeout"],
            options=_options(raw, own["provider"], schema.COMMON_KEYS["provider"]),
            raw=copy.deepcopy(raw))

        for index, entry in enumerate(raw.get("diskimages") or []):
            key = f"{where}.diskimages[{index}]"
            name = entry["name"]
            if name in prov.diskimages:
                self.problem(f"{key}.name", f"duplicate diskimage {name!r} in provider "
                                            f"{prov.name!r}")
                continue
            image = config.diskimages.get(name)
            if image is None:
                self.problem(f"{key}.name", f"diskimage {name!r} is not in the top-level "
                                            f"diskimages{_did_you_mean(name, config.diskimages)}")
            elif image.abstract:
                self.problem(f"{key}.name", f"diskimage {name!r} is abstract and is never built")
            prov.diskimages[name] = ProviderDiskImage(
                name=name, pause=entry["pause"], connection_type=entry["connection-type"],
                connection_port=_connection_port(entry),
                options=_options(entry, own["diskimage"], schema.COMMON_KEYS["diskimage"]),
                rollout=self.rollout(f"{key}.rollout", True, entry.get("rollout")))

        for index, entry in enumerate(raw.get("cloud-images") or []):
            name = entry["name"]
            if name in prov.cloud_images:
                self.problem(f"{where}.cloud-images[{index}].name",
                             f"duplicate cloud-image {name!r} in provider {prov.name!r}")
                continue
            prov.cloud_images[name] = CloudImage(
                name=name, username=entry["username"], python_path=entry["python-path"],
                shell_type=entry.get("shell-type"), connection_type=entry["connection-type"],
                connection_port=_connection_port(entry),
                options=_options(entry, own["cloud-image"], schema.COMMON_KEYS["cloud-image"]))

        for index, entry in enumerate(raw["pools"]):
            key = f"{where}.pools[{index}]"
            if entry["name"] in prov.pools:
                self.problem(f"{key}.name", f"duplicate pool name {entry['name']!r} in provider "
                                            f"{prov.name!r}")
                continue
            prov.pools[entry["name"]] = self.pool(key, entry, prov, driver, own, config)
        return prov

    def pool(self, where, entry, prov, driver, own, config):
        pool = Pool(
            name=entry["name"], provider=prov.name,
            max_servers=entry.get("max-servers", math.inf),
            max_cores=entry.get("max-cores", math.inf),
            max_ram=entry.get("max-ram", math.inf),
            max_resources=dict(entry.get("max-resources") or {}),
            priority=entry.get("priority", prov.priority),
            node_attributes=entry.get("node-attributes"),
            azs=list(entry.get("availability-zones") or []),
            host_key_checking=entry.get("host-key-checking", True),
            ignore_provider_quota=entry.get("ignore-provider-quota", False),
            options=_options(entry, own["pool"], schema.COMMON_KEYS["pool"]))
        needs_image = getattr(driver, "labels_need_image", True)
        for index, item in enumerate(entry.get("labels") or []):
            key = f"{where}.labels[{index}]"
            name = item["name"]
            if name in pool.labels:
                self.problem(f"{key}.name", f"duplicate label {name!r} in pool "
                                            f"{pool.key!r}")
                continue
            if name not in config.labels:
                self.problem(f"{key}.name", f"label {name!r} is not in the top-level labels"
                                            f"{_did_you_mean(name, config.labels)}")
            self.check_label_image(key, item, prov, config, needs_image,
                                   getattr(driver, "label_image_may_be_missing", False))
            pool.labels[name] = PoolLabel(
                name=name, pool=pool.name, provider=prov.name, diskimage=item.get("diskimage"),
                cloud_image=item.get("cloud-image"),
                options=_options(item, own["label"], schema.COMMON_KEYS["label"]))
        return pool

    def check_label_image(self, key, item, prov, config, needs_image, may_be_missing=False):
        diskimage, cloud_image = item.get("diskimage"), item.get("cloud-image")
        if diskimage is not None and cloud_image is not None:
            self.problem(key, "give either diskimage or cloud-image, not both")
        elif diskimage is None and cloud_image is None:
            if needs_image:
                self.problem(key, "one of diskimage or cloud-image is required")
        elif diskimage is not None and diskimage not in prov.diskimages and may_be_missing \
                and diskimage in config.diskimages:
            # Nodepool's OpenStack driver loads this (its own docs example does it)
            self.warnings.append(f"{key}.diskimage: diskimage {diskimage!r} is only in the "
                                 f"top-level diskimages, not in those of provider "
                                 f"{prov.name!r}: label {item['name']} has no image there "
                                 f"and its requests are declined by this pool")
        elif diskimage is not None and diskimage not in prov.diskimages:
            where = ("nor in the top-level diskimages" if diskimage not in config.diskimages
                     else "(it is only in the top-level diskimages)")
            self.problem(f"{key}.diskimage", f"diskimage {diskimage!r} is not in the diskimages "
                                             f"of provider {prov.name!r} {where}")
        elif cloud_image is not None and cloud_image not in prov.cloud_images:
            self.problem(f"{key}.cloud-image",
                         f"cloud-image {cloud_image!r} is not in the cloud-images of provider "
                         f"{prov.name!r}{_did_you_mean(cloud_image, prov.cloud_images)}")

    # -- whole-config passes ----------------------------------------------------------------------

    def image_formats(self, config):
        """A diskimage is built in its explicit formats plus every format its providers use."""
        for prov in config.providers.values():
            fmt = prov.options.get("image-format") or DEFAULT_IMAGE_FORMAT
            for name in prov.diskimages:
                image = config.diskimages.get(name)
                if image is not None and fmt not in image.formats:
                    image.formats.append(fmt)

    def unused_labels(self, config):
        provided = {lbl.name for prov in config.providers.values() for lbl in prov.labels()}
        for name in config.labels:
            if name not in provided:
                self.warnings.append(f"label {name!r} is not provided by any pool of this "
                                     "configuration")


def _options(entry, driver_keys, common_keys):
    """The driver's keys of one validated entry (deep copies: drivers may change them)."""
    return {k: copy.deepcopy(val) for k, val in entry.items()
            if k in driver_keys or k not in common_keys}


def _connection_port(entry):
    port = entry.get("connection-port")
    if port is not None:
        return port
    return 5986 if entry.get("connection-type") == "winrm" else 22
