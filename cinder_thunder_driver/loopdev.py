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

"""Loop devices over peer-mode volume files, through Cinder's privsep.

A peer-mode volume is a file on the node's thunder-cache FUSE mount; Nova
attaches it as the raw block device of a loop device (connection type
``local``). Setting loop devices up needs ``CAP_SYS_ADMIN``: these
functions run in Cinder's privileged daemon (``cinder.privsep``, started
by cinder-volume through its rootwrap), so no new rootwrap filter is
needed. Only paths under the mount directory the caller names are
accepted, and only ``/dev/loopN`` devices are touched.
"""

import os

from cinder import privsep
from oslo_concurrency import processutils

from thunder_common import loops


class LoopError(RuntimeError):
    """losetup failed or the kernel did not do what was asked."""


def _check_device(device):
    if not isinstance(device, str) or not loops.DEVICE.match(device):
        raise LoopError('%r is not a loop device' % (device,))
    return device


def _check_file(path, mount_dir):
    real_dir = os.path.realpath(mount_dir)
    real = os.path.realpath(path)
    if os.path.dirname(real) != real_dir:
        raise LoopError('%s is not a volume file of %s' % (path, mount_dir))
    return real


def _losetup(*args):
    try:
        out, _err = processutils.execute('losetup', *args)
    except processutils.ProcessExecutionError as e:
        raise LoopError('losetup %s failed: %s' % (' '.join(args),
                                                   (e.stderr or '').strip()))
    return out


def _devices(path):
    return loops.backed_by(_losetup(*loops.LIST_COMMAND[1:]), path=path)


@privsep.sys_admin_pctxt.entrypoint
def devices_of(path, mount_dir):
    """The loop devices whose backing file is ``path``."""
    return _devices(_check_file(path, mount_dir))


@privsep.sys_admin_pctxt.entrypoint
def attach(path, mount_dir, direct_io=True):
    """A loop device over ``path``: the existing one, else a new one.

    Returns ``(device, direct_io_in_effect)``: the kernel silently falls
    back to buffered I/O when the file cannot do direct I/O.
    """
    path = _check_file(path, mount_dir)
    existing = _devices(path)
    if existing:
        device = existing[0]
    else:
        args = ['--find', '--show']
        if direct_io:
            args.append('--direct-io=on')
        device = _check_device(_losetup(*(args + [path])).strip())
    dio = _losetup('--noheadings', '--output', 'DIO', device).strip()
    return device, dio == '1'


@privsep.sys_admin_pctxt.entrypoint
def detach(device):
    """Detach a loop device; one already gone is fine."""
    device = _check_device(device)
    try:
        _losetup('--detach', device)
    except LoopError as e:
        if 'No such device' not in str(e) and 'not found' not in str(e):
            raise


@privsep.sys_admin_pctxt.entrypoint
def refresh_size(device, path, mount_dir):
    """Make ``device`` take the new size of its (grown) backing file."""
    device = _check_device(device)
    path = _check_file(path, mount_dir)
    # A stat makes FUSE fetch the new size before the kernel reads it.
    os.stat(path)
    _losetup('--set-capacity', device)
