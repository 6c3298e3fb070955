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

"""The native volume server (``[blockdev] volume_server = native``).

``thunder-volume-server`` (C, libfuse 3, source and Makefile in
``thunder_cache/volumes/native``) serves the volume files in its own
process: it reads present chunks and written blocks straight from the
files, and asks the daemon for missing chunks on the control socket
(``ensure_chunks``).
The daemon still creates, grows, copies and deletes layers; before it
touches a layer the server holds, it pauses that volume's I/O over the
server's own socket (:meth:`NativeServer.hold`), which also tells how
often the volume file is open.

The server outlives the daemon: a daemon that stops, crashes or is
upgraded leaves it (and every attached loop device) serving, and the next
daemon finds it through its socket. It also outlives itself: the process
started is a holder that keeps the mount's ``/dev/fuse`` descriptor and
the socket, and starts a new server (which takes the mount over) when
one dies, or on SIGHUP from the binary now installed
(:meth:`NativeServer.restart`).
"""

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import time

from thunder_common import procs

LOG = logging.getLogger(__name__)

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'native')
BINARY = 'thunder-volume-server'
TIMEOUT = 60.0


class NativeError(Exception):
    """The native server refused a request or cannot be reached."""

    def __init__(self, code, message):
        super().__init__('%s: %s' % (code, message))
        self.code = code


def build(build_dir):
    """Build the server with make into ``build_dir``; its path.

    :raises NativeError: if make fails (its output in the message).
    """
    result = subprocess.run(['make', '-s', '-C', SOURCE_DIR,
                             'BUILD_DIR=%s' % os.path.abspath(build_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if result.returncode:
        raise NativeError('Build', result.stdout.strip()[-2000:])
    return os.path.join(build_dir, BINARY)


#: What an operator runs to build and install the server.
INSTALL_HINT = (
    'build and install it from source: make -C %s install '
    'PREFIX=/usr/local (Debian packages: gcc make pkg-config libfuse3-dev '
    'zlib1g-dev; devstack does this), or set [blockdev] volume_server = '
    'python' % SOURCE_DIR)


def find_binary(name):
    """The server's path from ``native_server_binary``, or NativeError."""
    path = name if os.sep in name else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        raise NativeError('NotFound', '[blockdev] native_server_binary = %s '
                          'is not installed (volume_server = native, the '
                          'default): %s' % (name, INSTALL_HINT))
    return path


class NativeServer:
    """Talks to a running server on ``socket_path``."""

    def __init__(self, socket_path, timeout=TIMEOUT):
        self.socket_path = socket_path
        self.pid_file = socket_path + '.pid'
        self.timeout = timeout

    def _connect(self, line):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
            sock.sendall(line.encode('ascii') + b'\n')
            answer = sock.makefile('rb').readline(256).decode('ascii',
                                                              'replace')
        except OSError as e:
            sock.close()
            # Nothing listens: no server, so nobody reads or writes.
            gone = e.errno in (errno.ENOENT, errno.ECONNREFUSED)
            code = 'NotRunning' if gone else 'Unavailable'
            raise NativeError(code, 'thunder-volume-server at %s: %s'
                              % (self.socket_path, e))
        words = answer.strip().split(' ', 2)
        if words[0] != 'OK' or len(words) != 2:
            sock.close()
            raise NativeError(words[1] if len(words) > 1 else 'EIO',
                              ' '.join(words[2:]) or 'no answer')
        return sock, int(words[1])

    def ping(self):
        """The server's PID; NativeError if it does not answer."""
        sock, pid = self._connect('PING')
        sock.close()
        return pid

    def reverify(self):
        """Tell the server a new daemon runs; how many images it knew.

        The server forgets which chunks it was told are usable, so it
        reads none from a cache file before this daemon run says so (with
        ``verify_persisted``: verified its bytes). 0 if no server runs
        (the next one starts knowing none).
        """
        try:
            sock, images = self._connect('REVERIFY')
        except NativeError as e:
            if e.code != 'NotRunning':
                raise
            return 0
        sock.close()
        return images

    def holder_pid(self):
        """The PID of the server's holder (its pid file), or NativeError."""
        try:
            with open(self.pid_file) as f:
                pid = int(f.read())
            os.kill(pid, 0)
        except (OSError, ValueError) as e:
            raise NativeError('NotRunning', 'no thunder-volume-server '
                              'holder (%s): %s' % (self.pid_file, e))
        return pid

    def restart(self, wait=30.0):
        """Restart the server with the binary installed now (an upgrade).

        The holder (SIGHUP) stops the server, replaces itself with the
        binary now at its path and starts a new server; the mount, and
        every volume attached, stay. Returns the new server's PID.
        """
        old = self.ping()
        os.kill(self.holder_pid(), signal.SIGHUP)
        pid = self.wait_for_new(old, wait)
        LOG.info('Restarted thunder-volume-server (PID %d, was %d)', pid, old)
        return pid

    def wait_for_new(self, old, wait=30.0):
        """The PID of the server that replaced PID ``old``, once it answers.

        :raises NativeError: ``Restart`` if none does within ``wait`` s.
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                pid = self.ping()
            except NativeError:
                pid = old
            if pid != old:
                return pid
            if time.monotonic() > deadline:
                raise NativeError('Restart', 'no new thunder-volume-server '
                                  'within %s s' % wait)
            time.sleep(0.02)

    def stop(self, wait=30.0):
        """Stop the holder (SIGTERM): its server stops, the mount goes.

        Only with no volume attached on the node. Returns the holder's PID,
        or None if none ran.
        """
        try:
            pid = self.holder_pid()
        except NativeError:
            return None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while procs.alive(pid):
            if time.monotonic() > deadline:
                raise NativeError('Stop', 'thunder-volume-server holder %d '
                                  'still runs after %s s' % (pid, wait))
            time.sleep(0.05)
        return pid

    @contextlib.contextmanager
    def hold(self, volume_id):
        """Pause the volume's I/O (its pages flushed, files closed).

        Yields how often the volume file is open. The server opens the
        layer again (new size, new bitmap) when the block ends, and says
        so; if it died meanwhile, the server that replaced it is told the
        hold is over (``UNHOLD``): it does not open that layer before. With
        no server running (nothing listens on its socket) there is no I/O
        to pause: yields 0.
        """
        try:
            sock, opens = self._connect('HOLD %s' % volume_id)
        except NativeError as e:
            if e.code != 'NotRunning':
                raise
            yield 0
            return
        try:
            yield opens
        finally:
            released = False
            try:
                sock.sendall(b'RELEASE\n')
                released = sock.makefile('rb').readline(256).startswith(b'OK')
            except OSError:
                pass
            sock.close()
            if not released:
                self._unhold(volume_id)

    def _unhold(self, volume_id):
        LOG.warning('thunder-volume-server did not answer the release of '
                    'volume %s (it died during the hold?): telling the '
                    'server now running that the hold is over', volume_id)
        try:
            self._connect('UNHOLD %s' % volume_id)[0].close()
        except NativeError as e:
            LOG.warning('Volume %s: UNHOLD: %s', volume_id, e)

    def forget(self, volume_id):
        """Drop a volume before its layer is deleted.

        :raises NativeError: ``EBUSY`` while the volume file is open.
        """
        try:
            sock, _ = self._connect('FORGET %s' % volume_id)
        except NativeError as e:
            if e.code != 'NotRunning':
                raise
            return  # nothing serves it
        sock.close()

    def start(self, binary, conf, control_socket, cache_dir, gid=0,
              log_file=None, wait=10.0):
        """Start the server unless one answers; return its PID.

        It runs in a session of its own, so that it outlives the daemon
        (its volumes stay attached across the daemon's restarts).
        """
        try:
            return self.ping()
        except NativeError:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(self.socket_path)),
                    exist_ok=True)
        cmd = [find_binary(binary), '--layers', conf.layers_dir,
               '--cache', cache_dir, '--control', control_socket,
               '--listen', self.socket_path, '--pid-file', self.pid_file,
               '--fetch-wait', str(conf.native_fetch_wait),
               '--gid', str(gid)]
        if conf.allow_other:
            cmd.append('--allow-other')
        cmd.append(conf.mount_dir)
        os.makedirs(conf.mount_dir, mode=0o755, exist_ok=True)
        out = open(log_file or os.devnull, 'ab')
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=out,
                                       start_new_session=True,
                                       close_fds=True)
        finally:
            out.close()
        deadline = time.monotonic() + wait
        while True:
            if process.poll() is not None:
                raise NativeError('Start', '%s exited with status %s (see %s)'
                                  % (cmd[0], process.returncode,
                                     log_file or 'its stderr'))
            if os.path.ismount(conf.mount_dir):
                try:
                    pid = self.ping()
                    LOG.info('Started thunder-volume-server (PID %d) at %s',
                             pid, conf.mount_dir)
                    return pid
                except NativeError:
                    pass
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise NativeError('Start', '%s did not mount %s within %s s'
                                  % (cmd[0], conf.mount_dir, wait))
            time.sleep(0.02)


def busy(error):
    """True if a NativeError says the volume is open."""
    return getattr(error, 'code', None) in ('EBUSY', errno.EBUSY)
