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

"""Processes by PID: whether one still runs, what it has open."""

import contextlib
import os
import typing


def thread_states(pid: int) -> typing.List[str]:
    """The states (``R``, ``S``, ``D``, ``Z``...) of ``pid``'s threads.

    Empty if the process is gone.
    """
    try:
        tids = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return []
    states = []
    for tid in tids:
        with contextlib.suppress(OSError, IndexError):  # ended meanwhile
            with open('/proc/%d/task/%s/stat' % (pid, tid)) as f:
                states.append(f.read().rsplit(')', 1)[1].split()[0])
    return states


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: one of its threads is not a zombie.

    A process whose main thread has ended shows as a zombie while its other
    threads still run and hold its files and sockets (a process being torn
    down, its threads not yet scheduled): that one is alive. A zombie that
    is our own child is reaped on the way.
    """
    states = thread_states(pid)
    if any(state not in ('Z', 'X') for state in states):
        return True
    if states:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return False


def command_line(pid: int) -> str:
    """Process ``pid``'s command line, arguments joined by spaces.

    Empty if the process is gone. A process whose main thread has ended
    shows an empty one there; it is read through a thread that still runs.
    """
    paths = ['/proc/%d/cmdline' % pid]
    with contextlib.suppress(OSError):
        paths += ['/proc/%d/task/%s/cmdline' % (pid, tid)
                  for tid in os.listdir('/proc/%d/task' % pid)]
    for path in paths:
        with contextlib.suppress(OSError):  # ended meanwhile
            with open(path, 'rb') as f:
                raw = f.read()
            if raw:
                return raw.replace(b'\0', b' ').decode(
                    errors='replace').strip()
    return ''


def open_files(pid: int) -> typing.Set[str]:
    """What process ``pid`` has open: its descriptors' targets.

    As the kernel names them (``/dev/fuse``, absolute paths, ``pipe:[N]``);
    OSError if the process is gone or not ours to inspect. A process whose
    main thread has ended lists nothing there: its files are read through
    a thread that still runs.
    """
    files = _fd_targets('/proc/%d/fd' % pid)
    if not files:
        for tid in os.listdir('/proc/%d/task' % pid):
            with contextlib.suppress(OSError):  # ended meanwhile
                files = _fd_targets('/proc/%d/task/%s/fd' % (pid, tid))
            if files:
                break
    return files


def _fd_targets(path: str) -> typing.Set[str]:
    files = set()
    for fd in os.listdir(path):
        with contextlib.suppress(OSError):  # closed meanwhile
            files.add(os.readlink(os.path.join(path, fd)))
    return files
