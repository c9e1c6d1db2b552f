"""The ``simulated`` driver: a cloud that runs on this machine.

Its instances and images live in a state file of its own (not in the node store): a SQLite
database, whatever its name, shared safely by every process using the provider (launchers, the
builder, the CLI), so instances survive a launcher restart and leak exactly like a real cloud's
would.  ``cloud.py`` is the cloud itself, ``adapter.py`` the driver's client of it.  Boot time,
API latency, API error rate, boot failure rate and quota are set per provider, so tests and
benchmarks can model real clouds.
"""
import os

import voluptuous as v

from ..base import Driver


class SimulatedDriver(Driver):
    name = "simulated"
    provider_defaults = {"rate": 0, "boot-timeout": 60, "launch-timeout": 3600,
                         "launch-retries": 3}

    def provider_schema(self):
        return {
            # where the simulated cloud keeps its instances and images; default: beside the store
            v.Optional("state-file"): str,
            v.Optional("boot-time", default=1.0): v.All(v.Coerce(float), v.Range(min=0)),
            v.Optional("delete-time", default=0.0): v.All(v.Coerce(float), v.Range(min=0)),
            v.Optional("api-latency", default=0.0): v.All(v.Coerce(float), v.Range(min=0)),
            v.Optional("api-error-rate", default=0.0): v.All(v.Coerce(float),
                                                              v.Range(min=0, max=1)),
            v.Optional("boot-failure-rate", default=0.0): v.All(v.Coerce(float),
                                                                 v.Range(min=0, max=1)),
            # uploaded image id -> boot failure rate of instances booted from it (a bad image)
            v.Optional("boot-failure-images", default={}): {
                str: v.All(v.Coerce(float), v.Range(min=0, max=1))},
            # the address every instance answers on (e.g. a loopback sshd, so that SSH checks
            # reach a real server); default: the simulated cloud's own addresses
            v.Optional("interface-ip"): str,
            v.Optional("upload-time", default=0.0): v.All(v.Coerce(float), v.Range(min=0)),
            # the account's limits, as the cloud enforces them (absent: unlimited)
            v.Optional("quota", default={}): {
                v.Optional("instances"): v.All(int, v.Range(min=0)),
                v.Optional("cores"): v.All(int, v.Range(min=0)),
                v.Optional("ram"): v.All(int, v.Range(min=0)),
            },
            v.Optional("seed"): int,
            # count every API call (and whether it failed) in the state file, across processes
            v.Optional("count-api-calls", default=False): bool,
        }

    def label_schema(self):
        return {
            v.Optional("cores", default=1): v.All(int, v.Range(min=1)),
            v.Optional("ram", default=1024): v.All(int, v.Range(min=1)),
        }

    def cloud_image_schema(self):
        return {
            v.Optional("image-id"): str,
            # false: the image is missing in the simulated cloud (for testing that error path)
            v.Optional("exists", default=True): bool,
        }

    def finalize(self, provider, config):
        """Default the state file to ``simulated-<provider>.json`` beside the embedded store
        (a SQLite file despite the suffix; SQLite adds ``-wal``/``-shm`` files next to it)."""
        if not provider.options.get("state-file"):
            base = os.path.dirname(os.path.abspath(config.embedded_store.path))
            provider.options["state-file"] = os.path.join(base, f"simulated-{provider.name}.json")

    def adapter(self, provider, rate_limiter=None):
        from .adapter import SimulatedAdapter
        return SimulatedAdapter(provider, rate_limiter)


DRIVER = SimulatedDriver()
