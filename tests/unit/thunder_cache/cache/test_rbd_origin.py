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

"""The RBD origin's bounds: every Ceph operation has a timeout."""

import threading
import time
import types

import pytest

from thunder_cache.peer import sources


class FakeCeph:
    """rados and rbd modules whose connect may be slow and fail."""

    def __init__(self, connect_delay=0.0, connect_error=None):
        self.connect_delay = connect_delay
        self.connect_error = connect_error
        self.clients = []
        self.connects = 0
        self.lock = threading.Lock()
        ceph = self

        class Rados:
            def __init__(self, conffile=None, rados_id=None,
                         clustername=None, conf=None):
                self.conf = conf
                ceph.clients.append(self)

            def connect(self, timeout=0):
                with ceph.lock:
                    ceph.connects += 1
                time.sleep(ceph.connect_delay)
                if ceph.connect_error is not None:
                    raise ceph.connect_error

            def open_ioctx(self, pool):
                return types.SimpleNamespace(close=lambda: None)

            def shutdown(self):
                pass

        class Image:
            def __init__(self, ioctx, name, snapshot=None, read_only=False):
                assert read_only

            def read(self, offset, length):
                return b'\0' * length

            def close(self):
                pass

        self.rados = types.SimpleNamespace(Rados=Rados)
        self.rbd = types.SimpleNamespace(Image=Image)


@pytest.fixture
def fake_ceph(monkeypatch):
    def install(**kwargs):
        ceph = FakeCeph(**kwargs)
        monkeypatch.setattr(sources, 'rados', ceph.rados)
        monkeypatch.setattr(sources, 'rbd', ceph.rbd)
        return ceph
    return install


def test_every_ceph_operation_has_the_timeout(fake_ceph):
    ceph = fake_ceph()
    origin = sources.RbdOrigin('volumes', 'volume-1', 'snap', timeout=7)
    assert origin.read(0, 10) == b'\0' * 10
    assert ceph.clients[0].conf == {'rados_osd_op_timeout': '7',
                                    'rados_mon_op_timeout': '7',
                                    'client_mount_timeout': '7'}
    # Waiters on a fetch from it allow each operation of a fresh open.
    assert origin.time_limit(4 << 20) == sources.RbdOrigin.SERIAL_OPS * 7
    origin.close()


def test_threads_behind_a_failed_open_share_its_error(fake_ceph):
    """Threads queued behind an open that failed do not retry it in turn.

    Each open can take a Ceph timeout; a queue of readers retrying it one
    after the other would wait that long times their number.
    """
    ceph = fake_ceph(connect_delay=0.5,
                     connect_error=OSError('timed out connecting'))
    origin = sources.RbdOrigin('volumes', 'volume-1', timeout=1)
    errors = []
    barrier = threading.Barrier(4)

    def reader():
        barrier.wait()
        try:
            origin.read(0, 10)
        except sources.OriginError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 4
    assert all('timed out connecting' in e for e in errors)
    assert ceph.connects == 1
    # A read asked after the failure tries again.
    ceph.connect_error = None
    ceph.connect_delay = 0
    assert origin.read(0, 3) == b'\0' * 3
    assert ceph.connects == 2
    origin.close()
