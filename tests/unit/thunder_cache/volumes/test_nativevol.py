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

"""The daemon's side of the native server's socket, against a stand-in."""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from unittest import mock

import pytest

from thunder_cache import daemon
from thunder_cache.volumes import nativevol


class FakeServer(threading.Thread):
    """Answers one connection per entry of ``answers``; records lines."""

    def __init__(self, path, answers):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.answers = list(answers)
        self.lines = []
        self.ack = True

    def run(self):
        for answer in self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break  # shut down: fewer connections than answers
            with conn, conn.makefile('rb') as f:
                self.lines.append(f.readline().decode().strip())
                conn.sendall(answer.encode())
                if answer.startswith('OK') and \
                        self.lines[-1].startswith('HOLD'):
                    # Held until RELEASE or the close; then answered.
                    self.lines.append(f.readline().decode().strip())
                    if self.ack:
                        conn.sendall(b'OK 0\n')
        self.sock.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / 'native.sock')


def test_hold_yields_the_open_count_and_releases(path):
    server = FakeServer(path, ['OK 2\n'])
    server.start()
    with nativevol.NativeServer(path).hold('vol-1') as opens:
        assert opens == 2
    server.join(5)
    assert server.lines == ['HOLD vol-1', 'RELEASE']


def test_hold_whose_server_died_is_ended_with_unhold(path, caplog):
    # The server answers the HOLD, then dies (no answer to RELEASE); the
    # one after it gets UNHOLD.
    server = FakeServer(path, ['OK 1\n', 'OK 0\n'])
    server.ack = False
    server.start()
    with nativevol.NativeServer(path).hold('vol-1') as opens:
        assert opens == 1
    server.join(5)
    assert server.lines == ['HOLD vol-1', 'RELEASE', 'UNHOLD vol-1']
    assert 'did not answer the release of volume vol-1' in caplog.text


def test_forget_busy(path):
    server = FakeServer(path, ['ERR EBUSY volume vol-1 is open 1 times\n'])
    server.start()
    with pytest.raises(nativevol.NativeError) as info:
        nativevol.NativeServer(path).forget('vol-1')
    assert nativevol.busy(info.value)
    server.join(5)
    assert server.lines == ['FORGET vol-1']


def test_ping_and_garbage(path):
    server = FakeServer(path, ['OK 1234\n', 'what\n'])
    server.start()
    native = nativevol.NativeServer(path)
    assert native.ping() == 1234
    with pytest.raises(nativevol.NativeError):
        native.ping()
    server.join(5)


def test_no_server_running_means_no_io(path):
    native = nativevol.NativeServer(path)
    with native.hold('vol-1') as opens:
        assert opens == 0
    native.forget('vol-1')
    with pytest.raises(nativevol.NativeError) as info:
        native.ping()
    assert info.value.code == 'NotRunning'


def test_reverify(path):
    server = FakeServer(path, ['OK 3\n', 'ERR EIO wedged\n'])
    server.start()
    native = nativevol.NativeServer(path)
    assert native.reverify() == 3
    with pytest.raises(nativevol.NativeError) as info:
        native.reverify()
    assert info.value.code == 'EIO'
    server.join(5)
    assert server.lines == ['REVERIFY', 'REVERIFY']


def test_reverify_without_a_server(path):
    # The next server starts knowing no usable chunk.
    assert nativevol.NativeServer(path).reverify() == 0


def test_daemon_start_makes_the_server_reverify(path, caplog):
    caplog.set_level(logging.INFO)
    server = FakeServer(path, ['OK 2\n', 'ERR EIO wedged\n'])
    server.start()
    daemon.Daemon._reverify_native(path)
    assert 'reads the chunks of 2 images again only once' in caplog.text
    # A server that cannot forget its maps: the daemon does not start.
    with pytest.raises(daemon.StartError) as info:
        daemon.Daemon._reverify_native(path)
    assert 'must forget which chunks it may read' in str(info.value)
    server.join(5)


def test_daemon_start_restarts_a_server_older_than_reverify(path, holder,
                                                            caplog):
    server = FakeServer(path, ['ERR EINVAL unknown request\n', 'OK 10\n',
                               'OK 11\n'])
    server.start()
    daemon.Daemon._reverify_native(path)
    server.join(5)
    assert server.lines == ['REVERIFY', 'PING', 'PING']
    assert holder.wait(5) == -signal.SIGHUP
    assert 'does not know REVERIFY' in caplog.text


def test_find_binary(tmp_path):
    with pytest.raises(nativevol.NativeError) as info:
        nativevol.find_binary('no-such-thunder-volume-server')
    # The option, the value, and how to build, install or avoid it.
    assert info.value.code == 'NotFound'
    assert str(info.value).startswith(
        'NotFound: [blockdev] native_server_binary = '
        'no-such-thunder-volume-server is not installed')
    assert 'make -C %s install' % nativevol.SOURCE_DIR in str(info.value)
    assert 'volume_server = python' in str(info.value)
    binary = tmp_path / 'server'
    binary.write_text('#!/bin/sh\n')
    os.chmod(binary, 0o755)
    assert nativevol.find_binary(str(binary)) == str(binary)


@pytest.fixture
def holder(path):
    """A stand-in for the server's holder, named by its pid file."""
    proc = subprocess.Popen(['sleep', '60'])
    with open(path + '.pid', 'w') as f:
        f.write('%d\n' % proc.pid)
    yield proc
    proc.kill()
    proc.wait()


def test_holder_pid(path, holder):
    assert nativevol.NativeServer(path).holder_pid() == holder.pid
    holder.kill()
    holder.wait()
    with pytest.raises(nativevol.NativeError) as info:
        nativevol.NativeServer(path).holder_pid()
    assert info.value.code == 'NotRunning'
    os.unlink(path + '.pid')
    with pytest.raises(nativevol.NativeError) as info:
        nativevol.NativeServer(path).holder_pid()
    assert info.value.code == 'NotRunning'


def test_restart_signals_the_holder_and_waits_for_a_new_server(path,
                                                               holder):
    server = FakeServer(path, ['OK 100\n', 'OK 100\n', 'OK 200\n'])
    server.start()
    assert nativevol.NativeServer(path).restart(wait=5) == 200
    assert holder.wait(5) == -signal.SIGHUP
    server.join(5)
    assert server.lines == ['PING'] * 3


def test_restart_without_a_new_server_is_an_error(path, holder):
    server = FakeServer(path, ['OK 100\n'] * 100)
    server.start()
    with pytest.raises(nativevol.NativeError) as info:
        nativevol.NativeServer(path).restart(wait=0.2)
    assert info.value.code == 'Restart'
    server.sock.shutdown(socket.SHUT_RDWR)
    server.join(5)
    assert not server.is_alive() and len(server.lines) > 2


def test_stop_terminates_the_holder(path, holder):
    assert nativevol.NativeServer(path).stop(wait=5) == holder.pid
    # Gone (stop() reaps a holder that is its own child).
    assert not os.path.exists('/proc/%d' % holder.pid)
    # None runs any more: nothing to stop.
    assert nativevol.NativeServer(path).stop(wait=5) is None


def test_stop_of_a_holder_that_stays_is_an_error(path):
    proc = subprocess.Popen(
        [sys.executable, '-c', 'import signal, time; signal.signal('
         'signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)'],
        stdout=subprocess.PIPE)
    proc.stdout.readline()  # SIGTERM ignored from now on
    with open(path + '.pid', 'w') as f:
        f.write('%d\n' % proc.pid)
    try:
        with pytest.raises(nativevol.NativeError) as info:
            nativevol.NativeServer(path).stop(wait=0.3)
        assert info.value.code == 'Stop'
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_daemon_start_needs_the_binary_unless_a_server_answers(path):
    conf = mock.Mock(native_server_socket=path, mount_dir='/m',
                     native_server_binary='/nonexistent/tvs')
    with pytest.raises(daemon.StartError) as info:
        daemon.Daemon._check_native(conf)
    assert str(info.value).startswith(
        'cannot serve the volume files at /m with the native server: '
        'NotFound: [blockdev] native_server_binary = /nonexistent/tvs is '
        'not installed')
    # A server started otherwise (systemd) answers: no binary needed.
    server = FakeServer(path, ['OK 42\n'])
    server.start()
    daemon.Daemon._check_native(conf)
    server.join(5)
    assert server.lines == ['PING']
