"""Error hierarchy.

Errors are raised where the fact is known and turned into one clear line at the edge (CLI exit
code, node/request failure reason, log line).  Cloud errors are split by what the launcher must do
about them: retry later (transient), pause and keep the request (quota/capacity), or give up on the
node (permanent).
"""


class NodepoolError(Exception):
    """Base of every error this package raises on purpose."""


# -- configuration -------------------------------------------------------------------------------

class ConfigError(NodepoolError):
    """A configuration file is invalid.

    ``problems`` is a list of ``(key_path, message)``; ``key_path`` is a dotted/indexed path such
    as ``providers[0].pools[1].max-servers``.
    """

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(self.describe())

    def describe(self):
        lines = []
        for key, message in self.problems:
            where = f"{self.path}: {key}" if key else self.path
            lines.append(f"{where}: {message}")
        return "\n".join(lines)


class MissingDependencyError(NodepoolError):
    """A feature the configuration uses needs an optional package that is not installed."""

    def __init__(self, feature, package, extra):
        self.feature, self.package, self.extra = feature, package, extra
        super().__init__(f"{feature} needs the Python package {package!r}, which is not "
                         f"installed: pip install 'nodepool-py[{extra}]'")


# -- state store ---------------------------------------------------------------------------------

class StoreError(NodepoolError):
    """The state store cannot be used (unreachable, corrupt, locked too long)."""


class NotFoundError(StoreError):
    """A record does not exist (any more)."""


class LockError(StoreError):
    """A lock could not be acquired (held by someone else, or timed out)."""


class ConflictError(StoreError):
    """A record changed underneath a writer (version mismatch) or already exists."""


class SessionLostError(StoreError):
    """Our store session expired: every lock and ephemeral record of ours is gone."""


# -- clouds --------------------------------------------------------------------------------------

class CloudError(NodepoolError):
    """A provider API refused or failed a call."""


class TransientCloudError(CloudError):
    """Worth retrying as is: throttling, 5xx, timeouts, connection errors."""


class QuotaError(CloudError):
    """The cloud refused for quota or capacity: pause the pool and keep the request."""


class PermanentCloudError(CloudError):
    """Retrying the same call will not help: bad image, unknown flavor, bad credentials."""


class LabelConfigurationError(PermanentCloudError):
    """A label can never be served by this provider (e.g. its flavor does not exist)."""


class InstanceNotFound(CloudError):
    """The instance (or image) is already gone; deletes treat this as success."""


class LaunchTimeout(CloudError):
    """An instance did not become ready within the launch/boot timeout."""
