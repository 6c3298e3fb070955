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
them, the options, this file's source), and reused while they are
unchanged.
"""

import argparse
import dataclasses
import fcntl
import glob
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

#: The first word of the line the guest prints once userspace is up.
MARKER = 'THUNDER-GUEST-READY'
#: The first word of the line a failed boot prints (then stays up).
FAILURE_MARKER = 'THUNDER-GUEST-FAILED'
ROOT_LABEL = 'thunder-root'
HOSTNAME = 'thunder-guest'
MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_SIZE_MIB = 64
PART_START = MiB            # the partition's offset in the disk
BLOCK = 4096                # the file system's block size
FORMATS = ('raw', 'qcow2')
KERNEL_PACKAGE = 'linux-image-cloud-amd64'
#: Debian packages the image is made of (the kernel's metapackage stands
#: for the versioned package it depends on).
PACKAGES = (KERNEL_PACKAGE, 'busybox-static', 'grub-pc-bin', 'grub-common')
#: Kernel modules the initramfs loads, with their dependencies, unless
#: the kernel has them built in: the disks Nova gives a guest (virtio-blk,
#: virtio-scsi) and the ACPI power button (acpid reads it through evdev).
MODULES = ('virtio_pci', 'virtio_blk', 'virtio_scsi', 'sd_mod', 'button',
           'evdev')
CMDLINE = 'root=LABEL=%s rw console=ttyS0 panic=30' % ROOT_LABEL
#: GRUB modules in the core image: BIOS disks, the MBR, ext4, Linux.
GRUB_MODULES = ('biosdisk', 'part_msdos', 'ext2', 'linux', 'boot')
#: What the guest reads and checks at boot: files of these sizes (KiB),
#: drawn with a fixed seed, BOOT_SET_KIB in all.
BOOT_SET_KIB = 4096
BOOT_SET_SIZES_KIB = (4, 8, 16, 32, 64, 128, 256)
BOOT_SET_DIR = 'usr/share/thunder-guest/boot-set'
FILLER_DIR = 'var/lib/thunder-guest/filler'
FILLER_FILE_MIB = 32
#: Fixed identities and times, so that equal inputs make equal images.
FS_UUID = '5d1e0c1a-7b7e-4c4e-9a51-7468756e6465'
DISK_SIGNATURE = 0x54484e44
EPOCH = 1700000000
INODES = 2048
JOURNAL_MIB = 4
#: ext4 features, all named (none from the host's mke2fs.conf); no 64bit
#: and no resize_inode, which a disk this size does not need.
FS_FEATURES = ('none,sparse_super,large_file,filetype,dir_index,ext_attr,'
               'has_journal,extent,flex_bg,huge_file,dir_nlink,extra_isize,'
               'metadata_csum')
#: Host tools and the Debian packages that have them.
HOST_TOOLS = {'apt-get': 'apt', 'dpkg-deb': 'dpkg', 'mke2fs': 'e2fsprogs',
              'e2fsck': 'e2fsprogs', 'dumpe2fs': 'e2fsprogs',
              'debugfs': 'e2fsprogs'}
QCOW2_TOOLS = {'qemu-img': 'qemu-utils'}
BOOT_TOOLS = {'qemu-system-x86_64': 'qemu-system-x86'}
#: Version of what a build writes (metadata layout); part of the key.
FORMAT_VERSION = 1

_MARKER_RE = re.compile(r'%s((?: +[A-Za-z_]+=\S*)*)' % MARKER)
_FAILURE_RE = re.compile(r'%s +(.*)' % FAILURE_MARKER)


class GuestError(RuntimeError):
    """The image could not be built or booted; the message says why."""


def log(message):
    print('guest: %s' % message, file=sys.stderr, flush=True)


def run(cmd, check=True, **kwargs):
    """Run a command; GuestError with its output's tail if it fails."""
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          **kwargs)
    if check and proc.returncode:
        raise GuestError('%s failed (%d): %s' % (
            ' '.join(str(c) for c in cmd), proc.returncode,
            (proc.stderr or proc.stdout).strip()[-2000:]))
    return proc


# -- the marker ---------------------------------------------------------------

def parse_marker(console_text):
    """The fields of the last marker line in a console log, or None.

    ``{'uuid': ..., 'root': '/dev/vda1', ...}``; tolerant of ``\\r`` and
    of text before the marker on its line.
    """
    found = None
    for line in console_text.replace('\r', '\n').split('\n'):
        match = _MARKER_RE.search(line)
        if match:
            found = dict(field.split('=', 1)
                         for field in match.group(1).split())
    return found


def marker_seen(console_text):
    """True once the guest has printed its marker line."""
    return parse_marker(console_text) is not None


def failure_seen(console_text):
    """Why the guest's boot failed, if it said so; else None."""
    for line in console_text.replace('\r', '\n').split('\n'):
        match = _FAILURE_RE.search(line)
        if match:
            return match.group(1).strip()
    return None


# -- host tools and packages --------------------------------------------------

def ensure_tools(tools, say=log):
    """Install the Debian packages of missing ``tools`` ({tool: package})."""
    missing = sorted(set(pkg for tool, pkg in tools.items()
                         if not shutil.which(tool)))
    if not missing:
        return
    if os.geteuid():
        raise GuestError('missing host tools: apt-get install %s' %
                         ' '.join(missing))
    say('installing the host tools\' Debian packages: apt-get install %s' %
        ' '.join(missing))
    run(['apt-get', 'install', '-y', '-q', '--no-install-recommends'] +
        missing, env=dict(os.environ, DEBIAN_FRONTEND='noninteractive'))


def parse_apt_show(text):
    """The records ``apt-cache show`` printed: [{field: value}]."""
    records, fields, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                records.append(fields)
            fields, key = {}, None
        elif line[0] in ' \t' and key:
            fields[key] += '\n' + line.strip()
        else:
            key, _sep, value = line.partition(':')
            fields[key] = value.strip()
    if fields:
        records.append(fields)
    return records


def _apt_show(names):
    """{package: fields} of the candidates apt knows among ``names``."""
    # Exits non-zero if it knows one of them not, having printed the rest.
    proc = run(['apt-cache', 'show', '--no-all-versions'] + list(names),
               check=False)
    return dict((r['Package'], r) for r in parse_apt_show(proc.stdout)
                if 'Package' in r and 'Version' in r)


def kernel_package(fields):
    """The versioned kernel package the kernel metapackage depends on."""
    for dep in fields.get('Depends', '').split(','):
        name = dep.split()[0] if dep.split() else ''
        if re.match(r'linux-image-\d', name):
            return name
    raise GuestError('%s depends on no versioned linux-image package: %r' % (
        fields.get('Package'), fields.get('Depends')))


def apt_fingerprint(roots=('/var/lib/apt/lists', '/etc/apt')):
    """A digest of what apt's candidates depend on: lists, sources, pins."""
    digest = hashlib.sha256()
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != 'partial')
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                digest.update(('%s %d %d\n' % (
                    path, st.st_size, st.st_mtime_ns)).encode())
    return digest.hexdigest()


def resolve_packages(memo=None, updated=False):
    """[{'name', 'version', 'sha256'}] of PACKAGES as apt would fetch them.

    ``memo``: a JSON file that keeps the answer while apt's lists and
    configuration are unchanged (``apt-cache`` takes seconds). Runs
    ``apt-get update`` once (as root) if apt lacks a package.
    """
    fingerprint = apt_fingerprint()
    try:
        with open(memo) as f:
            kept = json.load(f)
        if kept['fingerprint'] == fingerprint and kept['wanted'] == list(
                PACKAGES):
            return kept['packages']
    except (TypeError, OSError, ValueError, KeyError):
        pass
    known = _apt_show(PACKAGES)
    missing = [name for name in PACKAGES if name not in known]
    if not missing:
        kernel = kernel_package(known[KERNEL_PACKAGE])
        known.update(_apt_show([kernel]))
        missing = [] if kernel in known else [kernel]
    if missing:
        if not updated and os.geteuid() == 0:
            log('apt knows no %s: apt-get update' % ', '.join(missing))
            run(['apt-get', 'update', '-q'])
            return resolve_packages(memo, updated=True)
        raise GuestError('apt knows no package %s: run apt-get update '
                         '(Debian 12, main)' % ', '.join(missing))
    resolved = [{'name': name, 'version': known[name]['Version'],
                 'sha256': known[name].get('SHA256', '')}
                for name in [kernel] + list(PACKAGES[1:])]
    if memo:
        _write_json(memo, {'fingerprint': fingerprint,
                           'wanted': list(PACKAGES), 'packages': resolved})
    return resolved


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(4 * MiB), b''):
            digest.update(block)
    return digest.hexdigest()


def fetch_debs(debs_dir, packages):
    """Paths of the packages' .deb files, downloaded once into debs_dir."""
    os.makedirs(debs_dir, exist_ok=True)
    paths = []
    for pkg in packages:
        path = os.path.join(debs_dir, '%s_%s.deb' % (
            pkg['name'], pkg['version'].replace(':', '%3a')))
        if not os.path.exists(path):
            log('apt-get download %s=%s' % (pkg['name'], pkg['version']))
            tmp = tempfile.mkdtemp(prefix='.download-', dir=debs_dir)
            try:
                proc = run(['apt-get', 'download', '-q',
                            '%s=%s' % (pkg['name'], pkg['version'])],
                           cwd=tmp, check=False)
                got = glob.glob(os.path.join(tmp, '*.deb'))
                if proc.returncode or len(got) != 1:
                    raise GuestError(
                        'apt-get download %s=%s failed (a stale apt list? '
                        'run apt-get update): %s' % (
                            pkg['name'], pkg['version'],
                            (proc.stderr or proc.stdout).strip()[-1000:]))
                if pkg['sha256'] and file_sha256(got[0]) != pkg['sha256']:
                    raise GuestError('%s does not match the SHA256 apt '
                                     'lists for it' % got[0])
                os.rename(got[0], path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        paths.append(path)
    return paths


# -- kernel modules -----------------------------------------------------------

def modinfo(data):
    """The ``.modinfo`` section of an ELF64 kernel module: {key: [value]}."""
    if data[:4] != b'\x7fELF' or data[4] != 2:
        raise GuestError('not an ELF64 kernel module')
    shoff, = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3a)

    def section(index):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            '<IIQQQQ', data, shoff + index * shentsize)
        return name, offset, size

    _name, str_off, _size = section(shstrndx)
    info = {}
    for index in range(shnum):
        name, offset, size = section(index)
        end = data.index(b'\0', str_off + name)
        if data[str_off + name:end] == b'.modinfo':
            for item in data[offset:offset + size].split(b'\0'):
                key, sep, value = item.decode(errors='replace').partition(
                    '=')
                if sep:
                    info.setdefault(key, []).append(value)
    return info


def _module_name(path):
    return os.path.basename(path).split('.ko')[0].replace('-', '_')


def module_closure(moddir, wanted):
    """Modules to load, dependencies first, and those built in.

    ``moddir`` is ``lib/modules/VERSION`` of the unpacked kernel package.
    Returns ([(name, path)], [built-in names]).
    """
    files = {}
    for dirpath, _dirs, names in os.walk(os.path.join(moddir, 'kernel')):
        for name in names:
            if name.endswith('.ko'):
                files[_module_name(name)] = os.path.join(dirpath, name)
    builtin = set()
    path = os.path.join(moddir, 'modules.builtin')
    if os.path.exists(path):
        with open(path) as f:
            builtin = set(_module_name(line.strip()) for line in f
                          if line.strip())
    order, done, builtins = [], set(), []

    def visit(name, chain):
        if name in done:
            return
        if name in chain:
            raise GuestError('module dependency loop: %s' % ' -> '.join(
                chain + (name,)))
        if name in builtin:
            done.add(name)
            builtins.append(name)
            return
        if name not in files:
            raise GuestError('the kernel has no module %s' % name)
        with open(files[name], 'rb') as f:
            deps = modinfo(f.read()).get('depends', [''])[0]
        for dep in filter(None, deps.split(',')):
            visit(dep.replace('-', '_'), chain + (name,))
        done.add(name)
        order.append((name, files[name]))

    for name in wanted:
        visit(name, ())
    return order, builtins


# -- initramfs ------------------------------------------------------------------

def newc_archive(entries):
    """A gzip'ed newc cpio archive (an initramfs) of (name, mode, data).

    Owner root, time 0, so that equal entries make equal archives.
    """
    out = []
    for ino, (name, mode, data) in enumerate(
            list(entries) + [('TRAILER!!!', 0, b'')], 1):
        header = '070701' + ''.join('%08X' % x for x in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        entry = header.encode() + name.encode() + b'\0'
        entry += b'\0' * (-len(entry) % 4)
        out.append(entry + data + b'\0' * (-len(data) % 4))
    return gzip.compress(b''.join(out), 9, mtime=0)


INITRAMFS_INIT = r'''#!/bin/busybox sh
# Initramfs of the thunder guest (thunder_stack/guest.py): load the disk
# drivers, find the root file system named by root= (LABEL=, UUID= or a
# device), mount it from the disk and switch to it.
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() {
    printf '\n%%s initramfs: %%s\n' %(failure)s "$*" > /dev/console
    while :; do sleep 3600; done
}
for module in %(modules)s; do
    insmod /lib/modules/$module.ko || fail "insmod $module failed"
done
root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root=${arg#root=} ;; esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"
device=
i=0
while [ $i -lt 300 ]; do
    case "$root" in
        /dev/*) [ -b "$root" ] && device=$root ;;
        *) device=$(findfs "$root" 2>/dev/null) ;;
    esac
    [ -n "$device" ] && break
    sleep 0.1
    i=$((i + 1))
done
[ -n "$device" ] || fail "no disk with $root after 30 s; partitions:" \
    $(cat /proc/partitions)
mount -t ext4 -o rw "$device" /root || fail "cannot mount $device"
[ -x /root/sbin/init ] || fail "no /sbin/init on $device"
umount /proc /sys
mount --move /dev /root/dev
exec switch_root /root /sbin/init
'''


def build_initramfs(busybox, modules, path):
    """Write the initramfs: busybox, the modules (in load order), /init."""
    entries = [(d, 0o40755, b'') for d in (
        'bin', 'dev', 'etc', 'lib', 'lib/modules', 'proc', 'root', 'sys',
        'tmp')]
    with open(busybox, 'rb') as f:
        entries.append(('bin/busybox', 0o100755, f.read()))
    for name, ko in modules:
        with open(ko, 'rb') as f:
            entries.append(('lib/modules/%s.ko' % name, 0o100644, f.read()))
    init = INITRAMFS_INIT % {
        'failure': FAILURE_MARKER,
        'modules': ' '.join(name for name, _ko in modules) or ':'}
    entries.append(('init', 0o100755, init.encode()))
    with open(path, 'wb') as f:
        f.write(newc_archive(entries))


# -- the root file system -----------------------------------------------------

RCS = r'''#!/bin/sh
# The thunder guest's boot (thunder_stack/guest.py), run by busybox init:
# read and check the boot set from the disk, note the boot on the disk,
# print the marker line on the console; init then keeps the guest up.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname -F /etc/hostname
fail() {
    printf '\n%%s %%s\n' %(failure)s "$*" > /dev/console
    exit 1
}
set -- $(awk '$2 == "/" { d = $1; t = $3 } END { print d, t }' /proc/mounts)
device=$1
fstype=$2
cd /%(boot_set)s || fail "no boot set on $device"
sha256sum -c -s SHA256SUMS || fail "check=bad: the boot set read from" \
    "$device differs from its SHA256SUMS"
files=$(wc -l < SHA256SUMS)
bytes=$(cat $(awk '{ print $2 }' SHA256SUMS) | wc -c)
mkdir -p /var/lib/thunder-guest
cut -d' ' -f1 /proc/uptime >> /var/lib/thunder-guest/boots &&
    sync || fail "cannot write to $device"
boot=$(wc -l < /var/lib/thunder-guest/boots)
uuid=$(cat /sys/class/dmi/id/product_uuid 2>/dev/null) || uuid=unknown
read uptime idle < /proc/uptime
fields="uuid=$uuid host=$(hostname) root=$device fs=$fstype read=$bytes"
fields="$fields files=$files check=ok boot=$boot uptime=$uptime"
printf '\n%%s %%s\n' %(marker)s "$fields" > /dev/console
'''

RCK = r'''#!/bin/sh
# Power-off (busybox init's shutdown action): leave the disk clean.
sync
umount -a -r 2>/dev/null
mount -o remount,ro / 2>/dev/null
sync
'''

INITTAB = '''# busybox init (thunder_stack/guest.py)
::sysinit:/etc/init.d/rcS
::respawn:/sbin/acpid -f
::shutdown:/etc/init.d/rcK
'''

#: busybox acpid runs /etc/acpi/EVENT for an ACPI event.
POWER_BUTTON = '#!/bin/sh\nexec poweroff\n'


def boot_set_sizes():
    """The boot set's file sizes in bytes (fixed)."""
    rng = random.Random('thunder-guest-boot-set')
    sizes, total = [], BOOT_SET_KIB * 1024
    while sum(sizes) < total:
        sizes.append(min(rng.choice(BOOT_SET_SIZES_KIB) * 1024,
                         total - sum(sizes)))
    return sizes


def filler_sizes(filler_bytes):
    sizes = []
    while filler_bytes > 0:
        sizes.append(min(FILLER_FILE_MIB * MiB, filler_bytes))
        filler_bytes -= sizes[-1]
    return sizes


def _write(root, path, data, mode=0o644):
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(full, mode)


def _random_file(path, size, seed):
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        left = size
        while left:
            block = min(left, 4 * MiB)
            f.write(rng.randbytes(block))
            left -= block


def stage_root(root, unpacked, version, initrd):
    """The root file system's tree, to be copied into ext4 by mke2fs -d."""
    for sub in ('bin', 'boot', 'dev', 'etc', 'proc', 'root', 'run', 'sbin',
                'sys', 'tmp', 'usr/bin', 'usr/sbin', 'var/lib', 'var/log'):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    os.chmod(os.path.join(root, 'tmp'), 0o1777)
    shutil.copyfile(os.path.join(unpacked, 'boot', 'vmlinuz-' + version),
                    os.path.join(root, 'boot', 'vmlinuz-' + version))
    shutil.copyfile(initrd, os.path.join(root, 'boot',
                                         'initrd.img-' + version))
    busybox = os.path.join(unpacked, 'bin', 'busybox')
    shutil.copy2(busybox, os.path.join(root, 'bin', 'busybox'))
    for applet in run([busybox, '--list-full']).stdout.split():
        link = os.path.join(root, applet)
        if os.path.lexists(link):
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(root, 'bin', 'busybox'),
                                   os.path.dirname(link)), link)
    _write(root, 'etc/inittab', INITTAB)
    _write(root, 'etc/init.d/rcS', RCS % {
        'failure': FAILURE_MARKER, 'marker': MARKER,
        'boot_set': BOOT_SET_DIR}, 0o755)
    _write(root, 'etc/init.d/rcK', RCK, 0o755)
    _write(root, 'etc/acpi/PWRF/00000080', POWER_BUTTON, 0o755)
    _write(root, 'etc/hostname', HOSTNAME + '\n')
    _write(root, 'etc/fstab', 'LABEL=%s / ext4 rw 0 1\n' % ROOT_LABEL)
    _write(root, 'etc/passwd', 'root:x:0:0:root:/root:/bin/sh\n')
    _write(root, 'etc/group', 'root:x:0:\n')
    _write(root, 'etc/os-release',
           'NAME="thunder guest"\nID=thunder-guest\nPRETTY_NAME="thunder '
           'guest (Debian kernel %s, busybox)"\n' % version)
    sums = []
    for index, size in enumerate(boot_set_sizes()):
        name = 'f%03d.bin' % index
        path = os.path.join(root, BOOT_SET_DIR, name)
        _random_file(path, size, 'thunder-guest-boot-set-%d' % index)
        sums.append('%s  %s\n' % (file_sha256(path), name))
    _write(root, os.path.join(BOOT_SET_DIR, 'SHA256SUMS'), ''.join(sums))


def stage_filler(root, filler_bytes):
    """Pseudo-random files (fixed seeds) the boot does not read."""
    for index, size in enumerate(filler_sizes(filler_bytes)):
        _random_file(os.path.join(root, FILLER_DIR, 'filler-%04d.bin' % (
            index)), size, 'thunder-guest-filler-%d' % index)


# -- the disk -------------------------------------------------------------------

def mke2fs_command(disk, root, fs_bytes):
    """mke2fs making the partition's ext4 from ``root`` in ``disk``."""
    return ['mke2fs', '-q', '-F', '-t', 'ext4', '-b', str(BLOCK),
            '-I', '256', '-N', str(INODES), '-m', '0',
            '-J', 'size=%d' % JOURNAL_MIB, '-O', FS_FEATURES,
            '-L', ROOT_LABEL, '-U', FS_UUID,
            '-E', 'offset=%d,hash_seed=%s,root_owner=0:0,nodiscard,'
            'lazy_itable_init=0,lazy_journal_init=0' % (PART_START, FS_UUID),
            '-d', root, disk, str(fs_bytes // BLOCK)]


def grub_mkimage_command(grub_mkimage, moddir, config, out):
    """GRUB's core image: boots the boot drive's first partition."""
    return [grub_mkimage, '-O', 'i386-pc', '-d', moddir, '-o', out,
            '-c', config, '-p', '(,msdos1)/boot/grub'] + list(GRUB_MODULES)


def grub_config(version):
    """The core image's embedded configuration: boot Linux, no menu."""
    return ('linux /boot/vmlinuz-%s %s\ninitrd /boot/initrd.img-%s\n'
            'boot\n' % (version, CMDLINE, version))


def _chs(lba):
    """The (head, sector|cylinder high bits, cylinder) bytes of an LBA."""
    cylinder, rest = divmod(lba, 255 * 63)
    if cylinder > 1023:
        return bytes((254, 255, 255))
    head, sector = divmod(rest, 63)
    return bytes((head, (sector + 1) | ((cylinder >> 2) & 0xc0),
                  cylinder & 0xff))


def mbr(boot_code, start, size, signature=DISK_SIGNATURE):
    """A 512-byte MBR: boot code, one bootable Linux partition (bytes)."""
    if len(boot_code) > 440:
        raise GuestError('boot code of %d bytes (at most 440)' % len(
            boot_code))
    first, count = start // 512, size // 512
    sector = bytearray(512)
    sector[:len(boot_code)] = boot_code
    struct.pack_into('<I', sector, 440, signature)
    sector[446:462] = (b'\x80' + _chs(first) + b'\x83' +
                       _chs(first + count - 1) +
                       struct.pack('<II', first, count))
    sector[510:512] = b'\x55\xaa'
    return bytes(sector)


def grub_boot_code(boot_img):
    """GRUB's boot.img made ready for a hard disk, as grub-bios-setup does.

    Its core image is at sector 1 (boot.img's default, read with the
    blocklist grub-mkimage wrote into it); the jump over the boot drive
    check becomes two NOPs (for BIOSes that pass a wrong drive).
    """
    if len(boot_img) != 512:
        raise GuestError('GRUB boot.img of %d bytes' % len(boot_img))
    code = bytearray(boot_img[:440])
    struct.pack_into('<Q', code, 0x5c, 1)   # GRUB_BOOT_MACHINE_KERNEL_SECTOR
    code[0x66:0x68] = b'\x90\x90'           # GRUB_BOOT_MACHINE_DRIVE_CHECK
    return bytes(code)


def fs_capacity(workdir, fs_bytes):
    """Free bytes of an empty file system made as mke2fs_command makes it."""
    probe = os.path.join(workdir, 'probe.raw')
    empty = os.path.join(workdir, 'probe-root')
    os.makedirs(empty, exist_ok=True)
    with open(probe, 'wb') as f:
        f.truncate(PART_START + fs_bytes)
    try:
        run(mke2fs_command(probe, empty, fs_bytes), env=_mke2fs_env())
        return _superblock(probe)['Free blocks'] * BLOCK
    finally:
        os.unlink(probe)


def _mke2fs_env():
    return dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH))


def _superblock(disk):
    text = run(['dumpe2fs', '-h', '%s?offset=%d' % (disk, PART_START)],
               env=_mke2fs_env()).stdout
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(':')
        if sep:
            value = value.strip()
            fields[key.strip()] = int(value) if value.isdigit() else value
    return fields


def _tree_bytes(root):
    total = 0
    for dirpath, dirs, names in os.walk(root):
        total += BLOCK * len(dirs)
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += -(-os.path.getsize(path) // BLOCK) * BLOCK
    return total


def _fix_times(disk, root):
    """Every inode's times to EPOCH: equal inputs, equal image.

    mke2fs -d copies the host's times, and a change time cannot be set on
    the host.
    """
    paths = ['/', '/lost+found']
    for dirpath, dirs, names in os.walk(root):
        for name in sorted(dirs + names):
            paths.append('/' + os.path.relpath(os.path.join(dirpath, name),
                                               root))
    with tempfile.NamedTemporaryFile('w', dir=os.path.dirname(disk),
                                     suffix='.debugfs') as cmds:
        for path in paths:
            for field in ('atime', 'ctime', 'mtime', 'crtime'):
                cmds.write('set_inode_field "%s" %s @%d\n' % (
                    path, field, EPOCH))
        cmds.flush()
        result = run(['debugfs', '-w', '-f', cmds.name, '%s?offset=%d' % (
            disk, PART_START)], env=_mke2fs_env())
    errors = [line for line in result.stderr.splitlines()
              if line.strip() and not line.startswith('debugfs ')]
    if errors:
        raise GuestError('debugfs could not set the times: %s' % (
            '; '.join(errors[:5])))


def make_disk(path, root, size, grub_mkimage, grub_dir, version):
    """Write the disk image: MBR, GRUB's core image, the ext4 partition."""
    fs_bytes = (size - PART_START) // BLOCK * BLOCK
    with open(path, 'wb') as f:
        f.truncate(size)
    cmd = mke2fs_command(path, root, fs_bytes)
    if os.geteuid():
        # Files owned by root in the image whoever builds it.
        cmd = ['fakeroot', '--', 'sh', '-c', 'chown -hR 0:0 "$0" && '
               'exec "$@"', root] + cmd
    run(cmd, env=_mke2fs_env())
    _fix_times(path, root)
    workdir = os.path.dirname(path)
    config = os.path.join(workdir, 'grub-early.cfg')
    core = os.path.join(workdir, 'core.img')
    with open(config, 'w') as f:
        f.write(grub_config(version))
    run(grub_mkimage_command(grub_mkimage, grub_dir, config, core))
    with open(core, 'rb') as f:
        core_img = f.read()
    if 512 + len(core_img) > PART_START:
        raise GuestError('GRUB\'s core image (%d bytes) does not fit '
                         'before the partition' % len(core_img))
    with open(os.path.join(grub_dir, 'boot.img'), 'rb') as f:
        code = grub_boot_code(f.read())
    with open(path, 'r+b') as f:
        f.write(mbr(code, PART_START, fs_bytes))
        f.write(core_img)
    os.unlink(config)
    os.unlink(core)
    check = run(['e2fsck', '-fn', '%s?offset=%d' % (path, PART_START)],
                check=False)
    if check.returncode:
        raise GuestError('e2fsck finds errors in the new file system: %s' % (
            check.stdout + check.stderr).strip()[-2000:])
    return _superblock(path)


# -- the build ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GuestImage(object):
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


def _source_digest():
    with open(__file__.replace('.pyc', '.py'), 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def cache_key(packages, size_mib, filler_mib, source_digest):
    """The digest of a build's inputs; a build is reused while it holds."""
    inputs = {'format': FORMAT_VERSION, 'source': source_digest,
              'packages': sorted((p['name'], p['version'], p['sha256'])
                                 for p in packages),
              'size_mib': size_mib, 'filler_mib': filler_mib}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()
                          ).hexdigest()[:16]


def _validate(size_mib, filler_mib, fmt):
    if fmt not in FORMATS:
        raise GuestError('format %r: one of %s' % (fmt, ', '.join(FORMATS)))
    if not isinstance(size_mib, int) or size_mib < 32:
        raise GuestError('size_mib %r: an integer, at least 32' % (
            size_mib,))
    if filler_mib != 'max' and (not isinstance(filler_mib, int) or
                                filler_mib < 0):
        raise GuestError('filler_mib %r: an integer >= 0, or "max"' % (
            filler_mib,))


def _load(meta_path, cached):
    with open(meta_path) as f:
        meta = json.load(f)
    image = meta.pop('image')
    return GuestImage(cached=cached, meta=meta, **image)


def _image_fields(path, fmt, size, marker=MARKER):
    st = os.stat(path)
    return {'path': path, 'fmt': fmt, 'sha256': file_sha256(path),
            'size': size, 'file_size': st.st_size,
            'allocated': st.st_blocks * 512, 'marker': marker}


def _write_json(path, doc):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)


def build(dest_dir, size_mib=DEFAULT_SIZE_MIB, fmt='raw', filler_mib=0):
    """Build the guest image into ``dest_dir`` (a cache) or reuse it.

    :param size_mib: the disk's virtual size (the partition fills it).
    :param fmt: ``raw`` or ``qcow2`` (converted from the raw image).
    :param filler_mib: MiB of pseudo-random files the boot does not read
        (``/var/lib/thunder-guest/filler``), or ``'max'``: as much as the
        file system holds, less a few MiB for the guest's writes.
    :returns: a GuestImage (path, sha256, sizes, marker, metadata).
    :raises GuestError: bad options, a failed download or build (nothing
        half-made is left behind).
    """
    _validate(size_mib, filler_mib, fmt)
    dest_dir = os.path.abspath(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    packages = resolve_packages(os.path.join(dest_dir, 'packages.json'))
    key = cache_key(packages, size_mib, filler_mib, _source_digest())
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
    ensure_tools(HOST_TOOLS)
    if os.geteuid():
        ensure_tools({'fakeroot': 'fakeroot'})
    started = time.monotonic()
    debs = fetch_debs(os.path.join(dest_dir, 'debs'), packages)
    work = tempfile.mkdtemp(prefix='.build-%s-' % key, dir=dest_dir)
    try:
        log('building the guest image %s (%d MiB) in %s' % (
            key, size_mib, work))
        unpacked = os.path.join(work, 'unpacked')
        for deb in debs:
            run(['dpkg-deb', '-x', deb, unpacked])
        kernels = sorted(k[len('vmlinuz-'):] for k in os.listdir(
            os.path.join(unpacked, 'boot')) if k.startswith('vmlinuz-'))
        if len(kernels) != 1:
            raise GuestError('expected one kernel in the packages, found '
                             '%s' % kernels)
        version = kernels[0]
        modules, builtin = module_closure(
            os.path.join(unpacked, 'lib', 'modules', version), MODULES)
        initrd = os.path.join(work, 'initrd.img')
        build_initramfs(os.path.join(unpacked, 'bin', 'busybox'), modules,
                        initrd)
        grub_mkimage = os.path.join(unpacked, 'usr', 'bin', 'grub-mkimage')
        _check_runs(grub_mkimage)
        size = size_mib * MiB
        fs_bytes = size - PART_START
        root = os.path.join(work, 'root')
        stage_root(root, unpacked, version, initrd)
        content = _tree_bytes(root)
        if filler_mib == 'max':
            free = (fs_capacity(work, fs_bytes) - content -
                    (4 * MiB + fs_bytes // 50))
            filler = max(0, free // MiB) * MiB
        else:
            filler = filler_mib * MiB
        stage_filler(root, filler)
        disk = os.path.join(work, 'guest.raw')
        try:
            sb = make_disk(disk, root, size, grub_mkimage,
                           os.path.join(unpacked, 'usr', 'lib', 'grub',
                                        'i386-pc'), version)
        except GuestError as exc:
            if 'Could not allocate' in str(exc) or 'No space' in str(exc):
                raise GuestError('%d MiB do not hold the content (%d MiB) '
                                 'and %d MiB of filler' % (
                                     size_mib, content // MiB,
                                     filler // MiB)) from exc
            raise
        for tree in (root, unpacked):
            shutil.rmtree(tree)
        os.unlink(initrd)
        image = _image_fields(disk, 'raw', size)
        image['path'] = os.path.join(final, 'guest.raw')
        meta = {
            'image': image, 'key': key,
            'kernel_version': version,
            'packages': packages,
            'cmdline': CMDLINE,
            'root_label': ROOT_LABEL,
            'partition_offset': PART_START,
            'initramfs_modules': [name for name, _ko in modules],
            'builtin_modules': builtin,
            'boot_set_bytes': sum(boot_set_sizes()),
            'boot_set_files': len(boot_set_sizes()),
            'content_bytes': content,
            'filler_bytes': filler,
            'fs_bytes': fs_bytes,
            'fs_used_bytes': (sb['Block count'] - sb['Free blocks']) * BLOCK,
            'min_disk_gib': -(-size // GiB),
            'build_seconds': round(time.monotonic() - started, 1),
        }
        _write_json(os.path.join(work, 'guest.raw.json'), meta)
        if os.path.exists(final):      # an older, incomplete attempt
            shutil.rmtree(final)
        os.rename(work, final)
        log('built %s in %.0f s' % (image['path'], meta['build_seconds']))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _check_runs(program):
    """Install grub-common's shared libraries if grub-mkimage lacks one."""
    if run([program, '--version'], check=False).returncode == 0:
        return
    ensure_tools({'grub-mkimage': 'grub-common'})
    run([program, '--version'])


def _convert(final, raw_meta):
    ensure_tools(QCOW2_TOOLS)
    with open(raw_meta) as f:
        meta = json.load(f)
    raw = meta['image']['path']
    path = os.path.join(final, 'guest.qcow2')
    tmp = path + '.tmp'
    try:
        run(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', raw, tmp])
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta['image'] = _image_fields(path, 'qcow2', meta['image']['size'])
    meta['raw_sha256'] = file_sha256(raw)
    _write_json(os.path.join(final, 'guest.qcow2.json'), meta)


# -- command line ---------------------------------------------------------------

def default_cache_dir():
    """``data/guest`` of the local stack's directory."""
    from thunder_stack import stack
    return os.path.join(stack.stack_dir(), 'data', 'guest')


def _filler(value):
    if value == 'max':
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError('an integer or "max"')


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='python -m thunder_stack.guest',
        description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    b = sub.add_parser('build', help='build the image (or reuse it) and '
                       'print its path')
    b.add_argument('--out', default=None,
                   help='cache directory (default: data/guest in the '
                   'local stack\'s directory)')
    b.add_argument('--size-mib', type=int, default=DEFAULT_SIZE_MIB,
                   help='virtual size in MiB (default %d)' % (
                       DEFAULT_SIZE_MIB))
    fill = b.add_mutually_exclusive_group()
    fill.add_argument('--filler-mib', type=_filler, default=0,
                      help='MiB of pseudo-random files a boot does not '
                      'read (default 0), or "max"')
    fill.add_argument('--fill', dest='filler_mib', action='store_const',
                      const='max', help='as much filler as the file system '
                      'holds (--filler-mib max)')
    b.add_argument('--format', choices=FORMATS, default='raw')
    b.add_argument('--json', action='store_true',
                   help='print the image\'s metadata as JSON')
    t = sub.add_parser('boot', help='boot copies of an image under qemu '
                       'until the marker, and time them')
    t.add_argument('image')
    t.add_argument('--format', choices=FORMATS, default=None,
                   help='default: qcow2 if the name ends with .qcow2')
    t.add_argument('--runs', type=int, default=1)
    t.add_argument('--timeout', type=int, default=120,
                   help='seconds a boot may take (default 120)')
    t.add_argument('--accel', default='tcg',
                   help='qemu accelerator (default tcg, as Nova\'s '
                   'virt_type = qemu)')
    t.add_argument('--memory-mib', type=int, default=256)
    m = sub.add_parser('marker', help='exit 0 if a console log (a file, '
                       'or - for stdin) holds the marker, 2 if the boot '
                       'failed, 1 if neither; print the marker\'s fields')
    m.add_argument('console_log')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == 'build':
            image = build(args.out or default_cache_dir(), args.size_mib,
                          args.format, args.filler_mib)
            print(json.dumps(image.as_dict(), indent=1, sort_keys=True)
                  if args.json else image.path)
        elif args.command == 'boot':
            return _boot_command(args)
        else:
            return _marker_command(args)
    except GuestError as exc:
        print('guest: error: %s' % exc, file=sys.stderr)
        return 1
    return 0


def _boot_command(args):
    from thunder_stack import guest_qemu
    fmt = args.format or ('qcow2' if args.image.endswith('.qcow2')
                          else 'raw')
    times = []
    for index in range(args.runs):
        result = guest_qemu.boot_copy(args.image, fmt, args.timeout,
                                      args.accel, args.memory_mib)
        times.append(result['seconds'])
        print(json.dumps(dict(result, run=index + 1), sort_keys=True),
              flush=True)
    print('%d boots to the marker: %.1f-%.1f s (median %.1f s)' % (
        len(times), min(times), max(times), sorted(times)[len(times) // 2]))
    return 0


def _marker_command(args):
    if args.console_log == '-':
        text = sys.stdin.read()
    else:
        with open(args.console_log, errors='replace') as f:
            text = f.read()
    fields = parse_marker(text)
    if fields is not None:
        print(json.dumps(fields, sort_keys=True))
        return 0
    why = failure_seen(text)
    if why:
        print('the guest failed: %s' % why, file=sys.stderr)
        return 2
    return 1


if __name__ == '__main__':
    sys.exit(main())
