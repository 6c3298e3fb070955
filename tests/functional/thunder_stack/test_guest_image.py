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

"""The guest image, built here from Debian packages, boots from its disk.

Real ``apt-get download``, ``mke2fs``, GRUB and qemu: the image is built
into a temporary cache, then copies of it boot under
``qemu-system-x86_64`` with TCG (as Nova's ``virt_type = qemu``), the
disk set up as libvirt sets up Nova's volumes, until the marker line is
on the serial console. qemu is stopped by its PID at the end of each
test, whatever happens.
"""

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from thunder_stack import guest
from thunder_stack.guest import qemu

MiB = 1024 * 1024
#: A boot takes 8-16 s here under TCG; a loaded CI machine gets room.
BOOT_DEADLINE = 300

pytestmark = pytest.mark.skipif(
    not shutil.which('qemu-system-x86_64'),
    reason='qemu-system-x86_64 is not installed (apt-get install '
    'qemu-system-x86): the guest image cannot be booted')


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp('guest-cache')
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope='module')
def image(cache):
    return guest.build(cache)


def _copy(image, tmp_path, name='disk.raw'):
    """The volume a server would get: a copy (the guest writes to it)."""
    path = str(tmp_path / name)
    subprocess.run(['cp', '--sparse=always', image.path, path], check=True)
    return path


def test_build_is_cached_and_reproducible(image, cache, tmp_path):
    assert not image.cached
    assert image.fmt == 'raw' and image.marker == guest.MARKER
    assert image.size == guest.DEFAULT_SIZE_MIB * MiB
    assert os.path.getsize(image.path) == image.size
    assert image.allocated < image.size / 2          # mostly sparse
    with open(image.path, 'rb') as f:
        f.seek(510)
        assert f.read(2) == b'\x55\xaa'
    meta = image.meta
    assert meta['kernel_version'].endswith('-cloud-amd64')
    assert 'virtio_blk' in meta['initramfs_modules'] + meta[
        'builtin_modules']

    again = guest.build(cache)
    assert again.cached and again.path == image.path
    assert again.sha256 == image.sha256
    # thunder_stack is not installed: python -m finds it in the checkout.
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(guest.__file__))))
    out = subprocess.run([sys.executable, '-m', 'thunder_stack.guest',
                          'build', '--out', cache], capture_output=True,
                         text=True, check=True, cwd=checkout).stdout
    assert out.strip() == image.path

    # The same inputs elsewhere make the same bytes (the .deb files are
    # shared to spare the mirror).
    other = tmp_path / 'other'
    shutil.copytree(os.path.join(cache, 'debs'), str(other / 'debs'))
    try:
        twin = guest.build(str(other))
        assert not twin.cached and twin.path != image.path
        assert twin.sha256 == image.sha256
    finally:
        shutil.rmtree(other)


def test_boots_from_its_disk_to_the_marker(image, tmp_path):
    disk = _copy(image, tmp_path)
    instance = str(uuid.uuid4())
    with qemu.QemuGuest(disk, str(tmp_path), uuid=instance) as vm:
        pid = vm.pid
        seconds, fields = vm.wait_for_marker(BOOT_DEADLINE)
        meta = image.meta
        assert fields == {
            'uuid': instance, 'host': 'thunder-guest', 'root': '/dev/vda1',
            'fs': 'ext4', 'read': str(meta['boot_set_bytes']),
            'files': str(meta['boot_set_files']), 'check': 'ok',
            'boot': '1', 'uptime': fields['uptime']}
        # The boot read the disk: GRUB read the kernel and the initramfs,
        # the guest its boot set (and busybox, and file system metadata).
        stats = vm.blockstats()
        assert stats['rd_bytes'] >= (meta['kernel_bytes'] +
                                     meta['initrd_bytes'] +
                                     meta['boot_set_bytes'])
        assert stats['wr_bytes'] > 0                 # noted its boot
        # It stays up, idle, after the marker.
        time.sleep(2)
        assert vm.proc.poll() is None
        assert not guest.failure_seen(vm.console())
        # The ACPI power button (openstack server stop) powers it off.
        vm.powerdown(timeout=60)
        assert vm.proc.returncode == 0
    assert not os.path.exists('/proc/%d' % pid)
    print('boot to the marker: %.1f s, %d bytes read' % (
        seconds, stats['rd_bytes']))

    # The volume remembers: its second boot is boot 2.
    with qemu.QemuGuest(disk, str(tmp_path)) as vm:
        _seconds, fields = vm.wait_for_marker(BOOT_DEADLINE)
    assert fields['boot'] == '2' and fields['uuid'] == 'unknown'


def test_boots_from_virtio_scsi(image, tmp_path):
    disk = _copy(image, tmp_path)
    with qemu.QemuGuest(disk, str(tmp_path), bus='scsi') as vm:
        _seconds, fields = vm.wait_for_marker(BOOT_DEADLINE)
    assert fields['root'] == '/dev/sda1' and fields['check'] == 'ok'


def test_a_changed_disk_fails_its_check(image, tmp_path):
    """The guest checks what it read: a corrupt block is seen, and said."""
    disk = _copy(image, tmp_path)
    boot_set = os.path.join('/', image.meta['boot_set_dir'], 'f007.bin')
    blocks = subprocess.run(
        ['debugfs', '-R', 'blocks %s' % boot_set, '%s?offset=%d' % (
            disk, image.meta['partition_offset'])],
        capture_output=True, text=True, check=True).stdout.split()
    with open(disk, 'r+b') as f:
        f.seek(image.meta['partition_offset'] + int(blocks[0]) * 4096)
        f.write(b'\xff' * 512)
    with qemu.QemuGuest(disk, str(tmp_path)) as vm:
        with pytest.raises(guest.GuestError, match='check=bad'):
            vm.wait_for_marker(BOOT_DEADLINE)


def test_qcow2(image, cache):
    converted = guest.build(cache, fmt='qcow2')
    assert converted.fmt == 'qcow2' and converted.path.endswith('.qcow2')
    assert converted.size == image.size
    assert converted.meta['raw_sha256'] == image.sha256
    info = subprocess.run(['qemu-img', 'info', '--output=json',
                           converted.path], capture_output=True, text=True,
                          check=True).stdout
    assert '"format": "qcow2"' in info
    subprocess.run(['qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2',
                    image.path, converted.path], check=True)
    assert guest.build(cache, fmt='qcow2').cached


def test_a_disk_too_small_leaves_nothing(image, cache):
    before = sorted(os.listdir(cache))
    with pytest.raises(guest.GuestError, match='do not hold'):
        guest.build(cache, size_mib=32, filler_mib=64)
    assert sorted(os.listdir(cache)) == before
