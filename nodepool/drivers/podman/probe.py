"""Can this machine start containers?  One real container, from a 2 MB image of its own.

``runtime_problem`` runs ``/bin/true`` in a container of a scratch image holding only that
binary and its libraries (imported once as ``PROBE_IMAGE``), with the provider's runtime and
limits: None when it ran, else one line saying why not (podman missing, the runtime refusing
rlimits...).  The adapter asks it at start so a provider that cannot work says so once, clearly;
``python3 -m nodepool.drivers.podman.probe`` asks it for scripts (the demo, the tests).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

from .runtime import Podman, PodmanError, host_ulimits

_LIB_RE = re.compile(r"(/\S+)")
PROBE_IMAGE = "localhost/nodepool-probe:latest"


def _libraries(binary):
    """Absolute paths of the shared libraries ``binary`` loads (from ``ldd``)."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted({m.group(1) for m in _LIB_RE.finditer(out) if os.path.exists(m.group(1))})


def _scratch_root(directory):
    """A root tree with ``/bin/true`` and what it needs to run."""
    true = shutil.which("true") or "/bin/true"
    for path in [true] + _libraries(true):
        real = os.path.realpath(path)
        dest = os.path.join(directory, path.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(real, dest)
    return true


def runtime_problem(podman, ulimits=None, timeout=60):
    """None when ``podman`` (a ``runtime.Podman``) can start a container here, else one line."""
    missing = podman.available()
    if missing:
        return missing
    args = ["run", "--rm", "--network", "none"]
    for name, value in sorted((host_ulimits() if ulimits is None else ulimits).items()):
        args += ["--ulimit", f"{name}={value}"]
    try:
        true = _probe_image(podman, timeout)
        podman.call(*args, PROBE_IMAGE, true, what="podman run (probe)", timeout=timeout)
    except PodmanError as exc:
        runtime = podman.runtime or "podman's default runtime"
        return f"containers cannot run here ({runtime}): {exc}"
    return None


def _probe_image(podman, timeout):
    """Import ``PROBE_IMAGE`` unless present (a ``podman run --rootfs`` of the same tree fails
    where an imported image runs, so the probe uses an image like the nodes do)."""
    true = shutil.which("true") or "/bin/true"
    try:
        podman.call("image", "exists", PROBE_IMAGE, what="podman image exists", timeout=timeout)
        return true
    except PodmanError as exc:
        if exc.returncode != 1:
            raise
    with tempfile.TemporaryDirectory(prefix="nodepool-podman-probe-") as root:
        _scratch_root(root)
        archive = os.path.join(root, "probe.tar")
        with tarfile.open(archive, "w") as tar:
            for entry in os.listdir(root):
                if entry != "probe.tar":
                    tar.add(os.path.join(root, entry), arcname=entry)
        podman.call("import", "--change", "LABEL nodepool_probe=1", archive, PROBE_IMAGE,
                    what="podman import (probe)", timeout=timeout)
    return true


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m nodepool.drivers.podman.probe",
                                     description="Say in one line whether podman can start "
                                                 "containers here (exit 0) or why not (exit 1).")
    parser.add_argument("--podman", default="podman", help="podman executable (podman)")
    parser.add_argument("--runtime", default="runc",
                        help="OCI runtime (runc; 'default' for podman's own choice)")
    args = parser.parse_args(argv)
    runtime = None if args.runtime == "default" else args.runtime
    problem = runtime_problem(Podman(args.podman, runtime))
    print(problem or f"containers run here (podman, runtime {runtime or 'default'})")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
