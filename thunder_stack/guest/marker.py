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

"""The line the guest prints on its serial console once userspace is up."""

import re

#: The first word of the line the guest prints once userspace is up.
MARKER = 'THUNDER-GUEST-READY'
#: The first word of the line a failed boot prints (then stays up).
FAILURE_MARKER = 'THUNDER-GUEST-FAILED'

_MARKER_RE = re.compile(r'%s(?=\s|$)((?: +[A-Za-z_]+=\S*)*)' % MARKER)
_FAILURE_RE = re.compile(r'%s +(.*)' % FAILURE_MARKER)


def parse_marker(console_text):
    """The fields of the last marker line in a console log, or None.

    ``{'uuid': ..., 'root': '/dev/vda1', ...}``; tolerant of ``\\r`` and
    of text before the marker on its line.
    """
    found = None
    for line in console_text.replace('\r', '\n').split('\n'):
        match = _MARKER_RE.search(line)
        if match:
            found = dict(field.split('=', 1)
                         for field in match.group(1).split())
    return found


def marker_seen(console_text):
    """True once the guest has printed its marker line."""
    return parse_marker(console_text) is not None


def failure_seen(console_text):
    """Why the guest's boot failed, if it said so; else None."""
    for line in console_text.replace('\r', '\n').split('\n'):
        match = _FAILURE_RE.search(line)
        if match:
            return match.group(1).strip()
    return None
