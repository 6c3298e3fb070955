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


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is not a zombie.

    A zombie that is our own child is reaped on the way.
    """
    try:
        with open('/proc/%d/stat' % pid) as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return False
    if state != 'Z':
        return True
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return False


def open_files(pid: int) -> typing.Set[str]:
    """What process ``pid`` has open: its descriptors' targets.

    As the kernel names them (``/dev/fuse``, absolute paths, ``pipe:[N]``);
    OSError if the process is gone or not ours to inspect.
    """
    path = '/proc/%d/fd' % pid
    files = set()
    for fd in os.listdir(path):
        with contextlib.suppress(OSError):  # closed meanwhile
            files.add(os.readlink(os.path.join(path, fd)))
    return files
