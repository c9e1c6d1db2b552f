"""nodepool-image-create writes real images: an ext4 (or MBR-partitioned) raw disk, a qcow2 that
qemu-img accepts, a tarball of the tree, and checksum files; bad input fails with one line."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile

import pytest

from nodepool.builder import image_create

CMD = [sys.executable, "-m", "nodepool.builder.image_create"]
QEMU_IMG = shutil.which("qemu-img")


def run(args, env=None, **kw):
    full_env = dict(os.environ)
    full_env.pop("ELEMENTS_PATH", None)
    full_env.update(env or {})
    return subprocess.run(CMD + args, env=full_env, capture_output=True, text=True, timeout=60,
                          **kw)


def make_element(elements_dir, name, script=None):
    path = elements_dir / name
    path.mkdir(parents=True)
    if script is not None:
        build = path / "build.sh"
        build.write_text("#!/bin/sh\n" + script)
        build.chmod(0o755)
    return path


def test_all_formats_with_checksums(tmp_path):
    out = tmp_path / "images" / "ubuntu-0123456789abcdef0123456789abcdef"
    proc = run(["-x", "-t", "raw,qcow2,tar", "--checksum", "--no-tmpfs",
                "--qemu-img-options", "compat=0.10", "-o", str(out), "base", "vm"],
               env={"DIB_IMAGE_NAME": "ubuntu", "DIB_RELEASE": "jammy", "DIB_DEBUG": "1",
                    "DIB_PASSWORD": "hunter2"})
    assert proc.returncode == 0, proc.stderr
    assert "building ubuntu-" in proc.stdout and "qcow2: written by" in proc.stdout
    for fmt in ("raw", "qcow2", "tar"):
        path = f"{out}.{fmt}"
        data = open(path, "rb").read()
        assert open(f"{path}.md5").read().split()[0] == hashlib.md5(data).hexdigest()
        assert open(f"{path}.sha256").read().split()[0] == hashlib.sha256(data).hexdigest()

    with tarfile.open(f"{out}.tar") as tar:
        names = tar.getnames()
        assert "./etc/os-release" in names and "./etc/hostname" in names
        assert b'VERSION_ID="jammy"' in tar.extractfile("./etc/os-release").read()
        assert tar.extractfile("./etc/hostname").read() == b"ubuntu\n"
        manifest = json.load(tar.extractfile("./etc/nodepool/manifest.json"))
    assert manifest["elements"] == ["base", "vm"]
    assert manifest["environment"]["DIB_DEBUG"] == "1"
    assert manifest["environment"]["DIB_PASSWORD"] == "<redacted>"
    assert json.load(open(f"{out}.d/manifest.json"))["image"] == "ubuntu"

    raw = open(f"{out}.raw", "rb").read(2048)
    if "ext4 filesystem" in proc.stdout:
        assert raw[1024 + 56:1024 + 58] == b"\x53\xef"       # ext superblock magic
    else:
        assert raw[510:512] == b"\x55\xaa"
    assert open(f"{out}.qcow2", "rb").read(4) == b"QFI\xfb"
    if QEMU_IMG:
        info = json.loads(subprocess.run([QEMU_IMG, "info", "--output=json", f"{out}.qcow2"],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == os.path.getsize(f"{out}.raw")
    # nothing but the outputs is left behind
    assert sorted(os.listdir(out.parent)) == sorted(
        [out.name + s for s in (".d", ".raw", ".raw.md5", ".raw.sha256", ".qcow2", ".qcow2.md5",
                                ".qcow2.sha256", ".tar", ".tar.md5", ".tar.sha256")])


def test_builtin_qcow2_writer_is_read_back_identically(tmp_path):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:                     # sparse, with data in a few clusters
        f.truncate(3 * 1024 * 1024 + 512)
        for offset in (0, 70000, 2 * 1024 * 1024 + 5, 3 * 1024 * 1024):
            f.seek(offset)
            f.write(os.urandom(300))
    qcow = tmp_path / "disk.qcow2"
    image_create.write_qcow2(str(raw), str(qcow))
    header = open(qcow, "rb").read(72)
    magic, version, *_ = struct.unpack(">4sI", header[:8])
    assert (magic, version) == (b"QFI\xfb", 2)
    assert struct.unpack(">Q", header[24:32])[0] == os.path.getsize(raw)
    if not QEMU_IMG:
        pytest.skip("qemu-img not installed: header checked only")
    subprocess.run([QEMU_IMG, "check", str(qcow)], check=True, capture_output=True)
    cmp = subprocess.run([QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_partitioned_raw_fallback_has_a_valid_mbr(tmp_path):
    path = tmp_path / "disk.raw"
    payload = b"tree" * 1000
    image_create.write_raw_partitioned(payload, str(path))
    data = open(path, "rb").read()
    assert data[510:512] == b"\x55\xaa"
    entry = data[446:462]
    assert entry[4] == 0x83
    start, sectors = struct.unpack("<II", entry[8:16])
    assert start == image_create.PARTITION_START_LBA
    assert len(data) == (start + sectors) * 512
    assert data[start * 512:start * 512 + len(payload)] == payload


def test_elements_from_elements_path_run_inside_the_tree(tmp_path):
    elements = tmp_path / "elements"
    make_element(elements, "hello", "echo built-by-element > etc/motd\necho element-output\n")
    make_element(elements, "plain")
    out = tmp_path / "img-1"
    proc = run(["-t", "tar", "-o", str(out), "hello", "plain"],
               env={"ELEMENTS_PATH": f"{tmp_path / 'nowhere'}:{elements}"})
    assert proc.returncode == 0, proc.stderr
    assert "element-output" in proc.stdout
    with tarfile.open(f"{out}.tar") as tar:
        assert tar.extractfile("./etc/motd").read() == b"built-by-element\n"


def test_failing_element_exits_with_its_code_and_leaves_nothing(tmp_path):
    elements = tmp_path / "elements"
    make_element(elements, "broken", "echo breaking >&2\nexit 3\n")
    out = tmp_path / "out" / "img-2"
    proc = run(["-t", "qcow2,tar", "--checksum", "-o", str(out), "broken"],
               env={"ELEMENTS_PATH": str(elements)})
    assert proc.returncode == 3
    assert "element broken" in proc.stderr and "exited with 3" in proc.stderr
    assert os.listdir(out.parent) == []


def test_unknown_format_and_unknown_element_are_one_line_errors(tmp_path):
    proc = run(["-t", "qcow2,vhdx", "-o", str(tmp_path / "x"), "base"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("nodepool-image-create: error: unknown image format 'vhdx' "
                                   "(supported: raw, qcow2, tar)")
    (tmp_path / "elements").mkdir()
    proc = run(["-t", "tar", "-o", str(tmp_path / "x"), "no-such-element"],
               env={"ELEMENTS_PATH": str(tmp_path / "elements")})
    assert proc.returncode == 2
    assert "element 'no-such-element' not found in ELEMENTS_PATH" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unwritable_output_directory(tmp_path):
    # A regular file where a directory should be: fails even for root.
    (tmp_path / "not-a-dir").write_text("")
    proc = run(["-t", "tar", "-o", str(tmp_path / "not-a-dir" / "images" / "img"), "base"])
    assert proc.returncode == 1
    assert "cannot create output directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
