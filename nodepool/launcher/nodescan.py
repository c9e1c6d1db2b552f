"""Waiting for a booted node to answer and collecting its SSH host keys, without blocking.

``NodeScan.advance()`` is called repeatedly by a provider worker: it tries a non-blocking TCP
connect, then runs ``ssh-keyscan`` as a child process it polls.  It returns the host keys when
done and raises ``LaunchTimeout`` when the boot timeout passes first.
"""
import errno
import shutil
import socket
import subprocess
import time

from ..errors import LaunchTimeout

RETRY_INTERVAL = 1.0
# ssh-keyscan opens one connection per key type; a busy sshd (MaxStartups) drops some of them
# and the scan returns a subset of the host's keys.  Such a scan is repeated this many times in
# all, keeping the union, so a node is not stored with fewer keys than its host offers.
KEYSCAN_ATTEMPTS = 3


class NodeScan:
    def __init__(self, host, port=22, timeout=60, connection_type="ssh", clock=time.monotonic):
        self.host = host
        self.port = int(port or 22)
        self.timeout = timeout
        self.connection_type = connection_type or "ssh"
        self.clock = clock
        self.started = clock()
        self.state = "connect"
        self._sock = None
        self._proc = None
        self._next_try = 0.0
        self._keys = set()
        self._scans = 0
        self.last_error = None

    def _check_timeout(self):
        if self.clock() - self.started > self.timeout:
            self.close()
            detail = f": {self.last_error}" if self.last_error else ""
            raise LaunchTimeout(f"{self.host}:{self.port} did not answer within "
                                f"{self.timeout}s{detail}")

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def advance(self):
        """One non-blocking step; the list of host keys when done, else None."""
        self._check_timeout()
        if self.clock() < self._next_try:
            return None
        if self.state == "connect":
            if self._connect_step():
                if self.connection_type not in ("ssh", "network_cli"):
                    self.state = "done"
                    return []
                self.state = "keyscan"
            else:
                return None
        if self.state == "keyscan":
            return self._keyscan_step()
        return None

    def _connect_step(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self._sock is None:
            self._sock = socket.socket(family, socket.SOCK_STREAM)
            self._sock.setblocking(False)
            rc = self._sock.connect_ex((self.host, self.port))
            if rc not in (0, errno.EINPROGRESS, errno.EAGAIN):
                return self._retry(f"connect: {errno.errorcode.get(rc, rc)}")
            if rc == 0:
                self.close()
                return True
        rc = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc == 0:
            try:
                self._sock.getpeername()
            except OSError:
                # still connecting
                return False
            self.close()
            return True
        return self._retry(f"connect: {errno.errorcode.get(rc, rc)}")

    def _retry(self, error):
        self.last_error = error
        self.close()
        self._next_try = self.clock() + RETRY_INTERVAL
        return False

    def _keyscan_step(self):
        if self._proc is None:
            binary = shutil.which("ssh-keyscan")
            if binary is None:
                raise LaunchTimeout("ssh-keyscan is not installed: cannot scan host keys "
                                    "(install openssh-client or set host-key-checking: false)")
            self._proc = subprocess.Popen(
                [binary, "-T", "10", "-p", str(self.port), self.host],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            return None
        if self._proc.poll() is None:
            return None
        out, err = self._proc.communicate()
        self._proc = None
        self._keys.update(parse_keyscan(out))
        failures = keyscan_failures(err)
        if self._keys:
            self._scans += 1        # scans since the host first showed keys
            if not failures or self._scans >= KEYSCAN_ATTEMPTS:
                self.state = "done"
                return sorted(self._keys)
            # some connections were dropped: scan again, shortly, for the keys they would
            # have shown
            self.last_error = f"ssh-keyscan partial ({failures[-1]})"
            self._next_try = self.clock() + RETRY_INTERVAL / 4
            return None
        self._retry(f"ssh-keyscan found no keys ({failures[-1] if failures else 'no output'})")
        self.state = "keyscan"
        return None


def keyscan_failures(stderr):
    """ssh-keyscan's error lines (a dropped or refused connection each); its ``#`` banner
    comments are not errors."""
    return [line.strip() for line in (stderr or "").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def parse_keyscan(output):
    """``host keytype base64`` lines into ``keytype base64`` strings (comments skipped)."""
    keys = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 3:
            keys.append(f"{parts[1]} {parts[2]}")
    return sorted(set(keys))
