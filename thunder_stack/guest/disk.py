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

"""The guest's disk: an MBR, GRUB's core image, one ext4 partition.

Made in a plain file without mounting anything: ``mke2fs -d`` copies the
root tree into the partition (at an offset in the file), ``debugfs``
sets every inode's times to a fixed one, GRUB's boot sector and core
image are written into the first MiB.
"""

import os
import struct
import tempfile

from thunder_stack.guest import common
from thunder_stack.guest import rootfs

PART_START = common.MiB     # the partition's offset in the disk
BLOCK = rootfs.BLOCK
CMDLINE = 'root=LABEL=%s rw console=ttyS0 panic=30' % rootfs.ROOT_LABEL
#: GRUB modules in the core image: BIOS disks, the MBR, ext4, Linux.
GRUB_MODULES = ('biosdisk', 'part_msdos', 'ext2', 'linux', 'boot')
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


def mke2fs_command(disk, root, fs_bytes):
    """mke2fs making the partition's ext4 from ``root`` in ``disk``."""
    return ['mke2fs', '-q', '-F', '-t', 'ext4', '-b', str(BLOCK),
            '-I', '256', '-N', str(INODES), '-m', '0',
            '-J', 'size=%d' % JOURNAL_MIB, '-O', FS_FEATURES,
            '-L', rootfs.ROOT_LABEL, '-U', FS_UUID,
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
        raise common.GuestError('boot code of %d bytes (at most 440)' % (
            len(boot_code)))
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
        raise common.GuestError('GRUB boot.img of %d bytes' % len(boot_img))
    code = bytearray(boot_img[:440])
    struct.pack_into('<Q', code, 0x5c, 1)   # GRUB_BOOT_MACHINE_KERNEL_SECTOR
    code[0x66:0x68] = b'\x90\x90'           # GRUB_BOOT_MACHINE_DRIVE_CHECK
    return bytes(code)


def _offset(disk):
    """e2fsprogs' name of the partition in the disk file."""
    return '%s?offset=%d' % (disk, PART_START)


def _e2fs_env():
    return dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH))


def superblock(disk):
    """The partition's superblock fields (dumpe2fs -h), numbers as ints."""
    text = common.run(['dumpe2fs', '-h', _offset(disk)],
                      env=_e2fs_env()).stdout
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(':')
        if sep:
            value = value.strip()
            fields[key.strip()] = int(value) if value.isdigit() else value
    return fields


def fs_capacity(workdir, fs_bytes):
    """Free bytes of an empty file system made as mke2fs_command makes it."""
    probe = os.path.join(workdir, 'probe.raw')
    empty = os.path.join(workdir, 'probe-root')
    os.makedirs(empty, exist_ok=True)
    with open(probe, 'wb') as f:
        f.truncate(PART_START + fs_bytes)
    try:
        common.run(mke2fs_command(probe, empty, fs_bytes), env=_e2fs_env())
        return superblock(probe)['Free blocks'] * BLOCK
    finally:
        os.unlink(probe)
        os.rmdir(empty)


def fix_times(disk, root):
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
        result = common.run(['debugfs', '-w', '-f', cmds.name,
                             _offset(disk)], env=_e2fs_env())
    errors = [line for line in result.stderr.splitlines()
              if line.strip() and not line.startswith('debugfs ')]
    if errors:
        raise common.GuestError('debugfs could not set the times: %s' % (
            '; '.join(errors[:5])))


def grub_core(unpacked, version, workdir):
    """(boot code, core image) from the unpacked grub-pc-bin, grub-common.

    grub-mkimage runs from the unpacked grub-common (so its version is
    its modules'); if a shared library it needs is missing, installing
    grub-common brings it.
    """
    grub_mkimage = os.path.join(unpacked, 'usr', 'bin', 'grub-mkimage')
    grub_dir = os.path.join(unpacked, 'usr', 'lib', 'grub', 'i386-pc')
    if common.run([grub_mkimage, '--version'], check=False).returncode:
        common.ensure_tools({'grub-mkimage': 'grub-common'})
    config = os.path.join(workdir, 'grub-early.cfg')
    core = os.path.join(workdir, 'core.img')
    with open(config, 'w') as f:
        f.write(grub_config(version))
    try:
        common.run(grub_mkimage_command(grub_mkimage, grub_dir, config,
                                        core))
        with open(core, 'rb') as f:
            core_img = f.read()
    finally:
        for path in (config, core):
            if os.path.exists(path):
                os.unlink(path)
    if 512 + len(core_img) > PART_START:
        raise common.GuestError('GRUB\'s core image (%d bytes) does not fit '
                                'before the partition' % len(core_img))
    with open(os.path.join(grub_dir, 'boot.img'), 'rb') as f:
        return grub_boot_code(f.read()), core_img


def make_disk(path, root, size, unpacked, version):
    """Write the disk image: MBR, GRUB's core image, the ext4 partition.

    ``root``: the root file system's tree; ``unpacked``: the unpacked
    packages (GRUB). Returns the partition's superblock fields.
    """
    code, core_img = grub_core(unpacked, version, os.path.dirname(path))
    fs_bytes = (size - PART_START) // BLOCK * BLOCK
    with open(path, 'wb') as f:
        f.truncate(size)
    cmd = mke2fs_command(path, root, fs_bytes)
    if os.geteuid():
        # Files owned by root in the image whoever builds it.
        cmd = ['fakeroot', '--', 'sh', '-c', 'chown -hR 0:0 "$0" && '
               'exec "$@"', root] + cmd
    common.run(cmd, env=_e2fs_env())
    fix_times(path, root)
    with open(path, 'r+b') as f:
        f.write(mbr(code, PART_START, fs_bytes))
        f.write(core_img)
    check = common.run(['e2fsck', '-fn', _offset(path)], check=False)
    if check.returncode:
        raise common.GuestError('e2fsck finds errors in the new file '
                                'system: %s' % (
                                    check.stdout + check.stderr)[-2000:])
    return superblock(path)
