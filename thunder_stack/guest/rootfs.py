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

"""What the guest's disk holds: its initramfs and root file system tree.

The initramfs (busybox, the disk drivers as modules, ``/init``) mounts
the root file system from the disk; there, busybox ``init`` runs
``/etc/init.d/rcS`` (reads and checks the boot set, prints the marker)
and ``acpid`` (power button: power-off).
"""

import gzip
import lzma
import os
import random
import shutil
import struct

from thunder_stack.guest import common
from thunder_stack.guest import marker

ROOT_LABEL = 'thunder-root'
HOSTNAME = 'thunder-guest'
#: Kernel modules the initramfs loads, with their dependencies, unless
#: the kernel has them built in: the disks Nova gives a guest (virtio-blk,
#: virtio-scsi) and the ACPI power button (acpid reads it through evdev).
MODULES = ('virtio_pci', 'virtio_blk', 'virtio_scsi', 'sd_mod', 'button',
           'evdev')
#: What the guest reads and checks at boot: files of these sizes (KiB),
#: drawn with a fixed seed, BOOT_SET_KIB in all.
BOOT_SET_KIB = 4096
BOOT_SET_SIZES_KIB = (4, 8, 16, 32, 64, 128, 256)
BOOT_SET_DIR = 'usr/share/thunder-guest/boot-set'
FILLER_DIR = 'var/lib/thunder-guest/filler'
FILLER_FILE_MIB = 32
BLOCK = 4096                # the file system's block size


def modinfo(data):
    """The ``.modinfo`` section of an ELF64 kernel module: {key: [value]}."""
    if data[:4] != b'\x7fELF' or data[4] != 2:
        raise common.GuestError('not an ELF64 kernel module')
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


def read_module(path):
    """A module file's ELF bytes (``.ko``, or ``.ko.xz`` decompressed)."""
    with open(path, 'rb') as f:
        data = f.read()
    return lzma.decompress(data) if path.endswith('.xz') else data


def module_closure(moddir, wanted):
    """Modules to load, dependencies first, and those built in.

    ``moddir`` is ``lib/modules/VERSION`` of the unpacked kernel package.
    Returns ([(name, path)], [built-in names]).
    """
    files = {}
    for dirpath, _dirs, names in os.walk(os.path.join(moddir, 'kernel')):
        for name in names:
            if name.endswith(('.ko', '.ko.xz')):
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
            raise common.GuestError('module dependency loop: %s' % ' -> '.join(
                chain + (name,)))
        if name in builtin:
            done.add(name)
            builtins.append(name)
            return
        if name not in files:
            raise common.GuestError('the kernel has no module %s' % name)
        deps = modinfo(read_module(files[name])).get('depends', [''])[0]
        for dep in filter(None, deps.split(',')):
            visit(dep.replace('-', '_'), chain + (name,))
        done.add(name)
        order.append((name, files[name]))

    for name in wanted:
        visit(name, ())
    return order, builtins


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
# Initramfs of the thunder guest (thunder_stack/guest/rootfs.py): load the
# disk drivers, find the root file system named by root= (LABEL=, UUID= or a
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
        entries.append(('lib/modules/%s.ko' % name, 0o100644,
                        read_module(ko)))
    init = INITRAMFS_INIT % {
        'failure': marker.FAILURE_MARKER,
        'modules': ' '.join(name for name, _ko in modules)}
    entries.append(('init', 0o100755, init.encode()))
    with open(path, 'wb') as f:
        f.write(newc_archive(entries))


RCS = r'''#!/bin/sh
# The thunder guest's boot (thunder_stack/guest/rootfs.py), run by busybox
# init: read and check the boot set from the disk, note the boot on the disk,
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

INITTAB = '''# busybox init (thunder_stack/guest/rootfs.py)
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
        sizes.append(min(FILLER_FILE_MIB * common.MiB, filler_bytes))
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
            block = min(left, 4 * common.MiB)
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
    for applet in common.run([busybox, '--list-full']).stdout.split():
        link = os.path.join(root, applet)
        if os.path.lexists(link):
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(root, 'bin', 'busybox'),
                                   os.path.dirname(link)), link)
    _write(root, 'etc/inittab', INITTAB)
    _write(root, 'etc/init.d/rcS', RCS % {
        'failure': marker.FAILURE_MARKER, 'marker': marker.MARKER,
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
        sums.append('%s  %s\n' % (common.file_sha256(path), name))
    _write(root, os.path.join(BOOT_SET_DIR, 'SHA256SUMS'), ''.join(sums))


def stage_filler(root, filler_bytes):
    """Pseudo-random files (fixed seeds) the boot does not read."""
    for index, size in enumerate(filler_sizes(filler_bytes)):
        _random_file(os.path.join(root, FILLER_DIR, 'filler-%04d.bin' % (
            index)), size, 'thunder-guest-filler-%d' % index)


def tree_bytes(root):
    total = 0
    for dirpath, dirs, names in os.walk(root):
        total += BLOCK * len(dirs)
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += -(-os.path.getsize(path) // BLOCK) * BLOCK
    return total
