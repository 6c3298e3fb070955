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

"""The stack's view of the native volume server (thunder_stack.cache).

The e2e tests run the real server under the stack.
"""

import os
import subprocess

from tests.unit.thunder_cache.volumes.test_nativevol import FakeServer
from thunder_stack import cache
from thunder_stack import install


def test_served_by_native_needs_the_server(tmp_path):
    paths = {'native': str(tmp_path / 'volume-server.sock'),
             'mount': str(tmp_path / 'volumes')}
    # Nothing listens (the daemon serves the files itself, python).
    pid, why = cache.served_by_native(paths)
    assert pid is None and 'thunder-volume-server at' in why
    # Something answers, but it is not thunder-volume-server holding
    # /dev/fuse (here: this test's own process).
    server = FakeServer(paths['native'], ['OK %d\n' % os.getpid()])
    server.start()
    pid, why = cache.served_by_native(paths)
    server.join(5)
    assert pid is None
    assert why.startswith('PID %d runs python' % os.getpid()), why
    assert why.endswith('/dev/fuse not open')


def test_stop_volume_server_stops_its_holder(tmp_path):
    paths = {'native': str(tmp_path / 'volume-server.sock')}
    cache.stop_volume_server(paths)  # none runs: nothing to do
    holder = subprocess.Popen(['sleep', '60'])
    with open(paths['native'] + '.pid', 'w') as f:
        f.write('%d\n' % holder.pid)
    cache.stop_volume_server(paths)
    assert not os.path.exists('/proc/%d' % holder.pid)
    holder.wait(5)


def test_the_stack_installs_what_builds_the_native_server():
    for package in ('gcc', 'make', 'pkg-config', 'libfuse3-dev',
                    'zlib1g-dev'):
        assert package in install.APT_PACKAGES
