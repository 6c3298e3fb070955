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

"""Which loop devices sit on which files: the output of ``losetup --list``.

Run :data:`LIST_COMMAND` however the caller runs commands (privsep in the
driver, a plain subprocess in the local stack and the tests) and hand its
output to :func:`backed_by`.
"""

import os
import re
from typing import List, Optional

LIST_COMMAND = ('losetup', '--list', '--noheadings', '--raw', '--output',
                'NAME,BACK-FILE')
DEVICE = re.compile(r'^/dev/loop[0-9]{1,6}\Z')


def backed_by(output: Optional[str], path: Optional[str] = None,
              under: Optional[str] = None) -> List[str]:
    """Loop devices of ``output`` on file ``path`` or in directory ``under``.

    :param output: what :data:`LIST_COMMAND` printed.
    :returns: the device paths, sorted.
    """
    prefix = None if under is None else under.rstrip(os.sep) + os.sep
    devices = []
    for line in (output or '').splitlines():
        # losetup --raw escapes blanks in paths as \x20; volume files and
        # the directories they live in have none.
        name, _sep, backing = line.strip().partition(' ')
        if not DEVICE.match(name):
            continue
        if (path is not None and backing == path) or (
                prefix is not None and backing.startswith(prefix)):
            devices.append(name)
    return sorted(devices)
