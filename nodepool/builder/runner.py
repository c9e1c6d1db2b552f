"""Run a diskimage's build command the way Nodepool runs ``disk-image-create``.

``<dib-cmd> -x -t <formats> --checksum --no-tmpfs [--qemu-img-options compat=0.10] \
    -o <images-dir>/<image>-<build_id> <elements>``

in its own process group, with ``DIB_RELEASE``, ``DIB_IMAGE_NAME``, ``DIB_IMAGE_FILENAME``,
``ELEMENTS_PATH`` and the image's ``env-vars``, all output streamed to
``<build-log-dir>/<image>-<build_id>.log`` ending with ``Exit code: N``.  After ``build-timeout``
(or when the daemon stops) the whole group is killed.  The result says which files were written;
a build that exits 0 without writing a requested format is a failure.
"""
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

import nodepool
from ..model.images import build_base_path, build_file_path, parse_build_file_name

KILL_GRACE = 5.0        # seconds between SIGTERM and SIGKILL of a timed-out build's group


@dataclass
class BuildResult:
    """What one run of the build command produced."""
    log_path: str
    exit_code: Optional[int] = None
    error: Optional[str] = None          # one line when the build failed
    files: dict = field(default_factory=dict)   # format -> path, only when ok

    @property
    def ok(self):
        return self.error is None


def build_command(image, build_id, images_dir, elements_dir=None, environ=None):
    """``(argv, env)`` for building ``image`` (a ``config.model.DiskImage``) as ``build_id``."""
    formats = list(dict.fromkeys(image.formats))
    base = build_base_path(images_dir, image.name, build_id)
    dib_cmd = image.dib_cmd.replace("%p", os.path.dirname(os.path.abspath(nodepool.__file__)))
    argv = shlex.split(dib_cmd) + ["-x", "-t", ",".join(formats), "--checksum", "--no-tmpfs"]
    if "qcow2" in formats:
        argv += ["--qemu-img-options", "compat=0.10"]
    argv += ["-o", base] + list(image.elements)
    env = dict(os.environ if environ is None else environ)
    env.update({str(k): str(v) for k, v in (image.env_vars or {}).items()})
    env["DIB_IMAGE_NAME"] = image.name
    env["DIB_IMAGE_FILENAME"] = base
    if image.release not in (None, ""):
        env["DIB_RELEASE"] = str(image.release)
    if elements_dir:
        env["ELEMENTS_PATH"] = elements_dir
    return argv, env


def build_log_path(log_dir, image, build_id):
    return os.path.join(log_dir, f"{image}-{build_id}.log")


def prune_build_logs(log_dir, image, retention):
    """Keep the newest ``retention`` logs of ``image`` (at least 1; negative keeps all)."""
    if retention is None or retention < 0:
        return []
    try:
        names = os.listdir(log_dir)
    except OSError:
        return []
    logs = []
    for name in names:
        parsed = parse_build_file_name(name)
        if parsed and parsed[0] == image and name.endswith(".log"):
            path = os.path.join(log_dir, name)
            try:
                logs.append((os.stat(path).st_mtime_ns, name, path))
            except OSError:
                pass
    logs.sort(reverse=True)
    removed = []
    for _, _, path in logs[max(retention, 1):]:
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def kill_orphaned_build(base_path, proc_dir="/proc"):
    """SIGKILL every process of ours still running a build of ``base_path`` (found by its
    ``DIB_IMAGE_FILENAME``): what a killed builder left behind.  Returns the PIDs killed."""
    marker = f"DIB_IMAGE_FILENAME={base_path}".encode()
    killed = []
    try:
        pids = [int(name) for name in os.listdir(proc_dir) if name.isdigit()]
    except OSError:
        return killed
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            with open(os.path.join(proc_dir, str(pid), "environ"), "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def _kill_group(proc):
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGKILL)   # stragglers left in the group
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_build(image, build_id, images_dir, log_dir, elements_dir=None, timeout=None,
              should_stop=None, environ=None, poll=0.2):
    """Run the build and return a ``BuildResult``; never raises for a failing build.

    ``should_stop`` is a callable polled while waiting: True kills the build (daemon stopping).
    """
    os.makedirs(log_dir, exist_ok=True)
    log_path = build_log_path(log_dir, image.name, build_id)
    timeout = image.build_timeout if timeout is None else timeout
    argv, env = build_command(image, build_id, images_dir, elements_dir, environ)
    with open(log_path, "ab", buffering=0) as log:
        def note(text):
            log.write(text.encode() + b"\n")

        note(f"Running: {shlex.join(argv)}")
        try:
            os.makedirs(images_dir, exist_ok=True)
        except OSError as exc:
            note(f"cannot create images-dir {images_dir}: {exc.strerror}")
            note("Exit code: 1")
            return BuildResult(log_path, 1, f"cannot create images-dir {images_dir}: "
                                            f"{exc.strerror}")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except (FileNotFoundError, PermissionError) as exc:
            what = "command not found" if isinstance(exc, FileNotFoundError) else \
                "command not executable"
            note(f"{what}: {argv[0]}")
            note("Exit code: 127")
            return BuildResult(log_path, 127, f"{what}: {argv[0]}")
        deadline = time.monotonic() + timeout
        error = None
        while True:
            try:
                proc.wait(poll)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                error = f"build timed out after {timeout}s"
            elif should_stop is not None and should_stop():
                error = "build stopped: the builder is shutting down"
            if error:
                note(error + "; killing its process group")
                _kill_group(proc)
                break
        code = proc.returncode
        note(f"Exit code: {code}")
    if error:
        return BuildResult(log_path, code, error)
    if code != 0:
        return BuildResult(log_path, code, f"build command exited with {code}")
    files = {fmt: build_file_path(images_dir, image.name, build_id, fmt)
             for fmt in dict.fromkeys(image.formats)}
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        return BuildResult(log_path, code, f"build command wrote no {', '.join(missing)}")
    return BuildResult(log_path, code, None, files)
