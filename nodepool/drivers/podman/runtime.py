"""The podman command line, as the driver's API: one ``Podman`` object per provider.

Every call is a ``podman`` child process whose JSON (or plain id) output is parsed here.
Blocking calls (``call``/``json``) are for listings and image uploads; launches and deletes use
``start()``, which returns a ``PodmanCall`` the state machines poll, so the provider worker's
loop never waits on a container starting or stopping.  Errors become the framework's cloud
errors here, by what podman says: a missing container/image, a runtime that cannot start
containers (permanent), everything else transient.
"""
import json
import os
import resource
import shutil
import subprocess
import time

from ...errors import PermanentCloudError, TransientCloudError

# What podman prints (stderr) for an object that does not exist; matched at this edge only and
# turned into ``PodmanError.missing`` or error classes, never passed on as text to decide by.
_MISSING_MARKERS = ("no such container", "no container with name or id", "no such image",
                    "image not known", "no such object")
# The OCI runtime refused to create the container: retrying the same call cannot help.
_RUNTIME_MARKERS = ("oci permission denied", "oci runtime error", "runc create failed",
                    "crun:", "executable file not found", "no such file or directory: oci",
                    "cannot find the runtime", "invalid runtime", "error setting rlimit")


def last_line(text):
    """The last non-empty line of podman's stderr, without its ``Error: `` prefix."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line[len("Error: "):] if line.startswith("Error: ") else line


def is_missing(stderr):
    text = (stderr or "").lower()
    return any(marker in text for marker in _MISSING_MARKERS)


def runtime_failed(stderr):
    text = (stderr or "").lower()
    return any(marker in text for marker in _RUNTIME_MARKERS)


# Default container limits, lowered to this process' own hard limits.  podman's defaults ask for
# 1048576 open files and 4194304 processes, which the runtime cannot set wherever the starting
# process holds less (many sandboxes and CI machines: measured here, nofile above 20000 or nproc
# above 32768 made every ``podman run`` fail with "OCI permission denied").
DEFAULT_ULIMITS = {"nofile": 65536, "nproc": 16384}


def host_ulimits():
    """``{name: "soft:hard"}``: ``DEFAULT_ULIMITS`` capped at this process' hard limits."""
    out = {}
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        _, hard = resource.getrlimit(which)
        value = DEFAULT_ULIMITS[name]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        out[name] = f"{value}:{value}"
    return out


class PodmanError(Exception):
    """A podman command failed: ``returncode``, its ``stderr`` and the command's ``what``."""

    def __init__(self, what, returncode, stderr):
        super().__init__(f"{what}: {last_line(stderr) or f'exit code {returncode}'}")
        self.what = what
        self.returncode = returncode
        self.stderr = stderr or ""

    @property
    def missing(self):
        return is_missing(self.stderr)

    def cloud_error(self, context):
        """The framework's error for this failure (``context`` names the provider/node)."""
        message = f"{context}: {self}"
        if runtime_failed(self.stderr) or self.missing:
            return PermanentCloudError(message)
        return TransientCloudError(message)


class PodmanCall:
    """One podman child process, polled: ``poll()`` is None while it runs, then ``(rc, out,
    err)``.  A call running longer than ``timeout`` is killed and reported as failed."""

    def __init__(self, argv, what, timeout):
        self.what = what
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.result = None
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True,
                                         start_new_session=True)
        except OSError as exc:
            raise PermanentCloudError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc

    def poll(self):
        if self.result is not None:
            return self.result
        if self.proc.poll() is None:
            if time.monotonic() < self.deadline:
                return None
            self.kill()
            _, err = self.proc.communicate()
            self.result = (-9, "", (err or "") + f"\nError: no answer within {self.timeout:g}s")
            return self.result
        out, err = self.proc.communicate()
        self.result = (self.proc.returncode, out, err)
        return self.result

    def kill(self):
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def checked(self):
        """``poll()``'s stdout once done (None while running); raises PodmanError on failure."""
        result = self.poll()
        if result is None:
            return None
        rc, out, err = result
        if rc != 0:
            raise PodmanError(self.what, rc, err)
        return out


class Podman:
    """The podman CLI with a provider's global options (``--runtime``, storage root...)."""

    def __init__(self, executable="podman", runtime=None, global_args=(), timeout=120):
        self.executable = executable
        self.runtime = runtime
        self.global_args = list(global_args)
        self.timeout = timeout

    def argv(self, *args):
        exe = shutil.which(self.executable) or self.executable
        argv = [exe] + self.global_args
        if self.runtime:
            argv += ["--runtime", self.runtime]
        return argv + [str(a) for a in args]

    def start(self, *args, what=None, timeout=None):
        """Start ``podman ARGS`` without waiting: a ``PodmanCall``."""
        return PodmanCall(self.argv(*args), what or f"podman {args[0]}",
                          self.timeout if timeout is None else timeout)

    def call(self, *args, what=None, timeout=None):
        """Run ``podman ARGS`` to the end; stdout, or PodmanError."""
        argv = self.argv(*args)
        what = what or f"podman {args[0]}"
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=self.timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired as exc:
            raise PodmanError(what, -9, f"no answer within {exc.timeout:g}s") from exc
        except OSError as exc:
            raise PodmanError(what, 127, f"cannot run {argv[0]}: {exc.strerror}") from exc
        if proc.returncode != 0:
            raise PodmanError(what, proc.returncode, proc.stderr)
        return proc.stdout

    def json(self, *args, what=None, timeout=None):
        out = self.call(*args, what=what, timeout=timeout)
        try:
            return json.loads(out) if out.strip() else []
        except ValueError as exc:
            raise PodmanError(what or f"podman {args[0]}", 0,
                              f"unreadable JSON output: {exc}") from exc

    def available(self):
        """None when the podman executable exists, else one line saying what is missing."""
        if shutil.which(self.executable) is None:
            return f"podman is not installed ({self.executable} not found on PATH)"
        if self.runtime and not os.path.isabs(self.runtime) and shutil.which(self.runtime) is None:
            return f"OCI runtime {self.runtime!r} is not installed (not found on PATH)"
        if self.runtime and os.path.isabs(self.runtime) and not os.access(self.runtime, os.X_OK):
            return f"OCI runtime {self.runtime} is not executable"
        return None
