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

"""thunder_stack.services: stopping a process group, a port still taken.

With real processes: a service is restarted only once its old process
has let go of its port, and a start beside a process that keeps the port
fails naming it.
"""

import socket
import subprocess
import sys
import time
from unittest import mock

import pytest

from thunder_stack import services as svc

# Listens on the port given, ignores SIGTERM, and ends its main thread
# while another thread keeps the socket: the process's leader shows as a
# zombie, and the port is still taken until SIGKILL.
LINGERING_SERVER = '''
import ctypes, signal, socket, sys, threading, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(('127.0.0.1', int(sys.argv[1])))
sock.listen()
threading.Thread(target=time.sleep, args=(600,)).start()
ctypes.CDLL(None).pthread_exit(None)
'''


def _service(tmp_path, port, code=LINGERING_SERVER):
    return svc.Service('lingering', [sys.executable, '-c', code, str(port)],
                       str(tmp_path), port=port, marker=str(port))


def _wait(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.05)


def test_stop_waits_until_every_thread_of_the_group_ended(tmp_path):
    port = svc.free_port()
    service = _service(tmp_path, port)
    pid = service.start()
    try:
        _wait(lambda: not svc.port_free(port))
        _wait(lambda: open('/proc/%d/stat' % pid).read().rsplit(
            ')', 1)[1].split()[0] == 'Z')
        assert svc.listeners(port) == [pid]
        service.stop(timeout=1)
        # Not back before the socket is gone: a new server can listen.
        assert svc.port_free(port)
        assert service.pid() is None
    finally:
        svc.terminate(pid, 1)


def test_start_waits_for_a_port_being_released(tmp_path):
    port = svc.free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(('127.0.0.1', port))
    holder.listen()
    timer = __import__('threading').Timer(1.0, holder.close)
    timer.start()
    service = _service(tmp_path, port)
    try:
        started = time.monotonic()
        service.start()
        assert time.monotonic() - started >= 0.9
        _wait(lambda: not svc.port_free(port))
    finally:
        timer.join()
        service.stop(timeout=1)


def test_start_beside_a_process_keeping_the_port_names_it(tmp_path,
                                                          monkeypatch):
    port = svc.free_port()
    other = subprocess.Popen([sys.executable, '-c', LINGERING_SERVER,
                              str(port)], start_new_session=True)
    try:
        _wait(lambda: not svc.port_free(port))
        monkeypatch.setattr(svc, 'PORT_WAIT', 0.5)
        service = _service(tmp_path, port, code='import time; '
                           'time.sleep(600)')
        with pytest.raises(svc.ServiceError) as err:
            service.start()
        message = str(err.value)
        assert 'port %d is still taken' % port in message
        assert '%d (' % other.pid in message
        assert service.pid() is None
    finally:
        svc.terminate(other.pid, 1)
        other.wait()


def test_stop_says_so_when_processes_survive_sigkill(tmp_path):
    port = svc.free_port()
    service = _service(tmp_path, port)
    pid = service.start()
    try:
        with mock.patch.object(svc, 'terminate', return_value=False):
            with pytest.raises(svc.ServiceError) as err:
                service.stop()
        assert 'still run after SIGKILL' in str(err.value)
        assert str(pid) in str(err.value)
    finally:
        svc.terminate(pid, 1)


def test_free_ports_are_below_the_ephemeral_range():
    """Where no outgoing connection takes them before their server."""
    with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
        low = int(f.read().split()[0])
    ports = {svc.free_port() for _ in range(20)}
    if low - svc.FREE_PORTS_FROM >= 1000:
        assert all(svc.FREE_PORTS_FROM <= p < low for p in ports)
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', svc.free_port()))
        port = taken.getsockname()[1]
        assert svc.free_port(preferred=port) != port
    assert svc.free_port(preferred=port) == port
