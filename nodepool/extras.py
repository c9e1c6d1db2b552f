"""Optional dependencies: which pip extra brings which packages, and the one error a missing one
gives.

Modules that need an extra import it at their top as usual; the code that loads such a module
for a configured feature (a ZooKeeper store, a cloud driver) does it inside ``requires(...)``,
so a missing package becomes ``MissingDependencyError`` at that point and one line at the CLI's
edge, naming the extra to install, instead of a traceback.
"""
import contextlib

from .errors import MissingDependencyError

EXTRAS = {
    "zookeeper": ("kazoo",),
    "aws": ("boto3", "botocore"),
    "openstack": ("openstack", "keystoneauth1"),
}


@contextlib.contextmanager
def requires(extra, feature):
    """Turn an ImportError of one of ``extra``'s packages, raised in the block, into
    ``MissingDependencyError`` naming ``feature`` (what the configuration asked for)."""
    try:
        yield
    except ImportError as exc:
        package = (exc.name or "").split(".")[0]
        if package not in EXTRAS[extra]:
            raise
        raise MissingDependencyError(feature, package, extra) from None
