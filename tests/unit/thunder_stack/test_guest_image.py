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

"""thunder_stack.guest: the pure parts of the guest image and its boot."""

import gzip
import json
import lzma
import os
import signal
import struct
import subprocess
import time
from unittest import mock

import pytest

from thunder_stack import guest
from thunder_stack.guest import __main__ as cli
from thunder_stack.guest import common
from thunder_stack.guest import debs
from thunder_stack.guest import disk
from thunder_stack.guest import qemu
from thunder_stack.guest import rootfs

MiB = 1024 * 1024

READY = ('THUNDER-GUEST-READY uuid=0b7e4c3a-1111-2222-3333-444455556666 '
         'host=thunder-guest root=/dev/vda1 fs=ext4 read=4194304 files=48 '
         'check=ok boot=1 uptime=3.96')

CONSOLE = ('SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n'
           '[    0.000000] Linux version 6.1.0-57-cloud-amd64\r\n'
           '[    3.047445] EXT4-fs (vda1): mounted filesystem\r\n'
           '\r\n' + READY + '\r\n'
           'acpid: something\r\n')


# -- the marker ---------------------------------------------------------------

def test_marker_fields_from_a_console_log():
    fields = guest.parse_marker(CONSOLE)
    assert fields == {'uuid': '0b7e4c3a-1111-2222-3333-444455556666',
                      'host': 'thunder-guest', 'root': '/dev/vda1',
                      'fs': 'ext4', 'read': '4194304', 'files': '48',
                      'check': 'ok', 'boot': '1', 'uptime': '3.96'}
    assert guest.marker_seen(CONSOLE)
    assert guest.failure_seen(CONSOLE) is None


def test_marker_after_other_text_on_its_line_and_the_last_one_wins():
    text = ('[ 9.1] kernel noise' + READY + '\n' +
            READY.replace('boot=1', 'boot=2') + '\n')
    assert guest.parse_marker(text)['boot'] == '2'


def test_no_marker():
    assert guest.parse_marker('Linux version 6.1\nTHUNDER-GUEST\n') is None
    assert not guest.marker_seen('')
    assert not guest.marker_seen('THUNDER-GUEST-READYX uuid=1')


def test_failure_marker():
    text = CONSOLE.replace(READY, 'THUNDER-GUEST-FAILED initramfs: no disk')
    assert not guest.marker_seen(text)
    assert guest.failure_seen(text) == 'initramfs: no disk'


def test_marker_constants_are_importable():
    assert guest.MARKER == 'THUNDER-GUEST-READY'
    assert guest.FAILURE_MARKER == 'THUNDER-GUEST-FAILED'
    assert guest.MARKER in rootfs.RCS % {
        'failure': guest.FAILURE_MARKER, 'marker': guest.MARKER,
        'boot_set': rootfs.BOOT_SET_DIR}


@pytest.mark.parametrize('text,code', [(CONSOLE, 0), ('nothing\n', 1),
                                       ('THUNDER-GUEST-FAILED why\n', 2)])
def test_marker_command(tmp_path, capsys, text, code):
    log = tmp_path / 'console.log'
    log.write_text(text)
    assert cli.main(['marker', str(log)]) == code
    if code == 0:
        assert json.loads(capsys.readouterr().out)['root'] == '/dev/vda1'


# -- the guest's scripts ------------------------------------------------------

def _sh_syntax(script, tmp_path):
    path = tmp_path / 'script.sh'
    path.write_text(script)
    result = subprocess.run(['sh', '-n', str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_scripts_are_valid_shell(tmp_path):
    _sh_syntax(rootfs.RCS % {'failure': guest.FAILURE_MARKER,
                             'marker': guest.MARKER,
                             'boot_set': rootfs.BOOT_SET_DIR}, tmp_path)
    _sh_syntax(rootfs.RCK, tmp_path)
    for modules in ('virtio virtio_blk', ''):
        _sh_syntax(rootfs.INITRAMFS_INIT % {
            'failure': guest.FAILURE_MARKER, 'modules': modules}, tmp_path)


def test_rcs_marker_line_parses(tmp_path):
    """The printf of rcS, run by sh, prints a line parse_marker reads."""
    script = rootfs.RCS % {'failure': guest.FAILURE_MARKER,
                           'marker': guest.MARKER,
                           'boot_set': rootfs.BOOT_SET_DIR}
    tail = script[script.index('fields="uuid='):].replace(
        '> /dev/console', '')
    env = {'uuid': 'u-1', 'device': '/dev/vda1', 'fstype': 'ext4',
           'bytes': '4194304', 'files': '48', 'boot': '3',
           'uptime': '4.5', 'PATH': os.environ['PATH']}
    out = subprocess.run(['sh', '-c', 'hostname() { echo h; }\n' + tail],
                         env=env, capture_output=True, text=True,
                         check=True).stdout
    assert guest.parse_marker(out) == {
        'uuid': 'u-1', 'host': 'h', 'root': '/dev/vda1', 'fs': 'ext4',
        'read': '4194304', 'files': '48', 'check': 'ok', 'boot': '3',
        'uptime': '4.5'}


def test_boot_set_and_filler_sizes():
    sizes = rootfs.boot_set_sizes()
    assert sum(sizes) == rootfs.BOOT_SET_KIB * 1024
    assert sizes == rootfs.boot_set_sizes()       # fixed
    assert len(set(sizes)) > 3
    assert rootfs.filler_sizes(0) == []
    assert rootfs.filler_sizes(70 * MiB) == [32 * MiB, 32 * MiB, 6 * MiB]


# -- initramfs and modules ----------------------------------------------------

def _parse_newc(blob):
    data = gzip.decompress(blob)
    entries, pos = [], 0
    while True:
        header = data[pos:pos + 110]
        assert header[:6] == b'070701'
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        body = data[pos:pos + size]
        pos += size + (-size % 4)
        if name == 'TRAILER!!!':
            return entries
        entries.append((name, mode, body))


def test_newc_archive_round_trip_and_is_reproducible():
    entries = [('bin', 0o40755, b''), ('bin/x', 0o100755, b'abc'),
               ('init', 0o100755, b'#!/bin/sh\n')]
    blob = rootfs.newc_archive(entries)
    assert _parse_newc(blob) == entries
    assert rootfs.newc_archive(entries) == blob


def fake_module(depends):
    """A minimal ELF64 kernel module with a .modinfo section."""
    shstrtab = b'\0.shstrtab\0.modinfo\0'
    info = b'license=GPL\0depends=%s\0name=x\0' % depends.encode()
    shstr_off = 64
    info_off = shstr_off + len(shstrtab)
    shoff = info_off + len(info)
    pad = b'\0' * (-shoff % 8)
    shoff += len(pad)
    header = bytearray(64)
    header[:7] = b'\x7fELF\x02\x01\x01'
    struct.pack_into('<Q', header, 0x28, shoff)
    struct.pack_into('<HHH', header, 0x3a, 64, 3, 1)

    def section(name, offset, size):
        return struct.pack('<IIQQQQIIQQ', name, 1, 0, 0, offset, size, 0, 0,
                           1, 0)

    return (bytes(header) + shstrtab + info + pad + section(0, 0, 0) +
            section(1, shstr_off, len(shstrtab)) +
            section(11, info_off, len(info)))


def test_modinfo():
    info = rootfs.modinfo(fake_module('virtio,virtio_ring'))
    assert info['depends'] == ['virtio,virtio_ring']
    assert info['license'] == ['GPL']
    with pytest.raises(guest.GuestError, match='ELF64'):
        rootfs.modinfo(b'not a module')


def _moddir(tmp_path, modules, builtin=()):
    moddir = tmp_path / 'lib' / 'modules' / '6.1.0-1-cloud-amd64'
    for path, depends in modules.items():
        full = moddir / 'kernel' / path
        full.parent.mkdir(parents=True, exist_ok=True)
        data = fake_module(depends)
        if path.endswith('.xz'):
            data = lzma.compress(data)
        full.write_bytes(data)
    (moddir / 'modules.builtin').write_text(''.join(
        'kernel/%s\n' % b for b in builtin))
    return str(moddir)


def test_module_closure_orders_dependencies_first(tmp_path):
    moddir = _moddir(tmp_path, {
        'drivers/virtio/virtio.ko': '',
        'drivers/virtio/virtio_ring.ko': '',
        'drivers/virtio/virtio_pci.ko': 'virtio_ring,virtio',
        'drivers/block/virtio_blk.ko.xz': 'virtio,virtio_ring',
        'drivers/scsi/scsi_mod.ko': 'scsi_common',
        'drivers/scsi/sd_mod.ko': 'scsi_mod,crc-t10dif'},
        builtin=('drivers/scsi/scsi_common.ko', 'lib/crc-t10dif.ko'))
    order, builtins = rootfs.module_closure(
        moddir, ('virtio_pci', 'virtio_blk', 'sd_mod'))
    names = [name for name, _path in order]
    assert names == ['virtio_ring', 'virtio', 'virtio_pci', 'virtio_blk',
                     'scsi_mod', 'sd_mod']
    assert sorted(builtins) == ['crc_t10dif', 'scsi_common']
    xz = dict(order)['virtio_blk']
    assert rootfs.read_module(xz)[:4] == b'\x7fELF'


def test_module_closure_errors(tmp_path):
    moddir = _moddir(tmp_path, {'a.ko': 'b', 'b.ko': 'a'})
    with pytest.raises(guest.GuestError, match='no module nope'):
        rootfs.module_closure(moddir, ('nope',))
    with pytest.raises(guest.GuestError, match='loop'):
        rootfs.module_closure(moddir, ('a',))


# -- the disk -----------------------------------------------------------------

def test_mbr_one_bootable_linux_partition():
    code = b'\xeb\x63' + b'\x90' * 100
    sector = disk.mbr(code, MiB, 63 * MiB)
    assert len(sector) == 512
    assert sector[:len(code)] == code
    assert sector[440:444] == struct.pack('<I', disk.DISK_SIGNATURE)
    entry = sector[446:462]
    assert entry[0] == 0x80 and entry[4] == 0x83
    assert struct.unpack('<II', entry[8:16]) == (2048, 63 * 2048)
    assert entry[1:4] == bytes((32, 33, 0))      # CHS of LBA 2048
    assert sector[462:510] == b'\0' * 48           # no other partition
    assert sector[510:] == b'\x55\xaa'


def test_mbr_large_disk_and_bad_boot_code():
    sector = disk.mbr(b'', MiB, 1024 * 1024 * MiB)
    assert sector[446 + 5:446 + 8] == bytes((254, 255, 255))
    with pytest.raises(guest.GuestError, match='440'):
        disk.mbr(b'x' * 441, MiB, MiB)


def test_grub_boot_code():
    boot_img = bytearray(512)
    boot_img[0x66:0x68] = b'\xeb\x05'
    code = disk.grub_boot_code(bytes(boot_img))
    assert len(code) == 440
    assert struct.unpack_from('<Q', code, 0x5c) == (1,)
    assert code[0x66:0x68] == b'\x90\x90'
    with pytest.raises(guest.GuestError):
        disk.grub_boot_code(b'short')


def test_mke2fs_command():
    cmd = disk.mke2fs_command('/d/guest.raw', '/d/root', 63 * MiB)
    assert cmd[0] == 'mke2fs'
    assert cmd[-3:] == ['/d/root', '/d/guest.raw', str(63 * MiB // 4096)]
    assert cmd[cmd.index('-d') + 1] == '/d/root'
    assert cmd[cmd.index('-L') + 1] == guest.ROOT_LABEL
    assert cmd[cmd.index('-O') + 1].startswith('none,')
    assert 'offset=%d' % MiB in cmd[cmd.index('-E') + 1]
    assert cmd[cmd.index('-U') + 1] == disk.FS_UUID


def test_grub_image_and_config():
    cmd = disk.grub_mkimage_command('/u/grub-mkimage', '/u/i386-pc',
                                    '/w/early.cfg', '/w/core.img')
    assert cmd[:3] == ['/u/grub-mkimage', '-O', 'i386-pc']
    assert cmd[cmd.index('-p') + 1] == '(,msdos1)/boot/grub'
    assert cmd[cmd.index('-c') + 1] == '/w/early.cfg'
    assert set(disk.GRUB_MODULES) <= set(cmd)
    config = disk.grub_config('6.1.0-57-cloud-amd64')
    assert config.splitlines() == [
        'linux /boot/vmlinuz-6.1.0-57-cloud-amd64 ' + disk.CMDLINE,
        'initrd /boot/initrd.img-6.1.0-57-cloud-amd64', 'boot']
    assert 'console=ttyS0' in disk.CMDLINE.split()
    assert 'root=LABEL=%s' % guest.ROOT_LABEL in disk.CMDLINE.split()


# -- packages -----------------------------------------------------------------

APT_SHOW = '''Package: linux-image-cloud-amd64
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)
SHA256: aaaa
Description: Linux for cloud
 platforms (meta-package)

Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
SHA256: bbbb

Package: grub-pc-bin
Version: 2.06-13+deb12u2
SHA256: cccc

Package: grub-common
Version: 2.06-13+deb12u2
SHA256: dddd
'''
KERNEL_SHOW = '''Package: linux-image-6.1.0-57-cloud-amd64
Version: 6.1.192-3
SHA256: eeee
'''


def test_parse_apt_show():
    records = debs.parse_apt_show(APT_SHOW)
    assert [r['Package'] for r in records] == list(debs.PACKAGES)
    assert records[0]['Description'] == ('Linux for cloud\n'
                                         'platforms (meta-package)')
    assert debs.kernel_package(records[0]) == (
        'linux-image-6.1.0-57-cloud-amd64')
    with pytest.raises(guest.GuestError, match='no versioned'):
        debs.kernel_package({'Package': 'x', 'Depends': 'libc6'})


def test_apt_fingerprint(tmp_path):
    lists = tmp_path / 'lists'
    (lists / 'partial').mkdir(parents=True)
    index = lists / 'deb.debian.org_debian_dists_bookworm_main_Packages'
    index.write_text('Package: a\n')
    roots = (str(lists),)
    first = debs.apt_fingerprint(roots)
    (lists / 'lock').write_text('')
    (lists / 'partial' / 'x').write_text('half')
    assert debs.apt_fingerprint(roots) == first
    index.write_text('Package: b\n')
    os.utime(index, ns=(1, 2))
    assert debs.apt_fingerprint(roots) != first


def _apt(show=APT_SHOW):
    calls = []

    def run(cmd, check=True, **kwargs):
        calls.append(cmd)
        if cmd[:2] == ['apt-cache', 'show']:
            text = KERNEL_SHOW if 'linux-image-6.1.0-57-cloud-amd64' in (
                cmd) else show
            return subprocess.CompletedProcess(cmd, 0, text, '')
        return subprocess.CompletedProcess(cmd, 0, '', '')
    return calls, run


def test_resolve_packages_memoised_while_apt_is_unchanged(tmp_path):
    memo = str(tmp_path / 'packages.json')
    calls, run = _apt()
    with mock.patch.object(common, 'run', run), \
            mock.patch.object(debs, 'apt_fingerprint', return_value='fp1'):
        first = debs.resolve_packages(memo)
        assert len(calls) == 2
        assert debs.resolve_packages(memo) == first
        assert len(calls) == 2                      # from the memo
    assert first[0] == {'name': 'linux-image-6.1.0-57-cloud-amd64',
                        'version': '6.1.192-3', 'sha256': 'eeee'}
    assert [p['name'] for p in first[1:]] == list(debs.PACKAGES[1:])
    with mock.patch.object(common, 'run', run), \
            mock.patch.object(debs, 'apt_fingerprint', return_value='fp2'):
        debs.resolve_packages(memo)
    assert len(calls) == 4                          # apt changed


def test_resolve_packages_missing(tmp_path):
    show = APT_SHOW.split('\n\nPackage: grub-pc-bin')[0]
    calls, run = _apt(show)
    with mock.patch.object(common, 'run', run), \
            mock.patch.object(debs, 'apt_fingerprint', return_value='fp'), \
            mock.patch('os.geteuid', return_value=1000):
        with pytest.raises(guest.GuestError, match='grub-pc-bin, grub-common'
                           '.*apt-get update'):
            debs.resolve_packages()
    assert not any(c[:2] == ['apt-get', 'update'] for c in calls)
    calls, run = _apt(show)
    with mock.patch.object(common, 'run', run), \
            mock.patch.object(debs, 'apt_fingerprint', return_value='fp'), \
            mock.patch('os.geteuid', return_value=0):
        with pytest.raises(guest.GuestError, match='apt knows no package'):
            debs.resolve_packages()
    assert [c for c in calls if c[:2] == ['apt-get', 'update']] == [
        ['apt-get', 'update', '-q']]                # once


def test_fetch_debs_checks_sha256_and_leaves_nothing(tmp_path):
    pkg = {'name': 'busybox-static', 'version': '1:1.35', 'sha256': 'x'}

    def run(cmd, check=True, cwd=None, **kwargs):
        with open(os.path.join(cwd, 'busybox-static_1.deb'), 'wb') as f:
            f.write(b'deb')
        return subprocess.CompletedProcess(cmd, 0, '', '')

    with mock.patch.object(common, 'run', run):
        with pytest.raises(guest.GuestError, match='does not match'):
            debs.fetch_debs(str(tmp_path), [pkg])
        assert os.listdir(tmp_path) == []
        (tmp_path / 'ref').write_bytes(b'deb')
        pkg['sha256'] = common.file_sha256(str(tmp_path / 'ref'))
        os.unlink(tmp_path / 'ref')
        paths = debs.fetch_debs(str(tmp_path), [pkg])
    assert paths == [str(tmp_path / 'busybox-static_1%3a1.35.deb')]
    assert sorted(os.listdir(tmp_path)) == ['busybox-static_1%3a1.35.deb']
    with mock.patch.object(common, 'run', side_effect=AssertionError):
        assert debs.fetch_debs(str(tmp_path), [pkg]) == paths   # kept


def test_ensure_tools(tmp_path):
    with mock.patch('shutil.which', return_value=None), \
            mock.patch('os.geteuid', return_value=1000):
        with pytest.raises(guest.GuestError, match='apt-get install '
                           'e2fsprogs qemu-utils'):
            common.ensure_tools({'mke2fs': 'e2fsprogs',
                                 'debugfs': 'e2fsprogs',
                                 'qemu-img': 'qemu-utils'})
    with mock.patch('shutil.which', return_value=None), \
            mock.patch('os.geteuid', return_value=0), \
            mock.patch.object(common, 'run') as run:
        common.ensure_tools({'mke2fs': 'e2fsprogs'}, say=lambda m: None)
    assert run.call_args[0][0][:2] == ['apt-get', 'install']
    assert run.call_args[0][0][-1] == 'e2fsprogs'


# -- the build's key, options and cache ---------------------------------------

PACKAGES = [{'name': 'linux-image-6.1.0-57-cloud-amd64', 'version': '1',
             'sha256': 'a'}, {'name': 'busybox-static', 'version': '2',
                              'sha256': 'b'}]


def test_cache_key():
    key = guest.cache_key(PACKAGES, 64, 0, 'src')
    assert key == guest.cache_key(list(reversed(PACKAGES)), 64, 0, 'src')
    other = [dict(PACKAGES[0], version='1.1'), PACKAGES[1]]
    changed = {guest.cache_key(other, 64, 0, 'src'),
               guest.cache_key([dict(PACKAGES[0], sha256='c'), PACKAGES[1]],
                               64, 0, 'src'),
               guest.cache_key(PACKAGES, 1024, 0, 'src'),
               guest.cache_key(PACKAGES, 64, 'max', 'src'),
               guest.cache_key(PACKAGES, 64, 0, 'src2')}
    assert key not in changed and len(changed) == 5


def test_source_digest_covers_the_modules_that_make_the_image():
    here = os.path.dirname(guest.__file__)
    for name in guest.BUILD_SOURCES:
        assert os.path.exists(os.path.join(here, name))
    assert 'qemu.py' not in guest.BUILD_SOURCES
    assert guest.source_digest() == guest.source_digest()


@pytest.mark.parametrize('kwargs,match', [
    ({'size_mib': 8}, 'at least 32'),
    ({'size_mib': '64'}, 'integer'),
    ({'size_mib': True}, 'integer'),
    ({'filler_mib': -1}, 'filler_mib'),
    ({'filler_mib': 'all'}, 'filler_mib'),
    ({'fmt': 'vmdk'}, 'raw, qcow2')])
def test_bad_options_leave_nothing(tmp_path, kwargs, match):
    dest = tmp_path / 'cache'
    with mock.patch.object(debs, 'resolve_packages',
                           side_effect=AssertionError):
        with pytest.raises(guest.GuestError, match=match):
            guest.build(str(dest), **kwargs)
    assert not dest.exists()


def test_build_reuses_a_complete_build(tmp_path):
    key = guest.cache_key(PACKAGES, 64, 0, 'src')
    final = tmp_path / key
    final.mkdir()
    image = {'path': str(final / 'guest.raw'), 'fmt': 'raw',
             'sha256': 'f' * 64, 'size': 64 * MiB, 'file_size': 64 * MiB,
             'allocated': 26 * MiB, 'marker': guest.MARKER}
    (final / 'guest.raw.json').write_text(json.dumps(
        {'image': image, 'kernel_version': '6.1.0-57-cloud-amd64'}))
    with mock.patch.object(debs, 'resolve_packages', return_value=PACKAGES), \
            mock.patch.object(guest, 'source_digest', return_value='src'), \
            mock.patch.object(guest, '_build_raw',
                              side_effect=AssertionError):
        built = guest.build(str(tmp_path))
    assert built.cached and built.path == image['path']
    assert built.sha256 == 'f' * 64 and built.marker == guest.MARKER
    assert built.meta['kernel_version'] == '6.1.0-57-cloud-amd64'
    assert built.as_dict()['size'] == 64 * MiB


def test_prune_removes_superseded_builds_only(tmp_path):
    for key, options in (('new', {'size_mib': 64, 'filler_mib': 0}),
                         ('old', {'size_mib': 64, 'filler_mib': 0}),
                         ('big', {'size_mib': 1024, 'filler_mib': 'max'})):
        (tmp_path / key).mkdir()
        (tmp_path / key / 'guest.raw.json').write_text(json.dumps(
            {'image': {}, 'options': options}))
    (tmp_path / 'debs').mkdir()
    guest.prune(str(tmp_path), 'new', {'size_mib': 64, 'filler_mib': 0})
    assert sorted(os.listdir(tmp_path)) == ['big', 'debs', 'new']


# -- qemu ---------------------------------------------------------------------

def test_qemu_command_as_libvirt_sets_up_nova_volumes():
    cmd = qemu.qemu_command('tcg', '/v/disk.raw', 256)
    line = ' '.join(cmd)
    assert 'filename=/v/disk.raw,cache.direct=on,cache.no-flush=off,' \
        'aio=threads' in line
    assert 'driver=raw,node-name=fmt,file=disk' in line
    assert cmd[cmd.index('-device') + 1].startswith('virtio-blk-pci,')
    assert cmd[cmd.index('-cpu') + 1] == 'max'
    assert cmd[cmd.index('-m') + 1] == '256'
    assert '-no-reboot' in cmd and cmd[-2:] == ['-nic', 'none']
    scsi = ' '.join(qemu.qemu_command('tcg', '/v/d.qcow2', fmt='qcow2',
                                      bus='scsi'))
    assert 'driver=qcow2,' in scsi
    assert 'virtio-scsi-pci' in scsi and 'scsi-hd,bus=scsi0.0' in scsi


class FakeProc:
    pid = 424242
    returncode = None

    def __init__(self, exits=False, wait_times_out=0):
        self.exits = exits
        self.wait_times_out = wait_times_out

    def poll(self):
        if self.exits:
            self.returncode = 1
        return self.returncode

    def wait(self, timeout=None):
        if self.wait_times_out:
            self.wait_times_out -= 1
            raise subprocess.TimeoutExpired('qemu', timeout)
        self.returncode = -15
        return self.returncode


def _vm(tmp_path, console, proc):
    vm = qemu.QemuGuest(str(tmp_path / 'disk.raw'), str(tmp_path))
    (tmp_path / 'console.log').write_text(console)
    (tmp_path / 'qemu.log').write_text('')
    vm.proc = proc
    vm.started = time.monotonic()
    return vm


def test_wait_for_marker(tmp_path):
    vm = _vm(tmp_path, CONSOLE, FakeProc())
    seconds, fields = vm.wait_for_marker(5)
    assert 0 <= seconds < 5 and fields['root'] == '/dev/vda1'
    assert set(vm.seen) == {'kernel'}


def test_wait_for_deadline_says_what_it_waited_for(tmp_path):
    vm = _vm(tmp_path, 'SeaBIOS\n', FakeProc())
    with pytest.raises(guest.GuestError, match="no 'THUNDER-GUEST-READY ' "
                       "on the console within 0 s.*SeaBIOS"):
        vm.wait_for_marker(0)


def test_wait_for_failure_and_exit(tmp_path):
    vm = _vm(tmp_path, 'THUNDER-GUEST-FAILED initramfs: no disk\n',
             FakeProc())
    with pytest.raises(guest.GuestError, match='failed to boot: initramfs: '
                       'no disk'):
        vm.wait_for_marker(5)
    vm = _vm(tmp_path, 'SeaBIOS\n', FakeProc(exits=True))
    with pytest.raises(guest.GuestError, match=r'qemu exited \(1\)'):
        vm.wait_for_marker(5)


def test_stop_kills_the_process_group_by_pid(tmp_path):
    vm = _vm(tmp_path, '', FakeProc(wait_times_out=1))
    with mock.patch('os.killpg') as killpg:
        vm.stop()
    assert killpg.call_args_list == [mock.call(424242, signal.SIGTERM),
                                     mock.call(424242, signal.SIGKILL)]
    with mock.patch('os.killpg') as killpg:
        vm.stop()                                   # gone: nothing sent
    assert not killpg.called
