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

"""A stand-in guest for the Nova e2e tests, until thunder_stack.guest lands.

A raw disk that BIOS boots: syslinux's MBR, then syslinux on the FAT
partition loads Debian's cloud kernel and a busybox initramfs from it (so the
boot reads the volume, through SeaBIOS and the boot loader, but userspace
lives in the initramfs). ``/init`` prints :data:`MARKER` on the serial
console and then idles. Built without root and without installing
anything: ``apt-get download`` fetches the Debian packages (kernel,
busybox-static, syslinux, syslinux-common, mtools), ``dpkg-deb -x``
unpacks them into a work directory, Python writes the initramfs (newc
cpio, gzip) and mtools the FAT file system.
"""

import gzip
import io
import os
import shutil
import struct
import subprocess
import tempfile

MARKER = 'THUNDER-TINY-GUEST-READY'
SIZE = 32 << 20
PART_START = 1 << 20
KERNEL_META = 'linux-image-cloud-amd64'
PACKAGES = ('busybox-static', 'syslinux', 'syslinux-common', 'mtools')

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo
echo "%s $(cat /proc/uptime)"
while :; do sleep 3600; done
""" % MARKER

SYSLINUX_CFG = """SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0,115200 quiet panic=-1
"""


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode:
        raise RuntimeError('%s failed (%d): %s' % (
            ' '.join(cmd), result.returncode,
            (result.stdout + result.stderr)[-2000:]))
    return result.stdout


def _kernel_package():
    out = _run(['apt-cache', 'depends', KERNEL_META])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith('Depends: linux-image-'):
            return line.split(':', 1)[1].strip()
    raise RuntimeError('no kernel package behind %s:\n%s'
                       % (KERNEL_META, out))


def _cpio(entries):
    """A newc archive of ``(name, mode, data, rdev)`` entries."""
    out = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate(
            list(entries) + [('TRAILER!!!', 0, b'', (0, 0))], 1):
        encoded = name.encode() + b'\0'
        header = '070701' + ''.join('%08X' % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
            len(encoded), 0))
        out.write(header.encode() + encoded)
        out.write(b'\0' * (-out.tell() % 4))
        out.write(data)
        out.write(b'\0' * (-out.tell() % 4))
    return out.getvalue()


def _initramfs(busybox):
    with open(busybox, 'rb') as f:
        binary = f.read()
    entries = [(d, 0o40755, b'', (0, 0))
               for d in ('bin', 'dev', 'proc', 'sys', 'tmp')]
    entries += [('dev/console', 0o20600, b'', (5, 1)),
                ('bin/busybox', 0o100755, binary, (0, 0)),
                ('init', 0o100755, INIT.encode(), (0, 0))]
    return gzip.compress(_cpio(entries), 9)


def _mbr(boot_code):
    """Boot code and a partition table with one bootable FAT16 partition."""
    first, count = PART_START // 512, (SIZE - PART_START) // 512
    # CHS fields unused (LBA); 0x0e: FAT16 with LBA.
    entry = struct.pack('<B3sB3sII', 0x80, b'\xfe\xff\xff', 0x0e,
                        b'\xfe\xff\xff', first, count)
    return (boot_code[:440].ljust(440, b'\0') + b'\0' * 6 + entry +
            b'\0' * 48 + b'\x55\xaa')


def build(path):
    """Write the bootable raw disk to ``path``; returns :data:`MARKER`."""
    work = tempfile.mkdtemp(prefix='tiny-guest-')
    try:
        debs = os.path.join(work, 'debs')
        root = os.path.join(work, 'root')
        os.makedirs(debs)
        _run(['apt-get', 'download', '-q', _kernel_package()] +
             list(PACKAGES), cwd=debs)
        for name in sorted(os.listdir(debs)):
            _run(['dpkg-deb', '-x', os.path.join(debs, name), root])
        boot = os.path.join(root, 'boot')
        kernel = [n for n in os.listdir(boot) if n.startswith('vmlinuz-')]
        files = os.path.join(work, 'files')
        os.makedirs(files)
        shutil.copy(os.path.join(boot, kernel[0]),
                    os.path.join(files, 'vmlinuz'))
        with open(os.path.join(files, 'initrd.gz'), 'wb') as f:
            f.write(_initramfs(os.path.join(root, 'bin', 'busybox')))
        with open(os.path.join(files, 'syslinux.cfg'), 'w') as f:
            f.write(SYSLINUX_CFG)
        env = dict(os.environ, MTOOLS_SKIP_CHECK='1',
                   PATH=os.path.join(root, 'usr', 'bin') + ':' +
                   os.environ['PATH'])
        tmp = path + '.part'
        with open(os.path.join(root, 'usr', 'lib', 'syslinux', 'mbr',
                               'mbr.bin'), 'rb') as f:
            mbr = f.read()
        with open(tmp, 'wb') as f:
            f.truncate(SIZE)
            f.write(_mbr(mbr))
        # One bootable FAT16 partition from 1 MiB (a real partition
        # table: Glance's format inspector checks a raw image's MBR).
        part = '%s@@%d' % (tmp, PART_START)
        _run(['mformat', '-i', part, '-T', str((SIZE - PART_START) // 512),
              '-h', '64', '-s', '32', '-H', str(PART_START // 512), '-v',
              'TINYGUEST', '::'], env=env)
        for name in ('vmlinuz', 'initrd.gz', 'syslinux.cfg'):
            _run(['mcopy', '-i', part, os.path.join(files, name),
                  '::' + name], env=env)
        _run(['syslinux', '--offset', str(PART_START), '--install', tmp],
             env=env)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return MARKER


if __name__ == '__main__':
    import sys
    print(build(sys.argv[1]))
