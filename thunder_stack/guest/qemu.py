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

"""Boot a disk under plain qemu the way libvirt boots Nova's volumes.

The guest of ``thunder_stack.guest`` (or any disk) under
``qemu-system-x86_64``: virtio-blk, ``cache=none``, ``aio=threads``,
the serial console in a file, a QMP socket for the block statistics
and the ACPI power button. qemu runs in a session of its own and is
stopped by its PID (its process group), whatever happens.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from thunder_stack.guest import common
from thunder_stack.guest import marker

#: Console lines whose first appearance is timed: the kernel's banner (the
#: time before it is the firmware's and GRUB's), the initramfs's start.
BOOT_TOOLS = {'qemu-system-x86_64': 'qemu-system-x86'}
MILESTONES = {'kernel': 'Linux version', 'initramfs': 'Run /init as init'}


#: How libvirt attaches the disk: virtio-blk (Nova's default disk bus),
#: or a SCSI disk on virtio-scsi (image property hw_scsi_model).
BUSES = {'virtio': ['-device', 'virtio-blk-pci,drive=fmt,bootindex=1'],
         'scsi': ['-device', 'virtio-scsi-pci,id=scsi0',
                  '-device', 'scsi-hd,bus=scsi0.0,drive=fmt,bootindex=1']}


def qemu_command(accel, volume, memory_mib=1024, fmt='raw', bus='virtio'):
    """qemu booting ``volume`` as libvirt sets up Nova's volumes.

    virtio-blk (or ``bus`` scsi: virtio-scsi), ``fmt`` (raw),
    ``cache=none``, ``aio=threads``; one vCPU, no network, the serial
    console on stdout, no reboot (a power-off ends qemu).
    """
    # Without arch-capabilities: nested KVM here refuses its MSR (0x10a).
    return ['qemu-system-x86_64', '-accel', accel,
            '-cpu', 'host,-arch-capabilities' if accel == 'kvm' else 'max',
            '-m', str(memory_mib), '-smp', '1', '-nodefaults',
            '-display', 'none', '-serial', 'stdio', '-monitor', 'none',
            '-no-reboot', '-msg', 'timestamp=on',
            '-blockdev', 'driver=file,node-name=disk,filename=%s,'
            'cache.direct=on,cache.no-flush=off,aio=threads' % volume,
            '-blockdev', 'driver=%s,node-name=fmt,file=disk' % fmt
            ] + BUSES[bus] + ['-nic', 'none']


class QemuGuest:
    """One qemu process booting ``disk``; use as a context manager.

    The guest writes to ``disk`` (its root file system is mounted
    read-write): give it a copy of an image, not the image.
    """

    def __init__(self, disk, workdir, fmt='raw', accel='tcg',
                 memory_mib=256, uuid=None, bus='virtio'):
        self.disk = disk
        self.workdir = workdir
        self.console_path = os.path.join(workdir, 'console.log')
        self.stderr_path = os.path.join(workdir, 'qemu.log')
        self.qmp_path = os.path.join(workdir, 'qmp.sock')
        self.cmd = qemu_command(accel, disk, memory_mib, fmt, bus) + [
            '-qmp', 'unix:%s,server=on,wait=off' % self.qmp_path]
        if uuid:
            self.cmd += ['-uuid', uuid]   # SMBIOS, as libvirt sets Nova's
        self.proc = None
        self.started = None
        #: {milestone: seconds from qemu's start}, as seen by wait_for.
        self.seen = {}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        with open(self.console_path, 'wb') as out, \
                open(self.stderr_path, 'wb') as err:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err,
                                         start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def console(self):
        with open(self.console_path, 'rb') as f:
            return f.read().decode(errors='replace')

    def _tail(self):
        with open(self.stderr_path, errors='replace') as f:
            err = f.read().strip()
        return 'console: ...%s%s' % (
            self.console()[-1500:], ('; qemu: %s' % err[-500:]) if err
            else '')

    def wait_for(self, needle, timeout):
        """Seconds from qemu's start until ``needle`` is on the console."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            text = self.console()
            for name, text_of in MILESTONES.items():
                if name not in self.seen and text_of in text:
                    self.seen[name] = round(now - self.started, 2)
            if needle in text:
                return now - self.started
            why = marker.failure_seen(text)
            if why:
                raise common.GuestError('the guest failed to boot: %s (%s)' %
                                        (why, self._tail()))
            if self.proc.poll() is not None:
                raise common.GuestError(
                    'qemu exited (%s) before %r was on the console; %s' % (
                        self.proc.returncode, needle, self._tail()))
            if now > deadline:
                raise common.GuestError('no %r on the console within %d s; '
                                        '%s' % (needle, timeout,
                                                self._tail()))
            time.sleep(0.1)

    def wait_for_marker(self, timeout=120):
        """(seconds from qemu's start, the marker's fields).

        The seconds are those until the marker's first word was on the
        console; the fields are read once its line is complete.
        """
        seconds = self.wait_for(marker.MARKER + ' ', timeout)
        deadline = time.monotonic() + 5
        while True:
            text = self.console()
            line = text[text.rindex(marker.MARKER):]
            if '\n' in line or time.monotonic() > deadline:
                return seconds, marker.parse_marker(text)
            time.sleep(0.1)

    def qmp(self, command, timeout=10, **arguments):
        """Run one QMP command; its return value."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.qmp_path):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise common.GuestError('no QMP socket from qemu: %s' % (
                    self._tail()))
            time.sleep(0.1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.qmp_path)
            reader = sock.makefile('r')

            def call(name, args=None):
                request = {'execute': name}
                if args:
                    request['arguments'] = args
                sock.sendall(json.dumps(request).encode() + b'\n')
                for line in reader:
                    reply = json.loads(line)
                    if 'error' in reply:
                        raise common.GuestError('QMP %s: %s' % (
                            name, reply['error']))
                    if 'return' in reply:
                        return reply['return']
                raise common.GuestError('QMP closed during %s' % name)

            json.loads(reader.readline())     # the greeting
            call('qmp_capabilities')
            return call(command, arguments)

    def blockstats(self):
        """The disk's read and write counts since qemu started."""
        stats = [dev['stats'] for dev in self.qmp('query-blockstats')
                 if 'stats' in dev]
        if len(stats) != 1:
            raise common.GuestError('expected one disk in '
                                    'query-blockstats, got %d' % len(stats))
        return {key: stats[0][key] for key in (
            'rd_bytes', 'rd_operations', 'wr_bytes', 'wr_operations')}

    def powerdown(self, timeout=60):
        """Press the ACPI power button; seconds until qemu has exited."""
        started = time.monotonic()
        self.qmp('system_powerdown')
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise common.GuestError(
                'the guest did not power off within %d s of the ACPI power '
                'button; %s' % (timeout, self._tail()))
        return time.monotonic() - started

    def stop(self):
        """Stop qemu by its PID (its process group): TERM, then KILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue


def boot_copy(image, fmt='raw', timeout=120, accel='tcg', memory_mib=256,
              uuid=None, workdir=None):
    """Boot a throw-away copy of ``image`` until its marker; a dict.

    ``seconds``: qemu's start to the marker line; ``kernel_seconds``,
    ``initramfs_seconds``: to the kernel's banner (before it: the firmware
    and GRUB) and to the initramfs's start (MILESTONES); ``marker``: the
    marker's fields; ``rd_bytes`` ...: the disk's statistics at the
    marker. The copy and qemu are gone afterwards.
    """
    common.ensure_tools(BOOT_TOOLS)
    work = tempfile.mkdtemp(prefix='thunder-guest-boot-', dir=workdir)
    try:
        disk = os.path.join(work, 'disk.' + fmt)
        common.run(['cp', '--sparse=always', image, disk])
        with QemuGuest(disk, work, fmt, accel, memory_mib, uuid) as vm:
            seconds, fields = vm.wait_for_marker(timeout)
            result = {'seconds': round(seconds, 2), 'marker': fields}
            result.update(('%s_seconds' % k, v) for k, v in vm.seen.items())
            result.update(vm.blockstats())
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
