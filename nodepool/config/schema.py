"""The voluptuous schema of ``nodepool.yaml``.

Keys every driver shares are declared here; each provider's driver adds its own keys through the
``Driver.*_schema()`` hooks, and ``provider_schema`` merges the two per provider.  Two small
validators replace voluptuous' own dict and list handling so that *every* problem is collected
(voluptuous stops at the first bad list item) and unknown keys come with a suggestion.
"""
import difflib
import math

import voluptuous as v

from .. import drivers

DEFAULT_DRIVER = "openstack"

# The Driver base class' defaults, used for any key a driver's ``provider_defaults`` leaves out.
BASE_PROVIDER_DEFAULTS = {"rate": 1.0, "boot-timeout": 60, "launch-timeout": 3600,
                          "launch-retries": 3}


# -- value validators -----------------------------------------------------------------------------

def Int(minimum=None, maximum=None):
    """An int (YAML booleans are refused although Python counts them as ints)."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise v.Invalid("expected int")
        if minimum is not None and value < minimum:
            raise v.Invalid(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise v.Invalid(f"must be <= {maximum}, got {value}")
        return value
    return check


def Number(minimum=None, coerce=False):
    """An int or float (not a boolean).  With ``coerce``, a quoted number (``"0.5"``) is taken
    as that number, as Nodepool's ``v.Coerce(float)`` does."""
    def check(value):
        if coerce and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise v.Invalid("expected a number") from None
            if not math.isfinite(value):
                raise v.Invalid("expected a finite number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise v.Invalid("expected a number")
        if minimum is not None and value < minimum:
            raise v.Invalid(f"must be >= {minimum}, got {value}")
        return value
    return check


def Interval(value):
    """A number of seconds greater than zero (a loop that runs every 0 s would spin)."""
    value = Number()(value)
    if value <= 0:
        raise v.Invalid(f"must be > 0, got {value}")
    return value


def _not_a_string(value):
    if isinstance(value, bool):
        return v.Invalid("expected str, got a boolean (quote it: YAML reads yes/no/on/off as "
                         "true/false)")
    return v.Invalid("expected str")


def Name(value):
    """A non-empty string naming an entry."""
    if not isinstance(value, str):
        raise _not_a_string(value)
    if not value.strip():
        raise v.Invalid("must not be empty")
    return value


def MinReady(value):
    """A count >= 0; -1 is accepted too, as old configs used it for "disabled" (it acts as 0)."""
    value = Int()(value)
    if value < -1:
        raise v.Invalid(f"must be >= 0, got {value}")
    return value


def Release(value):
    """A distribution release; YAML reads ``12`` or ``22.04`` as numbers, we want the text."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise v.Invalid("expected str")
    return str(value)


def Bool(value):
    if not isinstance(value, bool):
        raise v.Invalid("expected bool (true or false)")
    return value


def Str(value):
    if not isinstance(value, str):
        raise _not_a_string(value)
    return value


def Rollout(value):
    """A diskimage's ``rollout`` mapping (validation, steps, fallback: config/rollout.py)."""
    from .rollout import ROLLOUT
    return ROLLOUT(value)


def AnyMapping(value):
    """A mapping whose content is free-form (node-attributes, metadata)."""
    if not isinstance(value, dict):
        raise v.Invalid("expected a mapping")
    return value


# -- containers that collect every problem --------------------------------------------------------

def _literal_keys(fields):
    """The key names of a dict schema, or None when it also accepts keys by type
    (``{str: int}``)."""
    names = []
    for key in fields:
        name = key.schema if isinstance(key, v.Marker) else key
        if not isinstance(name, str):
            return None
        names.append(name)
    return names


def suggest(key, known):
    """`` (did you mean 'x'?)`` for the closest known key, or an empty string."""
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Mapping:
    """A dict schema that reports unknown keys (with the closest valid key) and all other
    problems at once.  ``refused`` maps keys this mapping does not take to the reason given
    (a key other drivers take: "not used by the static driver")."""

    def __init__(self, fields, refused=None):
        self.fields = {k: strict(val) for k, val in fields.items()}
        self.known = _literal_keys(self.fields)
        self.refused = dict(refused or {})
        extra = v.REMOVE_EXTRA if self.known is not None else v.PREVENT_EXTRA
        self.schema = v.Schema(self.fields, extra=extra)

    def __call__(self, data):
        if not isinstance(data, dict):
            raise v.Invalid("expected a mapping")
        errors = []
        if self.known is not None:
            for key in data:
                if key in self.refused:
                    errors.append(v.Invalid(self.refused[key], path=[key]))
                elif key not in self.known:
                    errors.append(v.Invalid(f"unknown key{suggest(key, self.known)}", path=[key]))
        try:
            out = self.schema(data)
        except v.MultipleInvalid as exc:
            errors.extend(exc.errors)
        except v.Invalid as exc:
            errors.append(exc)
        if errors:
            raise v.MultipleInvalid(errors)
        return out


class Seq:
    """A list whose items all match one schema; problems of every item are reported."""

    def __init__(self, item):
        self.item = v.Schema(strict(item))

    def __call__(self, data):
        if not isinstance(data, list):
            raise v.Invalid("expected a list")
        out, errors = [], []
        for index, value in enumerate(data):
            try:
                out.append(self.item(value))
            except v.MultipleInvalid as exc:
                for err in exc.errors:
                    err.prepend([index])
                    errors.append(err)
            except v.Invalid as exc:
                exc.prepend([index])
                errors.append(exc)
        if errors:
            raise v.MultipleInvalid(errors)
        return out


def strict(schema):
    """Turn plain dict and single-item list schemas (as drivers write them) into ``Mapping`` and
    ``Seq``, so their problems are collected and unknown keys suggested as well."""
    if isinstance(schema, dict):
        return Mapping(schema)
    if isinstance(schema, list) and len(schema) == 1:
        return Seq(schema[0])
    if isinstance(schema, v.All):
        return v.All(*[strict(s) for s in schema.validators], msg=schema.msg)
    if schema is int:
        return Int()
    if schema is str:
        return Str
    if schema is bool:
        return Bool
    return schema


def key_names(fields):
    return {k.schema if isinstance(k, v.Marker) else k for k in fields}


def merge_fields(common, extra):
    """``common`` plus a driver's ``extra`` keys; a driver's spelling of a key wins."""
    names = key_names(extra)
    out = {k: val for k, val in common.items()
           if (k.schema if isinstance(k, v.Marker) else k) not in names}
    out.update(extra)
    return out


# -- common keys ----------------------------------------------------------------------------------

LABEL = {
    v.Required("name"): Name,
    # -1 is the documented "disabled" value of old configs; it acts like 0
    v.Optional("min-ready", default=0): MinReady,
    v.Optional("max-ready-age", default=0): Int(0),
}

# No defaults here: they are applied after parent inheritance, which must see what was set.
DISKIMAGE = {
    v.Required("name"): Name,
    v.Optional("abstract"): Bool,
    v.Optional("parent"): Name,
    v.Optional("elements"): [Str],
    v.Optional("env-vars"): {Str: Str},
    v.Optional("release"): Release,
    v.Optional("formats"): [Str],
    v.Optional("rebuild-age"): Int(0),
    v.Optional("build-timeout"): Int(0),
    v.Optional("pause"): Bool,
    v.Optional("dib-cmd"): Str,
    v.Optional("username"): Str,
    v.Optional("python-path"): Str,
    v.Optional("shell-type"): Str,
    v.Optional("delete-after-upload"): Bool,
    v.Optional("keep-formats"): [Str],
    v.Optional("metadata"): AnyMapping,
    v.Optional("rollout"): Rollout,          # our own: docs/rollout.md
}

POOL_LABEL = {
    v.Required("name"): Name,
    v.Optional("diskimage"): Name,
    v.Optional("cloud-image"): Name,
}

POOL = {
    v.Required("name"): Name,
    v.Optional("max-servers"): Int(0),       # 0 is allowed: a disabled pool
    v.Optional("max-cores"): Int(0),
    v.Optional("max-ram"): Int(0),
    v.Optional("max-resources", default={}): {Str: Int(0)},
    v.Optional("priority"): Int(),           # default: the provider's
    v.Optional("node-attributes"): AnyMapping,
    v.Optional("availability-zones", default=[]): [Str],
    v.Optional("host-key-checking", default=True): Bool,
    v.Optional("ignore-provider-quota", default=False): Bool,
}

PROVIDER_DISKIMAGE = {
    v.Required("name"): Name,
    v.Optional("pause", default=False): Bool,
    v.Optional("connection-type", default="ssh"): Str,
    v.Optional("connection-port"): Int(1, 65535),    # default 22, 5986 for winrm
    v.Optional("rollout"): Rollout,          # our own: overrides the diskimage's
}

CLOUD_IMAGE = {
    v.Required("name"): Name,
    v.Optional("username", default="zuul"): Str,
    v.Optional("python-path", default="auto"): Str,
    v.Optional("shell-type"): Str,
    v.Optional("connection-type", default="ssh"): Str,
    v.Optional("connection-port"): Int(1, 65535),
}


def provider_common(defaults):
    return {
        v.Required("name"): Name,
        v.Optional("driver", default=DEFAULT_DRIVER): Str,
        v.Optional("priority", default=100): Int(),
        v.Optional("rate", default=defaults["rate"]): Number(0, coerce=True),
        v.Optional("boot-timeout", default=defaults["boot-timeout"]): Number(0),
        v.Optional("launch-timeout", default=defaults["launch-timeout"]): Number(0),
        v.Optional("launch-retries", default=defaults["launch-retries"]): Int(0),
        v.Optional("max-concurrency", default=-1): Int(),     # <0 unlimited, 0 takes nothing
        v.Optional("image-name-format", default="{image_name}-{timestamp}"): Str,
        v.Optional("post-upload-hook"): Str,
        v.Optional("image-upload-timeout", default=3600): Number(0),
    }


ZOOKEEPER_SERVER = {
    v.Required("host"): Name,
    v.Optional("port", default=2281): Int(1, 65535),
    v.Optional("chroot"): Str,
}

ZOOKEEPER_TLS = {v.Required("ca"): Name, v.Required("cert"): Name, v.Required("key"): Name}

TENANT_LIMIT = {
    v.Required("tenant-name"): Name,
    v.Optional("max-servers"): Int(0),
    v.Optional("max-cores"): Int(0),
    v.Optional("max-ram"): Int(0),
    v.Optional("max-volumes"): Int(0),
    v.Optional("max-volume-gb"): Int(0),
    Str: Int(0),                 # any other key is a driver resource name (AWS quota codes...)
}
TENANT_LIMIT_KEYS = ["max-servers", "max-cores", "max-ram", "max-volumes", "max-volume-gb"]


# -- providers: common keys + the driver's --------------------------------------------------------

class ProviderEntry:
    """Validates one ``providers`` entry with the schema of the driver it names."""

    def __call__(self, data):
        if not isinstance(data, dict):
            raise v.Invalid("expected a mapping")
        name = data.get("driver", DEFAULT_DRIVER)
        if not isinstance(name, str):
            raise v.Invalid("expected str", path=["driver"])
        try:
            driver = drivers.get_driver(name)
        except ValueError as exc:
            raise v.Invalid(str(exc), path=["driver"])
        return provider_schema(driver)(data)


def unused_keys(driver, level):
    """Common keys of ``level`` (``provider``, ``pool``...) that ``driver`` does not take."""
    return set((getattr(driver, "unused_common_keys", None) or {}).get(level) or ())


def without(fields, names):
    return {k: val for k, val in fields.items()
            if (k.schema if isinstance(k, v.Marker) else k) not in names}


def refusals(driver, level):
    return {key: f"not used by the {driver.name} driver" for key in unused_keys(driver, level)}


def provider_schema(driver):
    """The full schema of a provider of ``driver``, without the common keys the driver lists
    in ``unused_common_keys`` (those are refused, naming the driver)."""
    defaults = dict(BASE_PROVIDER_DEFAULTS)
    defaults.update(getattr(driver, "provider_defaults", None) or {})
    label = merge_fields(POOL_LABEL, driver.label_schema())
    pool = merge_fields(without(POOL, unused_keys(driver, "pool")), driver.pool_schema())
    pool.setdefault(v.Optional("labels", default=[]), Seq(Mapping(
        label, refusals(driver, "label"))))
    fields = merge_fields(without(provider_common(defaults), unused_keys(driver, "provider")),
                          driver.provider_schema())
    fields[v.Optional("pools", default=[])] = Seq(Mapping(pool, refusals(driver, "pool")))
    if "diskimages" not in unused_keys(driver, "provider"):
        fields[v.Optional("diskimages", default=[])] = [merge_fields(
            PROVIDER_DISKIMAGE, driver.diskimage_schema())]
    if "cloud-images" not in unused_keys(driver, "provider"):
        fields[v.Optional("cloud-images", default=[])] = [merge_fields(
            CLOUD_IMAGE, driver.cloud_image_schema())]
    return Mapping(fields, refusals(driver, "provider"))


def driver_key_names(driver):
    """Per level, the keys a driver declares: they go into the ``options`` dicts."""
    return {
        "provider": key_names(driver.provider_schema()),
        "pool": key_names(driver.pool_schema()),
        "label": key_names(driver.label_schema()),
        "diskimage": key_names(driver.diskimage_schema()),
        "cloud-image": key_names(driver.cloud_image_schema()),
    }


COMMON_KEYS = {
    "provider": key_names(provider_common(BASE_PROVIDER_DEFAULTS))
    | {"pools", "diskimages", "cloud-images"},
    "pool": key_names(POOL) | {"labels"},
    "label": key_names(POOL_LABEL),
    "diskimage": key_names(PROVIDER_DISKIMAGE),
    "cloud-image": key_names(CLOUD_IMAGE),
}


# -- whole files ----------------------------------------------------------------------------------

def config_schema():
    """The schema of ``nodepool.yaml``."""
    return Mapping({
        v.Optional("labels", default=[]): [LABEL],
        v.Optional("diskimages", default=[]): [DISKIMAGE],
        v.Optional("providers", default=[]): Seq(ProviderEntry()),
        v.Optional("tenant-resource-limits", default=[]): [TENANT_LIMIT],
        v.Optional("max-hold-age", default=0): Number(),
        v.Optional("webapp", default={}): {
            v.Optional("port", default=8005): Int(0, 65535),
            v.Optional("listen_address", default="0.0.0.0"): Str,
        },
        v.Optional("zookeeper-servers", default=[]): [ZOOKEEPER_SERVER],
        v.Optional("zookeeper-tls"): ZOOKEEPER_TLS,
        v.Optional("zookeeper-timeout", default=10.0): Number(0),
        v.Optional("elements-dir"): Str,
        v.Optional("images-dir"): Str,
        v.Optional("build-log-dir", default="/var/log/nodepool/builds"): Str,
        v.Optional("build-log-retention", default=7): Int(-1),
        # our own: how often the daemons' periodic passes run (seconds)
        v.Optional("launcher", default={}): Mapping({
            v.Optional("leak-interval", default=60): Interval,
        }),
        v.Optional("builder", default={}): Mapping({
            v.Optional("build-interval", default=10): Interval,
            v.Optional("upload-interval", default=10): Interval,
            v.Optional("cleanup-interval", default=60): Interval,
        }),
        # our own: where the embedded (SQLite) state store lives
        v.Optional("embedded-store", default={}): {
            v.Optional("path", default="/var/lib/nodepool/nodepool.sqlite"): Name,
            v.Optional("session-timeout", default=10): Number(0),
        },
    })


def secure_schema():
    """The schema of the secure file: credentials kept apart from the main config."""
    return Mapping({
        v.Optional("zookeeper-servers"): [ZOOKEEPER_SERVER],
        v.Optional("zookeeper-tls"): ZOOKEEPER_TLS,
        v.Optional("diskimages"): [{
            v.Required("name"): Name,
            v.Optional("env-vars", default={}): {Str: Str},
        }],
    })
