# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""A small Linux guest image, built here from Debian packages.

A raw disk image (MBR, one ext4 partition from 1 MiB, label
``thunder-root``) that boots the way Nova boots a volume or a cloud
image: SeaBIOS runs GRUB's boot sector, GRUB's core image (in the gap
before the partition) reads Debian's cloud kernel and a small initramfs
from the partition's ``/boot``; the initramfs loads the disk drivers
(virtio-blk, virtio-scsi), mounts the root file system from the disk by
its label and switches to it; busybox ``init`` runs ``/etc/init.d/rcS``,
which reads and checks a set of files from the disk (the boot set),
notes the boot on the disk, prints the marker line on the serial console
(``console=ttyS0``, what ``openstack console log show`` shows) and stays
up idle; busybox ``acpid`` powers the guest off on an ACPI power button
press (``openstack server stop``). The marker line::

    THUNDER-GUEST-READY uuid=<SMBIOS uuid: Nova's instance uuid>
        host=thunder-guest root=/dev/vda1 fs=ext4 read=<bytes> files=<n>
        check=ok boot=<n-th boot of this disk> uptime=<s>

(one line). A failed boot prints ``THUNDER-GUEST-FAILED <why>`` instead
and stays up.

Build (cached by its inputs)::

    python -m thunder_stack.guest build [--out DIR] [--size-mib 64]
        [--filler-mib N | --fill] [--format raw|qcow2]

Boot it under qemu as libvirt boots Nova's volumes, and time it::

    python -m thunder_stack.guest boot IMAGE [--runs 3]

Only ``.deb`` files are downloaded (``apt-get download``: Debian's cloud
kernel, ``busybox-static``, ``grub-pc-bin`` and ``grub-common``) and
unpacked with ``dpkg-deb -x``; the file system is made and filled with
``mke2fs -d`` (no mount, no loop device, no root needed except to
install missing host tools); GRUB's boot sector and core image
(``grub-mkimage`` from the downloaded ``grub-common``) are written into
the image file directly. A build is kept in ``DIR/KEY/`` where KEY is a
digest of its inputs (the packages' versions and checksums as apt knows
them, the options, the source of the modules that make it), and reused
while they are
unchanged.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time

from thunder_stack.guest import common
from thunder_stack.guest import debs
from thunder_stack.guest import disk
from thunder_stack.guest import marker
from thunder_stack.guest import rootfs

# The API, for other code: the marker and how to read it, the errors.
MARKER = marker.MARKER
FAILURE_MARKER = marker.FAILURE_MARKER
parse_marker = marker.parse_marker
marker_seen = marker.marker_seen
failure_seen = marker.failure_seen
GuestError = common.GuestError
ROOT_LABEL = rootfs.ROOT_LABEL

DEFAULT_SIZE_MIB = 64
MIN_SIZE_MIB = 32
#: Memory the guest needs (it boots with 96 MiB under qemu 7.2).
MIN_RAM_MIB = 128
FORMATS = ('raw', 'qcow2')
#: Host tools and the Debian packages that have them.
HOST_TOOLS = {'apt-get': 'apt', 'dpkg-deb': 'dpkg', 'mke2fs': 'e2fsprogs',
              'e2fsck': 'e2fsprogs', 'dumpe2fs': 'e2fsprogs',
              'debugfs': 'e2fsprogs'}
QCOW2_TOOLS = {'qemu-img': 'qemu-utils'}
#: Version of what a build writes (metadata layout); part of the key.
FORMAT_VERSION = 1
#: The modules whose source is part of a build's key (what makes the image).
BUILD_SOURCES = ('__init__.py', 'common.py', 'debs.py', 'disk.py',
                 'marker.py', 'rootfs.py')


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built image and what is known about it (``meta``: the rest)."""

    path: str
    fmt: str
    sha256: str
    size: int           # virtual size, bytes
    file_size: int      # bytes of the file (raw: = size, sparse)
    allocated: int      # bytes the file occupies on the host
    marker: str
    cached: bool
    meta: dict

    def as_dict(self):
        return dataclasses.asdict(self)


def source_digest():
    """The digest of the modules that make the image (BUILD_SOURCES)."""
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in BUILD_SOURCES:
        with open(os.path.join(here, name), 'rb') as f:
            digest.update(name.encode() + b'\0' + f.read())
    return digest.hexdigest()


def cache_key(packages, size_mib, filler_mib, sources):
    """The digest of a build's inputs; a build is reused while it holds."""
    inputs = {'format': FORMAT_VERSION, 'source': sources,
              'packages': sorted((p['name'], p['version'], p['sha256'])
                                 for p in packages),
              'size_mib': size_mib, 'filler_mib': filler_mib}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()
                          ).hexdigest()[:16]


def validate(size_mib, filler_mib, fmt):
    """GuestError unless the options make sense."""
    if fmt not in FORMATS:
        raise GuestError('format %r: one of %s' % (fmt, ', '.join(FORMATS)))
    if (not isinstance(size_mib, int) or isinstance(size_mib, bool) or
            size_mib < MIN_SIZE_MIB):
        raise GuestError('size_mib %r: an integer, at least %d' % (
            size_mib, MIN_SIZE_MIB))
    if filler_mib != 'max' and (not isinstance(filler_mib, int) or
                                isinstance(filler_mib, bool) or
                                filler_mib < 0):
        raise GuestError('filler_mib %r: an integer >= 0, or "max"' % (
            filler_mib,))


def _load(meta_path, cached):
    with open(meta_path) as f:
        meta = json.load(f)
    image = meta.pop('image')
    return GuestImage(cached=cached, meta=meta, **image)


def _image_fields(path, fmt, size):
    st = os.stat(path)
    return {'path': path, 'fmt': fmt, 'sha256': common.file_sha256(path),
            'size': size, 'file_size': st.st_size,
            'allocated': st.st_blocks * 512, 'marker': MARKER}


def build(dest_dir, size_mib=DEFAULT_SIZE_MIB, fmt='raw', filler_mib=0):
    """Build the guest image into ``dest_dir`` (a cache) or reuse it.

    :param dest_dir: the cache: ``KEY/guest.raw`` (and ``guest.qcow2``),
        their metadata in ``KEY/guest.FMT.json``, the .deb files in
        ``debs/``.
    :param size_mib: the disk's virtual size (the partition fills it).
    :param fmt: ``raw`` or ``qcow2`` (converted from the raw image).
    :param filler_mib: MiB of pseudo-random files the boot does not read
        (``/var/lib/thunder-guest/filler``), or ``'max'``: as much as the
        file system holds, less a few MiB for the guest's writes.
    :returns: a GuestImage (path, sha256, sizes, marker, metadata).
    :raises GuestError: bad options, a failed download or build (nothing
        half-made is left behind).
    """
    validate(size_mib, filler_mib, fmt)
    dest_dir = os.path.abspath(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    packages = debs.resolve_packages(os.path.join(dest_dir, 'packages.json'))
    key = cache_key(packages, size_mib, filler_mib, source_digest())
    final = os.path.join(dest_dir, key)
    meta_path = os.path.join(final, 'guest.%s.json' % fmt)
    if os.path.exists(meta_path):
        return _load(meta_path, True)
    with open(os.path.join(dest_dir, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(meta_path):       # built while we waited
            return _load(meta_path, True)
        raw_meta = os.path.join(final, 'guest.raw.json')
        if not os.path.exists(raw_meta):
            _build_raw(dest_dir, final, packages, size_mib, filler_mib,
                       key)
        if fmt == 'qcow2':
            _convert(final, raw_meta)
        return _load(meta_path, False)


def _build_raw(dest_dir, final, packages, size_mib, filler_mib, key):
    """Make KEY/guest.raw in a work directory, then rename it into place."""
    common.ensure_tools(HOST_TOOLS)
    if os.geteuid():
        common.ensure_tools({'fakeroot': 'fakeroot'})
    started = time.monotonic()
    deb_files = debs.fetch_debs(os.path.join(dest_dir, 'debs'), packages)
    work = tempfile.mkdtemp(prefix='.build-%s-' % key, dir=dest_dir)
    try:
        common.log('building the guest image %s (%d MiB) in %s' % (
            key, size_mib, work))
        unpacked = os.path.join(work, 'unpacked')
        version = debs.unpack(deb_files, unpacked)
        modules, builtin = rootfs.module_closure(
            os.path.join(unpacked, 'lib', 'modules', version),
            rootfs.MODULES)
        initrd = os.path.join(work, 'initrd.img')
        rootfs.build_initramfs(os.path.join(unpacked, 'bin', 'busybox'),
                               modules, initrd)
        root = os.path.join(work, 'root')
        rootfs.stage_root(root, unpacked, version, initrd)
        size = size_mib * common.MiB
        fs_bytes = size - disk.PART_START
        content = rootfs.tree_bytes(root)
        if filler_mib == 'max':
            free = (disk.fs_capacity(work, fs_bytes) - content -
                    (4 * common.MiB + fs_bytes // 50))
            filler = max(0, free // common.MiB) * common.MiB
        else:
            filler = filler_mib * common.MiB
        rootfs.stage_filler(root, filler)
        raw = os.path.join(work, 'guest.raw')
        try:
            sb = disk.make_disk(raw, root, size, unpacked, version)
        except GuestError as exc:
            if 'Could not allocate' in str(exc) or 'No space' in str(exc):
                raise GuestError(
                    '%d MiB do not hold the content (%d MiB) and %d MiB of '
                    'filler' % (size_mib, content // common.MiB,
                                filler // common.MiB)) from exc
            raise
        image = _image_fields(raw, 'raw', size)
        image['path'] = os.path.join(final, 'guest.raw')
        meta = {
            'image': image, 'key': key,
            'options': {'size_mib': size_mib, 'filler_mib': filler_mib},
            'kernel_version': version,
            'packages': packages,
            'cmdline': disk.CMDLINE,
            'root_label': ROOT_LABEL,
            'partition_offset': disk.PART_START,
            'initramfs_modules': [name for name, _ko in modules],
            'builtin_modules': builtin,
            'boot_set_dir': rootfs.BOOT_SET_DIR,
            'boot_set_bytes': sum(rootfs.boot_set_sizes()),
            'boot_set_files': len(rootfs.boot_set_sizes()),
            'kernel_bytes': os.path.getsize(os.path.join(
                unpacked, 'boot', 'vmlinuz-' + version)),
            'initrd_bytes': os.path.getsize(initrd),
            'content_bytes': content,
            'filler_bytes': filler,
            'fs_bytes': fs_bytes,
            'fs_used_bytes': (sb['Block count'] - sb['Free blocks']) *
            disk.BLOCK,
            'min_disk_gib': -(-size // common.GiB),
            'min_ram_mib': MIN_RAM_MIB,
            'build_seconds': round(time.monotonic() - started, 1),
        }
        for tree in (root, unpacked):
            shutil.rmtree(tree)
        os.unlink(initrd)
        common.write_json(os.path.join(work, 'guest.raw.json'), meta)
        if os.path.exists(final):      # an older, incomplete attempt
            shutil.rmtree(final)
        os.chmod(work, 0o755)           # mkdtemp's 0700: others read it too
        os.rename(work, final)
        common.log('built %s in %.0f s' % (image['path'],
                                           meta['build_seconds']))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    prune(dest_dir, key, meta['options'])


def prune(dest_dir, key, options):
    """Remove the builds ``key`` supersedes: same options, other inputs.

    Those of other sizes and filler stay. (A process still reading a
    removed image file, an upload say, reads on: Linux keeps an open file.)
    """
    for name in sorted(os.listdir(dest_dir)):
        meta_path = os.path.join(dest_dir, name, 'guest.raw.json')
        if name == key or not os.path.exists(meta_path):
            continue
        try:
            with open(meta_path) as f:
                older = json.load(f).get('options')
        except (OSError, ValueError):
            continue
        if older == options:
            common.log('removing %s, which this build supersedes' % (
                os.path.join(dest_dir, name)))
            shutil.rmtree(os.path.join(dest_dir, name), ignore_errors=True)


def _convert(final, raw_meta):
    """KEY/guest.qcow2 from KEY/guest.raw (qemu-img convert)."""
    common.ensure_tools(QCOW2_TOOLS)
    with open(raw_meta) as f:
        meta = json.load(f)
    raw = meta['image']['path']
    path = os.path.join(final, 'guest.qcow2')
    common.raw_to_qcow2(raw, path)
    meta['raw_sha256'] = meta['image']['sha256']
    meta['image'] = _image_fields(path, 'qcow2', meta['image']['size'])
    common.write_json(os.path.join(final, 'guest.qcow2.json'), meta)


def default_cache_dir():
    """``data/guest`` of the local stack's directory."""
    from thunder_stack import layout
    return os.path.join(layout.stack_dir(), 'data', 'guest')
