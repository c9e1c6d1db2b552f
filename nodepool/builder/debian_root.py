"""Built-in elements of ``nodepool-image-create`` that make a real node: a Debian root, sshd and
the node user (named after diskimage-builder's elements, with their environment variables).

- ``debian-minimal``: the tree starts as a Debian root from ``debootstrap --variant=minbase``
  (release ``DIB_RELEASE``, default ``bookworm``; mirror ``DIB_DISTRIBUTION_MIRROR``, default the
  Debian mirror apt uses on this machine) with python3 and iproute2.  The debootstrap result is
  cached as a tarball under ``DIB_IMAGE_CACHE`` (default ``~/.cache/image-create``), one per
  release, mirror, architecture and package set, so later builds unpack it in seconds instead of
  bootstrapping again (about 45 s).
- ``openssh-server``: adds sshd.  The image carries no SSH host keys: every node makes its own at
  first start (the podman driver's default command runs ``ssh-keygen -A``).
- ``devuser``: the node user ``DIB_DEV_USER_USERNAME`` (default ``zuul``) with the keys of the
  file ``DIB_DEV_USER_AUTHORIZED_KEYS`` authorized; ``DIB_DEV_USER_PWDLESS_SUDO=yes`` adds sudo
  without a password.

Only ``debian-minimal`` needs root (debootstrap, chroot).
"""
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

DEFAULT_RELEASE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "iproute2")
ELEMENT_PACKAGES = {"debian-minimal": BASE_PACKAGES, "openssh-server": ("openssh-server",),
                    "devuser": ()}
BUILTIN_ELEMENTS = tuple(ELEMENT_PACKAGES)


class DebianRootError(Exception):
    """The Debian root cannot be made; one line for the operator."""


def _say(message):
    from .image_create import progress
    progress(message)


def wanted(elements):
    """Whether ``elements`` ask for a Debian root."""
    return "debian-minimal" in elements


def packages(elements, environ):
    """The packages debootstrap installs for these elements (sorted, for the cache key)."""
    out = set()
    for element in elements:
        out.update(ELEMENT_PACKAGES.get(element, ()))
    if "devuser" in elements and _yes(environ.get("DIB_DEV_USER_PWDLESS_SUDO")):
        out.add("sudo")
    return sorted(out)


def _yes(value):
    return (value or "").strip().lower() in ("1", "yes", "true", "y")


def apt_mirror(paths=("/etc/apt/sources.list", "/etc/apt/sources.list.d")):
    """The Debian archive this machine's apt uses (not the security archive), else the
    default mirror."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.list"))
                            + glob.glob(os.path.join(path, "*.sources")))
        elif os.path.isfile(path):
            files.append(path)
    for name in files:
        try:
            with open(name) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split("#", 1)[0].split()
            uris = (words[1:] if words[:1] == ["URIs:"]
                    else [w for w in words[1:] if "://" in w][:1] if words[:1] == ["deb"]
                    else [])
            for uri in uris:
                if uri.rstrip("/").endswith("/debian") and "security" not in uri:
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def cache_file(environ, release, mirror, arch, pkgs):
    directory = environ.get("DIB_IMAGE_CACHE") or os.path.expanduser("~/.cache/image-create")
    key = hashlib.sha256(f"{release}\n{mirror}\n{arch}\n{','.join(pkgs)}".encode()).hexdigest()
    return os.path.join(directory, f"debootstrap-{release}-{arch}-{key[:12]}.tar")


def _run(argv, what, **kw):
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, **kw)
    except OSError as exc:
        raise DebianRootError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        raise DebianRootError(f"{what} failed (exit code {proc.returncode})")
    return proc


def _bootstrap_tarball(path, release, mirror, arch, pkgs):
    """Run debootstrap into a scratch tree beside ``path`` and save it as ``path``."""
    if shutil.which("debootstrap") is None and not os.path.exists("/usr/sbin/debootstrap"):
        raise DebianRootError("debian-minimal needs debootstrap (apt-get install debootstrap)")
    work = tempfile.mkdtemp(prefix="debootstrap-", dir=os.path.dirname(path))
    try:
        tree = os.path.join(work, "root")
        _say(f"debian-minimal: debootstrap {release} from {mirror} ({arch}; "
             f"{' '.join(pkgs)}); cached as {path}")
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        _run([debootstrap, "--variant=minbase", f"--arch={arch}",
              f"--include={','.join(pkgs)}", release, tree, mirror], "debootstrap")
        # nothing machine-specific or bulky in the cached tree
        for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_Packages",
                        "etc/ssh/ssh_host_*"):
            for name in glob.glob(os.path.join(tree, pattern)):
                os.unlink(name)
        partial = os.path.join(work, "root.tar")
        _run(["tar", "--numeric-owner", "-C", tree, "-cf", partial, "."], "tar of the root")
        os.replace(partial, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def lay_down(root, elements, environ, arch):
    """Unpack the (cached) Debian root into ``root``; returns a description for the manifest.
    Concurrent builds share one bootstrap: the first makes the tarball under a lock."""
    if os.geteuid() != 0:
        raise DebianRootError("debian-minimal needs root (debootstrap and chroot)")
    release = environ.get("DIB_RELEASE") or DEFAULT_RELEASE
    if release == "0":
        release = DEFAULT_RELEASE
    mirror = (environ.get("DIB_DISTRIBUTION_MIRROR") or apt_mirror()).rstrip("/")
    pkgs = packages(elements, environ)
    path = cache_file(environ, release, mirror, arch, pkgs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            _say(f"debian-minimal: using the cached root {path}")
        else:
            _bootstrap_tarball(path, release, mirror, arch, pkgs)
    _run(["tar", "--numeric-owner", "-C", root, "-xpf", path], "unpacking the cached root")
    return f"debian {release} ({mirror}) with {' '.join(pkgs)}"


def add_user(root, environ):
    """The ``devuser`` element: the node user with its authorized keys (and sudo)."""
    user = environ.get("DIB_DEV_USER_USERNAME") or "zuul"
    keys_file = environ.get("DIB_DEV_USER_AUTHORIZED_KEYS")
    keys = ""
    if keys_file:
        try:
            with open(keys_file) as f:
                keys = f.read()
        except OSError as exc:
            raise DebianRootError(f"devuser: cannot read DIB_DEV_USER_AUTHORIZED_KEYS "
                                  f"{keys_file}: {exc.strerror}") from exc
    _run(["chroot", root, "useradd", "--create-home", "--shell", "/bin/bash", user],
         f"devuser: useradd {user}")
    # "*": no password, but not a locked account (sshd refuses locked ones without PAM)
    _run(["chroot", root, "usermod", "--password", "*", user], f"devuser: usermod {user}")
    ssh_dir = os.path.join(root, "home", user, ".ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(ssh_dir, "authorized_keys"), "w") as f:
        f.write(keys)
    os.chmod(os.path.join(ssh_dir, "authorized_keys"), 0o600)
    _run(["chroot", root, "chown", "-R", f"{user}:{user}", f"/home/{user}/.ssh"],
         f"devuser: chown {user}")
    if _yes(environ.get("DIB_DEV_USER_PWDLESS_SUDO")):
        sudoers = os.path.join(root, "etc", "sudoers.d", f"{user}")
        os.makedirs(os.path.dirname(sudoers), exist_ok=True)
        with open(sudoers, "w") as f:
            f.write(f"{user} ALL=(ALL) NOPASSWD:ALL\n")
        os.chmod(sudoers, 0o440)
    _say(f"devuser: user {user} with {len(keys.split(chr(10))) - 1 if keys else 0} "
         "authorized key(s)")


def finish(root):
    """What no image may carry: SSH host keys (every node makes its own)."""
    for name in glob.glob(os.path.join(root, "etc", "ssh", "ssh_host_*")):
        os.unlink(name)


def write_tar(root, path):
    """A tarball of a full OS tree with its owners and modes kept (``tar --numeric-owner``)."""
    _run(["tar", "--numeric-owner", "-C", root, "-cf", path, "."], f"tar of {root}")
