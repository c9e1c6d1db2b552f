"""``nodepool-image-create``: a small, real image build command run like diskimage-builder.

It accepts the arguments Nodepool gives ``disk-image-create``::

    nodepool-image-create -x -t raw,qcow2,tar --checksum --no-tmpfs \
        [--qemu-img-options compat=0.10] -o OUTPUT_BASE element...

and writes ``OUTPUT_BASE.<format>`` for each format (plus ``.md5``/``.sha256`` with
``--checksum``) and a manifest directory ``OUTPUT_BASE.d/``.  The image content is a tiny root
tree (``/etc/os-release``, ``/etc/hostname``, a manifest of the elements and ``DIB_*``
environment); elements are directories under ``ELEMENTS_PATH`` whose optional executable
``build.sh`` runs inside the tree (``TARGET_ROOT``), so a test element can fail, hang or add files.

Formats: ``tar`` is a tarball of the tree; ``raw`` is an ext4 filesystem of it (``mke2fs -d``) or,
without mke2fs, a disk with an MBR partition table whose one partition holds a tar of the tree;
``qcow2`` comes from ``qemu-img convert`` or, without qemu-img, from our own qcow2 v2 writer.

The built-in elements ``debian-minimal``, ``openssh-server`` and ``devuser`` (``debian_root.py``)
make the tree a real Debian node instead: a cached debootstrap root, sshd and the node user.
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time

from . import debian_root

FORMATS = ("raw", "qcow2", "tar")
SECTOR = 512
PARTITION_START_LBA = 2048            # 1 MiB, as partitioning tools align
MIB = 1024 * 1024
_SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")


class ImageCreateError(Exception):
    """A build cannot go on: one line for the operator, and the exit code to use."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def progress(message):
    """One progress line on stdout, flushed at once (the builder streams it into the build log)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {message}", flush=True)


# -- arguments and elements -----------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="nodepool-image-create",
        description="Build a small real disk image the way disk-image-create is run.")
    parser.add_argument("-x", dest="trace", action="store_true", help="trace (accepted)")
    parser.add_argument("-t", dest="formats", default="qcow2",
                        help="comma-separated output formats: " + ", ".join(FORMATS))
    parser.add_argument("-o", dest="output", required=True, help="output path without extension")
    parser.add_argument("-a", dest="arch", default="amd64", help="architecture (recorded)")
    parser.add_argument("--checksum", action="store_true", help="write .md5 and .sha256 files")
    parser.add_argument("--no-tmpfs", action="store_true", help="accepted; no tmpfs is used")
    parser.add_argument("--qemu-img-options", default="", help="qcow2 options, e.g. compat=0.10")
    parser.add_argument("--image-size", type=int, default=16,
                        help="raw filesystem size in MiB (default 16)")
    parser.add_argument("elements", nargs="+", help="elements to include")
    return parser.parse_args(argv)


def requested_formats(text):
    formats = [f.strip() for f in text.split(",") if f.strip()]
    if not formats:
        raise ImageCreateError("no output format given (-t)", 2)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ImageCreateError(f"unknown image format {fmt!r} "
                                   f"(supported: {', '.join(FORMATS)})", 2)
    return list(dict.fromkeys(formats))


def find_elements(elements, elements_path):
    """``{element: directory or None}``; with ELEMENTS_PATH set every element must exist in it."""
    dirs = [d for d in (elements_path or "").split(":") if d]
    found = {}
    for element in elements:
        match = next((os.path.join(d, element) for d in dirs
                      if os.path.isdir(os.path.join(d, element))), None)
        if dirs and match is None and element not in debian_root.BUILTIN_ELEMENTS:
            raise ImageCreateError(f"element {element!r} not found in ELEMENTS_PATH "
                                   f"{':'.join(dirs)}", 2)
        found[element] = match
    return found


def recorded_environment(environ):
    """The ``DIB_*`` variables for the manifest, with values of secret-looking names hidden."""
    out = {}
    for key in sorted(environ):
        if key.startswith("DIB_") or key == "ELEMENTS_PATH":
            secret = any(word in key.upper() for word in _SECRET_WORDS)
            out[key] = "<redacted>" if secret else environ[key]
    return out


# -- the root tree ------------------------------------------------------------------------------

def write_root_tree(root, elements, environ, arch):
    """Populate ``root`` with the files every image has, then run element ``build.sh`` scripts."""
    name = environ.get("DIB_IMAGE_NAME") or "image"
    release = environ.get("DIB_RELEASE") or "0"
    base = None
    if debian_root.wanted(elements):
        base = debian_root.lay_down(root, elements, environ, arch)
        if "devuser" in elements:
            debian_root.add_user(root, environ)
    etc = os.path.join(root, "etc")
    os.makedirs(etc, exist_ok=True)
    if base is None:
        with open(os.path.join(etc, "os-release"), "w") as f:
            f.write(f'NAME="Nodepool Image"\nID=nodepool\nVERSION_ID="{release}"\n'
                    f'PRETTY_NAME="Nodepool Image {name} {release}"\n')
    with open(os.path.join(etc, "hostname"), "w") as f:
        f.write(f"{name}\n")
    manifest = {"image": name, "release": release, "arch": arch, "elements": list(elements),
                "environment": recorded_environment(environ), "created": int(time.time())}
    if base is not None:
        manifest["base"] = base
    manifest_dir = os.path.join(etc, "nodepool")
    os.makedirs(manifest_dir, exist_ok=True)
    with open(os.path.join(manifest_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    for element, directory in elements.items():
        run_element(element, directory, root, environ)
    if base is not None:
        debian_root.finish(root)
    return manifest


def run_element(element, directory, root, environ):
    script = os.path.join(directory, "build.sh") if directory else None
    if not script or not os.path.isfile(script):
        builtin = element in debian_root.BUILTIN_ELEMENTS
        progress(f"element {element}: {'built in' if builtin else 'nothing to run'}")
        return
    if not os.access(script, os.X_OK):
        raise ImageCreateError(f"element {element}: {script} is not executable")
    progress(f"element {element}: running {script}")
    env = dict(environ, TARGET_ROOT=root)
    proc = subprocess.run([script], cwd=root, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ImageCreateError(f"element {element}: {script} exited with {proc.returncode}",
                               proc.returncode if 0 < proc.returncode < 126 else 1)


def tar_bytes(root):
    """An uncompressed tarball of ``root`` (owned by root, as an image tree is)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def as_root(info):
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info
        tar.add(root, arcname=".", filter=as_root)
    return buf.getvalue()


# -- raw ---------------------------------------------------------------------------------------

def write_raw_ext4(root, path, size_mib):
    """An ext4 filesystem image of ``root``; False when mke2fs cannot do it here."""
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/sbin:/usr/sbin")
    if not mke2fs:
        return False
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    proc = subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-L", "cloudimg-rootfs",
                           "-d", root, path], capture_output=True, text=True)
    if proc.returncode != 0:
        progress(f"mke2fs failed ({proc.stderr.strip() or proc.returncode}); "
                 "falling back to a partitioned disk")
        os.unlink(path)
        return False
    return True


def mbr(partition_sectors, start_lba=PARTITION_START_LBA, partition_type=0x83):
    """A 512-byte MBR with one bootable-flag-free partition of ``partition_sectors`` sectors."""
    def chs(_lba):
        return b"\xfe\xff\xff"       # "use LBA" marker, as modern tools write for large disks
    entry = (struct.pack("<B", 0x00) + chs(start_lba) + struct.pack("<B", partition_type)
             + chs(start_lba + partition_sectors - 1)
             + struct.pack("<II", start_lba, partition_sectors))
    signature = struct.pack("<I", int.from_bytes(os.urandom(4), "little"))
    sector = bytearray(SECTOR)
    sector[440:444] = signature
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def write_raw_partitioned(payload, path):
    """A raw disk: MBR, then one Linux partition (from 1 MiB) holding ``payload``."""
    partition_bytes = -(-max(len(payload), 1) // MIB) * MIB
    with open(path, "wb") as f:
        f.write(mbr(partition_bytes // SECTOR))
        f.seek(PARTITION_START_LBA * SECTOR)
        f.write(payload)
        f.truncate(PARTITION_START_LBA * SECTOR + partition_bytes)


# -- qcow2 -------------------------------------------------------------------------------------

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_COPIED = 1 << 63


def write_qcow2(raw_path, path, cluster_bits=16):
    """Write ``raw_path`` as a qcow2 version 2 image (all-zero clusters stay unallocated).

    Layout: header, L1 table, refcount table, refcount blocks, L2 tables, data clusters; every
    cluster has refcount 1, so L1/L2 entries carry the COPIED flag.
    """
    cluster = 1 << cluster_bits
    size = os.path.getsize(raw_path)
    virtual_size = -(-size // SECTOR) * SECTOR
    l2_entries = cluster // 8
    n_clusters = -(-virtual_size // cluster)
    l1_size = max(1, -(-n_clusters // l2_entries))
    l1_clusters = -(-(l1_size * 8) // cluster)

    data_index = []                   # guest cluster numbers that hold data
    with open(raw_path, "rb") as f:
        for i in range(n_clusters):
            chunk = f.read(cluster)
            if chunk.strip(b"\0"):
                data_index.append(i)
    used_l1 = sorted({i // l2_entries for i in data_index})

    fixed = 1 + l1_clusters + 1 + len(used_l1) + len(data_index)
    refblock_entries = cluster // 2   # 16-bit refcounts
    n_refblocks = 1
    while (fixed + n_refblocks) > n_refblocks * refblock_entries:
        n_refblocks += 1
    if n_refblocks > cluster // 8:
        raise ImageCreateError("image too large for the built-in qcow2 writer")

    l1_offset = cluster
    reftable_offset = l1_offset + l1_clusters * cluster
    refblocks_offset = reftable_offset + cluster
    l2_offset = refblocks_offset + n_refblocks * cluster
    data_offset = l2_offset + len(used_l1) * cluster
    total_clusters = fixed + n_refblocks

    header = struct.pack(">4sIQIIQIIQQIIQ", QCOW2_MAGIC, 2, 0, 0, cluster_bits, virtual_size, 0,
                         l1_size, l1_offset, reftable_offset, 1, 0, 0)
    l1 = [0] * l1_size
    l2_tables = {idx: [0] * l2_entries for idx in used_l1}
    for n, idx in enumerate(used_l1):
        l1[idx] = (l2_offset + n * cluster) | QCOW2_COPIED
    for n, guest in enumerate(data_index):
        l2_tables[guest // l2_entries][guest % l2_entries] = \
            (data_offset + n * cluster) | QCOW2_COPIED
    refcounts = [1] * total_clusters + [0] * (n_refblocks * refblock_entries - total_clusters)

    with open(path, "wb") as out, open(raw_path, "rb") as src:
        out.write(header.ljust(cluster, b"\0"))
        out.write(struct.pack(f">{l1_size}Q", *l1).ljust(l1_clusters * cluster, b"\0"))
        reftable = [refblocks_offset + i * cluster for i in range(n_refblocks)]
        out.write(struct.pack(f">{n_refblocks}Q", *reftable).ljust(cluster, b"\0"))
        out.write(struct.pack(f">{len(refcounts)}H", *refcounts))
        for idx in used_l1:
            out.write(struct.pack(f">{l2_entries}Q", *l2_tables[idx]))
        for guest in data_index:
            src.seek(guest * cluster)
            out.write(src.read(cluster).ljust(cluster, b"\0"))


def convert_qcow2(raw_path, path, options):
    """qcow2 via ``qemu-img convert`` when present, else our own writer.  Returns which."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img:
        cmd = [qemu_img, "convert", "-f", "raw", "-O", "qcow2"]
        if options:
            cmd += ["-o", options]
        proc = subprocess.run(cmd + [raw_path, path], capture_output=True, text=True)
        if proc.returncode == 0:
            return "qemu-img convert"
        progress(f"qemu-img convert failed ({proc.stderr.strip()}); using the built-in writer")
    write_qcow2(raw_path, path)
    return "built-in qcow2 v2 writer"


# -- checksums and main --------------------------------------------------------------------------

def write_checksums(path):
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            md5.update(chunk)
            sha256.update(chunk)
    name = os.path.basename(path)
    for ext, digest in (("md5", md5), ("sha256", sha256)):
        with open(f"{path}.{ext}", "w") as f:
            f.write(f"{digest.hexdigest()}  {name}\n")


def remove_outputs(output):
    """Remove whatever a failed build wrote, so no partial image is ever uploaded."""
    for fmt in FORMATS:
        for suffix in ("", ".md5", ".sha256"):
            try:
                os.unlink(f"{output}.{fmt}{suffix}")
            except FileNotFoundError:
                pass
    shutil.rmtree(f"{output}.d", ignore_errors=True)


def build_image(args, environ):
    """Build every requested format; returns the list of files written."""
    formats = requested_formats(args.formats)
    elements = find_elements(args.elements, environ.get("ELEMENTS_PATH"))
    output = os.path.abspath(args.output)
    out_dir = os.path.dirname(output)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ImageCreateError(f"cannot create output directory {out_dir}: {exc.strerror}")
    if not os.access(out_dir, os.W_OK):
        raise ImageCreateError(f"output directory {out_dir} is not writable")
    progress(f"building {os.path.basename(output)}: formats {','.join(formats)}, "
             f"elements {' '.join(elements)}")
    # The work tree lives inside the build's own ``.d`` directory, so whoever removes a
    # build's files also removes what a killed build left behind.
    manifest_dir = f"{output}.d"
    os.makedirs(manifest_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="work-", dir=manifest_dir)
    written = []
    try:
        root = os.path.join(work, "root")
        os.makedirs(root)
        manifest = write_root_tree(root, elements, environ, args.arch)
        with open(os.path.join(manifest_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        full_os = "base" in manifest      # owners and modes matter: system tar, on disk
        payload = None if full_os else tar_bytes(root)

        raw_path = f"{output}.raw" if "raw" in formats else os.path.join(work, "disk.raw")
        if "raw" in formats or "qcow2" in formats:
            if write_raw_ext4(root, raw_path, args.image_size):
                progress(f"raw: ext4 filesystem image written with mke2fs -d ({raw_path})")
            else:
                write_raw_partitioned(payload if payload is not None else tar_bytes(root),
                                      raw_path)
                progress("raw: mke2fs -d not available; wrote a disk with an MBR partition "
                         f"table holding a tar of the tree ({raw_path})")
        if "raw" in formats:
            written.append(raw_path)
        if "qcow2" in formats:
            how = convert_qcow2(raw_path, f"{output}.qcow2", args.qemu_img_options)
            progress(f"qcow2: written by {how}")
            written.append(f"{output}.qcow2")
        if "tar" in formats:
            if payload is None:
                debian_root.write_tar(root, f"{output}.tar")
            else:
                with open(f"{output}.tar", "wb") as f:
                    f.write(payload)
            progress(f"tar: {os.path.getsize(output + '.tar')} bytes")
            written.append(f"{output}.tar")
        if args.checksum:
            for path in written:
                write_checksums(path)
            progress("checksums written")
    except BaseException:
        remove_outputs(output)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return written


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = build_image(args, dict(os.environ))
    except ImageCreateError as exc:
        print(f"nodepool-image-create: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except debian_root.DebianRootError as exc:
        print(f"nodepool-image-create: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        print(f"nodepool-image-create: error: {exc}", file=sys.stderr, flush=True)
        return 1
    for path in written:
        progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
