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

"""Peer mode: what a volume's reader sees while thunder-cache restarts.

A real ``thunder-cache`` daemon serves a volume of an image through a
volume server (``--server native``: ``thunder-volume-server``, its own
process; ``python``: the daemon's own FUSE mount), attached as the Cinder
driver attaches it (``losetup --direct-io=on``). A checker does random 4
KiB ``O_DIRECT`` reads and writes on the loop device (30 % writes, an
fsync now and then) and compares every byte read with what it wrote or
the image holds. Meanwhile, one after the other:

daemon kill -9
    SIGKILL, restarted ``--down`` seconds later (a crash and its
    restart by systemd);
daemon stop/start
    SIGTERM, started again ``--down`` seconds later (a restart, or an
    upgrade: stop, new package, start);

and, with the native server, the volume server itself (its holder keeps
the mount's ``/dev/fuse`` descriptor and starts a new server, which takes
the mount over):

volume server kill -9
    SIGKILL to the server (a crash);
volume server restart
    SIGTERM to the server;
volume server upgrade
    the binary rebuilt and replaced, then the holder told to restart
    (:meth:`thunder_cache.volumes.nativevol.NativeServer.restart`: it execs the
    new binary, which starts a new server);
holder kill -9
    SIGKILL to the holder: its server takes its place and starts a new
    server.

Beside the checker a reader does 1 MiB ``O_DIRECT`` reads over the whole
device (its errors count too), so that requests are in flight when a
server dies. Printed per event: the time the daemon or server was down
(until a new one answered), the longest read and write during the event
and the second after it, the I/O errors and wrong reads, and the I/Os
(the checker's and the reader's). At the end
the whole device is compared with what it should hold. Run as root::

    tox -e bench -- benchmarks/restart.py [--size-mib 512] [--down 2]
        [--server native|python]
"""

import argparse
import mmap
import os
import random
import shutil
import signal
import sys
import threading
import time

from benchmarks import blockdev_mechanisms as bm
from benchmarks import cache_io
from thunder_cache.volumes import nativevol

BS = 4096
MiB = 1024 * 1024


class Checker(threading.Thread):
    """Random 4 KiB O_DIRECT reads and writes, every byte checked.

    ``expected`` is a bytearray of the device's size. ``errors``,
    ``wrong`` and ``ops`` count; ``longest`` is the longest operation
    since :meth:`mark`, ``longest_read`` and ``longest_write`` by kind.
    """

    def __init__(self, device, expected, write_share=0.3, seed=7):
        super().__init__(daemon=True, name='checker')
        self.device = device
        self.expected = expected
        self.write_share = write_share
        self.rng = random.Random(seed)
        self.errors = []
        self.wrong = 0
        self.ops = 0
        self.longest = self.longest_read = self.longest_write = 0.0
        self.stop = threading.Event()

    def mark(self):
        """Start a new window: (errors, wrong, ops) so far."""
        self.longest = self.longest_read = self.longest_write = 0.0
        return len(self.errors), self.wrong, self.ops

    def run(self):
        fd = os.open(self.device, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, BS)
        blocks = len(self.expected) // BS
        try:
            while not self.stop.is_set():
                self._one(fd, buf, self.rng.randrange(blocks) * BS)
        finally:
            buf.close()
            os.close(fd)

    def _one(self, fd, buf, offset):
        start = time.monotonic()
        write = self.rng.random() < self.write_share
        try:
            if write:
                data = os.urandom(BS)
                buf[:] = data
                os.pwrite(fd, buf, offset)
                self.expected[offset:offset + BS] = data
                if self.rng.random() < 0.1:
                    os.fsync(fd)
            else:
                os.preadv(fd, [buf], offset)
                if buf[:] != self.expected[offset:offset + BS]:
                    self.wrong += 1
        except OSError as e:
            self.errors.append(e)
        took = time.monotonic() - start
        self.longest = max(self.longest, took)
        if write:
            self.longest_write = max(self.longest_write, took)
        else:
            self.longest_read = max(self.longest_read, took)
        self.ops += 1

    def finish(self, timeout=120):
        self.stop.set()
        self.join(timeout)
        if self.is_alive():
            raise RuntimeError('the checker is stuck in an I/O')


class Reader(threading.Thread):
    """1 MiB O_DIRECT reads over the device until the checker stops.

    Its errors go to the checker's; ``longest`` is its longest read,
    ``ops`` counts its reads.
    """

    def __init__(self, device, checker):
        super().__init__(daemon=True, name='reader')
        self.device = device
        self.checker = checker
        self.longest = 0.0
        self.ops = 0

    def run(self):
        fd = os.open(self.device, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MiB)
        try:
            while not self.checker.stop.is_set():
                for offset in range(0, len(self.checker.expected), MiB):
                    start = time.monotonic()
                    try:
                        os.preadv(fd, [buf], offset)
                    except OSError as e:
                        self.checker.errors.append(e)
                    self.longest = max(self.longest,
                                       time.monotonic() - start)
                    self.ops += 1
        finally:
            buf.close()
            os.close(fd)


def server_events(daemon, workdir):
    """The volume server's events: (name, prepare, action) each.

    Each action returns once a new server answers.
    """
    server = nativevol.NativeServer(daemon.native_socket)

    def signal_server(sig):
        old = server.ping()
        os.kill(old, sig)
        server.wait_for_new(old, 60)

    def kill_holder():
        old = server.ping()
        os.kill(server.holder_pid(), signal.SIGKILL)
        server.wait_for_new(old, 60)

    def replace_binary():
        new = nativevol.build(os.path.join(workdir, 'native-new'))
        shutil.copy2(new, daemon.native + '.new')
        os.replace(daemon.native + '.new', daemon.native)

    return [('volume server kill -9', None,
             lambda: signal_server(signal.SIGKILL)),
            ('volume server restart', None,
             lambda: signal_server(signal.SIGTERM)),
            ('volume server upgrade', replace_binary, server.restart),
            ('holder kill -9', None, kill_holder)]


def run_events(daemon, checker, reader, down, events):
    """The events, one after the other; a row of figures per event.

    Each event is (name, prepare, action, restart): prepare (or None)
    runs before the window, action stops something, restart (or None)
    runs ``down`` seconds later.
    """
    rows = []
    for name, prepare, action, restart in events:
        if prepare:
            prepare()
        errors, wrong, ops = checker.mark()
        ops += reader.ops
        reader.longest = 0.0
        started = time.monotonic()
        action()
        if restart:
            time.sleep(down)
            restart()
        was_down = time.monotonic() - started
        time.sleep(1)
        rows.append({'event': name, 'down_s': was_down,
                     'longest_read_s': max(checker.longest_read,
                                           reader.longest),
                     'longest_write_s': checker.longest_write,
                     'io_errors': len(checker.errors) - errors,
                     'wrong_reads': checker.wrong - wrong,
                     'ops': checker.ops + reader.ops - ops})
    return rows


def report(args, rows, verified):
    print()
    print('Restarts under I/O: %s volume server, %d MiB image, random 4 KiB '
          'O_DIRECT reads and writes (30 %% writes) on a direct-I/O loop '
          'device; load average %s' % (args.server, args.size_mib,
                                       bm.load_average()))
    print()
    print('%-24s %8s %13s %14s %10s %12s %8s' % (
        'event', 'down s', 'longest read', 'longest write', 'I/O errors',
        'wrong reads', 'I/Os'))
    for row in rows:
        print('%-24s %8.2f %12.2fs %13.2fs %10d %12d %8d' % (
            row['event'], row['down_s'], row['longest_read_s'],
            row['longest_write_s'], row['io_errors'], row['wrong_reads'],
            row['ops']))
    print()
    print('device read back whole, equal to what it should hold: %s'
          % ('yes' if verified else 'NO'))


def measure(args, workdir, cleanup):
    size = args.size_mib * MiB
    image, plain = (os.path.join(workdir, name)
                    for name in ('image-volume', 'plain.raw'))
    manifest, length = cache_io.write_image(image, plain, size)
    native = None
    if args.server == 'native':
        native = nativevol.build(os.path.join(workdir, 'native'))
    rounddir = os.path.join(workdir, 'node')
    os.makedirs(rounddir)
    daemon = cache_io.Daemon(rounddir, cleanup, native=native)
    daemon.register('img', manifest, length, image)
    volume = cache_io.Volume(daemon, 'vol-restart', 'img', size + 64 * MiB)
    cleanup.callback(volume.cleanup.close)
    with open(plain, 'rb') as f:
        expected = bytearray(f.read()) + bytearray(64 * MiB)
    checker = Checker(volume.device, expected)
    reader = Reader(volume.device, checker)
    checker.start()
    reader.start()
    cleanup.callback(checker.stop.set)
    time.sleep(1)
    events = [('daemon kill -9', None, daemon.kill, daemon.start),
              ('daemon stop/start', None, lambda: daemon.server.stop(),
               daemon.start)]
    if native:
        events += [(name, prepare, action, None) for name, prepare, action
                   in server_events(daemon, workdir)]
    rows = run_events(daemon, checker, reader, args.down, events)
    checker.finish()
    reader.join(60)
    try:
        with open(volume.device, 'rb') as f:
            verified = f.read() == bytes(checker.expected)
    except OSError as e:
        print('reading the device back: %s' % e, file=sys.stderr)
        verified = False
    return rows, verified


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size-mib', type=int, default=512,
                        help='image size in MiB; the volume is 64 MiB '
                        'larger (default 512)')
    parser.add_argument('--down', type=float, default=2.0,
                        help='seconds the daemon stays down (default 2)')
    parser.add_argument('--server', choices=('native', 'python'),
                        default='native',
                        help='the volume server (default native)')
    parser.add_argument('--workdir', default='/var/tmp',
                        help='where the temporary directory goes')
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.down < 0:
        parser.error('sizes and times must be positive')
    return args


def run(args, workdir, cleanup):
    rows, verified = measure(args, workdir, cleanup)
    report(args, rows, verified)
    bad = [row for row in rows if row['io_errors'] or row['wrong_reads']]
    return 1 if bad or not verified else 0


def main(argv=None):
    return cache_io.run_main('restart', run, parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
