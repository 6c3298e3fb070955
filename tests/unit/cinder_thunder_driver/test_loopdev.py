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

"""Tests for cinder_thunder_driver.loopdev: loop devices through privsep."""

import os
from unittest import mock

from cinder import privsep
from oslo_concurrency import processutils
import pytest

from cinder_thunder_driver import loopdev

LIST_ARGS = ('losetup', '--list', '--noheadings', '--raw', '--output',
             'NAME,BACK-FILE')


@pytest.fixture(autouse=True)
def direct_privsep():
    """Run the privsep entrypoints in this process, without a daemon."""
    context = privsep.sys_admin_pctxt
    mode = context.client_mode
    context.set_client_mode(False)
    yield
    context.set_client_mode(mode)


class FakeLosetup:
    """``processutils.execute`` of losetup over a table of devices."""

    def __init__(self):
        self.devices = {}  # device -> backing file
        self.dio = {}
        self.calls = []
        self.listing_extra = ''
        self.find_output = None
        self.fail = {}  # first argument -> stderr

    def __call__(self, *cmd, **kwargs):
        assert cmd[0] == 'losetup'
        assert kwargs == {}
        self.calls.append(cmd)
        args = cmd[1:]
        if args[0] in self.fail:
            raise processutils.ProcessExecutionError(
                stderr=self.fail[args[0]], exit_code=1, cmd=' '.join(cmd))
        if args[0] == '--list':
            lines = ['%s %s' % item for item in sorted(self.devices.items())]
            return '\n'.join(lines) + '\n' + self.listing_extra, ''
        if args[0] == '--find':
            if self.find_output is not None:
                return self.find_output, ''
            device = '/dev/loop%d' % len(self.devices)
            self.devices[device] = args[-1]
            self.dio[device] = '--direct-io=on' in args
            return device + '\n', ''
        if args[:3] == ('--noheadings', '--output', 'DIO'):
            return '  %d\n' % self.dio.get(args[3], False), ''
        if args[0] == '--detach':
            if args[1] not in self.devices:
                raise processutils.ProcessExecutionError(
                    stderr='losetup: %s: detach failed: No such device or '
                           'address\n' % args[1], exit_code=1)
            del self.devices[args[1]]
            return '', ''
        if args[0] == '--set-capacity':
            return '', ''
        raise AssertionError('unexpected losetup call %r' % (cmd,))

    def commands(self):
        return [c[1] for c in self.calls]


@pytest.fixture
def losetup():
    fake = FakeLosetup()
    with mock.patch.object(loopdev.processutils, 'execute', fake):
        yield fake


@pytest.fixture
def volume_file(mount_dir):
    path = os.path.join(mount_dir, 'volume-1')
    with open(path, 'wb') as f:
        f.truncate(1 << 20)
    return path


def test_functions_are_privsep_entrypoints():
    for func in (loopdev.devices_of, loopdev.attach, loopdev.detach,
                 loopdev.refresh_size):
        assert privsep.sys_admin_pctxt.is_entrypoint(func), func


# -- devices_of -------------------------------------------------------------

def test_devices_of_parses_the_listing(losetup, volume_file):
    other = os.path.join(os.path.dirname(volume_file), 'volume-2')
    losetup.devices = {'/dev/loop3': volume_file,
                       '/dev/loop12': volume_file,
                       '/dev/loop4': other,
                       '/dev/loop5': volume_file + '-old',
                       '/dev/loop6': volume_file[:-1]}
    losetup.listing_extra = ('/dev/mapper/x %s\n/dev/loopX %s\n'
                             '/dev/loop9\n\n/dev/loop10 \n'
                             % (volume_file, volume_file))
    assert loopdev.devices_of(volume_file, os.path.dirname(volume_file)) \
        == ['/dev/loop12', '/dev/loop3']
    assert losetup.calls == [LIST_ARGS]


def test_devices_of_unattached_file(losetup, volume_file, mount_dir):
    assert loopdev.devices_of(volume_file, mount_dir) == []


def test_devices_of_resolves_the_mount_dir(losetup, volume_file, tmp_path):
    link = str(tmp_path / 'link')
    os.symlink(os.path.dirname(volume_file), link)
    losetup.devices = {'/dev/loop1': volume_file}
    # Named through a symbolic link: the kernel lists the real path.
    assert loopdev.devices_of(os.path.join(link, 'volume-1'), link) == [
        '/dev/loop1']


def _outside_paths(mount_dir, tmp_path):
    secret = tmp_path / 'secret'
    secret.write_text('x')
    os.symlink(str(secret), os.path.join(mount_dir, 'escape'))
    os.mkdir(os.path.join(mount_dir, 'sub'))
    return ['/etc/passwd', str(secret),
            os.path.join(mount_dir, '..', 'secret'),
            os.path.join(mount_dir, 'escape'),
            os.path.join(mount_dir, 'sub', 'volume-1'),
            mount_dir, os.path.dirname(mount_dir)]


def test_paths_outside_the_mount_dir_refused(losetup, mount_dir, tmp_path):
    for path in _outside_paths(mount_dir, tmp_path):
        with pytest.raises(loopdev.LoopError, match='not a volume file'):
            loopdev.devices_of(path, mount_dir)
        with pytest.raises(loopdev.LoopError, match='not a volume file'):
            loopdev.attach(path, mount_dir)
        with pytest.raises(loopdev.LoopError, match='not a volume file'):
            loopdev.refresh_size('/dev/loop0', path, mount_dir)
    assert losetup.calls == []


# -- attach -----------------------------------------------------------------

def test_attach_new_device(losetup, volume_file, mount_dir):
    assert loopdev.attach(volume_file, mount_dir) == ('/dev/loop0', True)
    assert losetup.calls == [
        LIST_ARGS,
        ('losetup', '--find', '--show', '--direct-io=on', volume_file),
        ('losetup', '--noheadings', '--output', 'DIO', '/dev/loop0')]


def test_attach_without_direct_io(losetup, volume_file, mount_dir):
    assert loopdev.attach(volume_file, mount_dir, direct_io=False) == (
        '/dev/loop0', False)
    assert losetup.calls[1] == ('losetup', '--find', '--show', volume_file)


def test_attach_reports_direct_io_refused(losetup, volume_file, mount_dir):
    # The kernel fell back to buffered I/O.
    losetup.find_output = '/dev/loop4\n'
    assert loopdev.attach(volume_file, mount_dir) == ('/dev/loop4', False)


def test_attach_reuses_an_existing_device(losetup, volume_file, mount_dir):
    losetup.devices = {'/dev/loop8': volume_file}
    losetup.dio = {'/dev/loop8': True}
    assert loopdev.attach(volume_file, mount_dir) == ('/dev/loop8', True)
    assert losetup.commands() == ['--list', '--noheadings']
    assert losetup.calls[-1][-1] == '/dev/loop8'


@pytest.mark.parametrize('output', ['/dev/sda\n', '', 'loop0\n',
                                    '/dev/loop0 /dev/loop1\n',
                                    '/dev/loop1/../sda\n'])
def test_attach_refuses_what_is_not_a_loop_device(losetup, volume_file,
                                                  mount_dir, output):
    losetup.find_output = output
    with pytest.raises(loopdev.LoopError, match='not a loop device'):
        loopdev.attach(volume_file, mount_dir)
    assert losetup.commands() == ['--list', '--find']


def test_attach_losetup_failure(losetup, volume_file, mount_dir):
    losetup.fail['--find'] = 'losetup: cannot find an unused loop device\n'
    with pytest.raises(loopdev.LoopError) as info:
        loopdev.attach(volume_file, mount_dir)
    assert 'cannot find an unused loop device' in str(info.value)
    assert '--find --show --direct-io=on' in str(info.value)


# -- detach -----------------------------------------------------------------

def test_detach(losetup, volume_file):
    losetup.devices = {'/dev/loop2': volume_file}
    assert loopdev.detach('/dev/loop2') is None
    assert losetup.calls == [('losetup', '--detach', '/dev/loop2')]
    assert losetup.devices == {}


def test_detach_missing_device_is_fine(losetup):
    loopdev.detach('/dev/loop5')
    assert losetup.calls == [('losetup', '--detach', '/dev/loop5')]


def test_detach_other_failure_raised(losetup):
    losetup.fail['--detach'] = ('losetup: /dev/loop2: detach failed: '
                                'Device or resource busy\n')
    with pytest.raises(loopdev.LoopError, match='busy'):
        loopdev.detach('/dev/loop2')


@pytest.mark.parametrize('device', ['/dev/sda', '/dev/loop', 'loop1',
                                    '/dev/loop1\n', '/dev/loop1 --all',
                                    '/dev/loop-control', '/dev/loop1234567',
                                    '/dev/loop1/../sda', 5, None])
def test_non_loop_devices_refused(losetup, volume_file, mount_dir, device):
    with pytest.raises(loopdev.LoopError, match='not a loop device'):
        loopdev.detach(device)
    with pytest.raises(loopdev.LoopError, match='not a loop device'):
        loopdev.refresh_size(device, volume_file, mount_dir)
    assert losetup.calls == []


# -- refresh_size -----------------------------------------------------------

def test_refresh_size(losetup, volume_file, mount_dir):
    with mock.patch.object(loopdev.os, 'stat', wraps=os.stat) as stat:
        loopdev.refresh_size('/dev/loop3', volume_file, mount_dir)
    stat.assert_called_once_with(volume_file)
    assert losetup.calls == [('losetup', '--set-capacity', '/dev/loop3')]


def test_refresh_size_failure(losetup, volume_file, mount_dir):
    losetup.fail['--set-capacity'] = 'losetup: ioctl failed\n'
    with pytest.raises(loopdev.LoopError, match='ioctl failed'):
        loopdev.refresh_size('/dev/loop3', volume_file, mount_dir)
