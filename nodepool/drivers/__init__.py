"""Driver registry.

A driver is the package ``nodepool.drivers.<name>`` exposing ``DRIVER``.  Packages are imported
only when a configuration names them, so a missing cloud SDK breaks only the providers that use
that driver, with a clear message.
"""
import importlib

from ..errors import NodepoolError



_cache = {}


def get_driver(name):
    """The ``Driver`` object for ``name``.  Raises ValueError for an unknown or unusable driver."""
    if name in _cache:
        return _cache[name]
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"unknown driver {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            raise ValueError(f"unknown driver {name!r} (known: {', '.join(available_drivers())})")
        raise ValueError(f"driver {name!r} cannot be loaded: {exc}") from exc
    _cache[name] = module.DRIVER
    return module.DRIVER


def cloud_problems(config):
    """One line per provider whose cloud configuration cannot be loaded (``Driver.check_cloud``),
    for ``nodepool config-validate --check-clouds``; empty when every one loads."""
    problems = []
    for name, provider in config.providers.items():
        try:
            message = get_driver(provider.driver).check_cloud(provider)
        except (ValueError, NodepoolError) as exc:     # the driver or its SDK cannot load
            message = str(exc)
        if message:
            problems.append(f"provider {name}: {message}")
    return problems


def available_drivers():
    """Drivers shipped in this package (whether or not their SDK is installed)."""
    import pkgutil
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


__all__ = ["get_driver", "available_drivers", "cloud_problems"]
