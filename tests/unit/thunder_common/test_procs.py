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

"""thunder_common.procs: running, gone and zombie processes."""

import os
import subprocess
import sys
import time

import pytest

from thunder_common import procs


def _wait_main_thread_ended(pid, timeout=30):
    """Until ``pid``'s main thread shows as a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open('/proc/%d/stat' % pid) as f:
            if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                return
        time.sleep(0.01)
    raise AssertionError('main thread of %d still runs' % pid)


def test_a_running_process_is_alive():
    assert procs.alive(os.getpid())
    child = subprocess.Popen(['sleep', '30'])
    try:
        assert procs.alive(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_zombie_child_is_not_alive_and_is_reaped():
    child = subprocess.Popen(['true'])
    _wait_main_thread_ended(child.pid)
    assert not procs.alive(child.pid)
    # Reaped: no zombie left behind.
    assert not os.path.exists('/proc/%d' % child.pid)
    child.returncode = 0        # so that Popen does not wait for it


def test_a_process_whose_main_thread_ended_is_alive_while_others_run(
        tmp_path):
    """Its main thread is a zombie; another still runs and holds files."""
    release = tmp_path / 'release'
    code = ('import ctypes, os, threading, time\n'
            'def hold():\n'
            '    while not os.path.exists(%r):\n'
            '        time.sleep(0.01)\n'
            'threading.Thread(target=hold).start()\n'
            'ctypes.CDLL(None).pthread_exit(None)\n' % str(release))
    child = subprocess.Popen([sys.executable, '-c', code])
    try:
        _wait_main_thread_ended(child.pid)
        assert 'Z' in procs.thread_states(child.pid)
        assert procs.alive(child.pid)
    finally:
        release.touch()
    assert child.wait(timeout=30) == 0
    assert not procs.alive(child.pid)
    assert procs.thread_states(child.pid) == []


def test_a_process_that_is_gone_is_not_alive():
    child = subprocess.Popen(['true'])
    child.wait()
    assert not procs.alive(child.pid)


def test_open_files_names_what_a_process_holds(tmp_path):
    path = str(tmp_path / 'held')
    with open(path, 'w'):
        assert path in procs.open_files(os.getpid())
    assert path not in procs.open_files(os.getpid())


def test_open_files_of_a_process_that_is_gone_is_an_error():
    child = subprocess.Popen(['true'])
    child.wait()
    with pytest.raises(OSError):
        procs.open_files(child.pid)
