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

"""Background flattening: dedup, bounded concurrency, release."""

import threading
import time
from unittest import mock

import pytest

from cinder_thunder_driver import flattener
from tests.unit.cinder_thunder_driver import fakes
from thunder_common import rbd_layout

SNAP = 'thunder-clone-0000000000000001'


@pytest.fixture
def make_flattener(cluster):
    built = []

    def build(workers=2):
        f = flattener.Flattener(cluster, workers)
        built.append(f)
        return f

    yield build
    for f in built:
        f.stop()
        for worker in f._workers:
            worker.join(5)
            assert not worker.is_alive()


def _clone(ceph, name='child', parent_name='parent'):
    parent = ceph.find(parent_name) or ceph.add_image(parent_name)
    if SNAP not in parent.snaps:
        ceph.add_snap(parent, SNAP)
    return parent, ceph.add_clone(parent, SNAP, name)


# -- flatten_now --------------------------------------------------------------

def test_flatten_now_flattens_and_releases_the_parent(cluster, fake_ceph,
                                                      make_flattener):
    parent, child = _clone(fake_ceph)
    make_flattener(1).flatten_now('volumes', 'child')
    assert child.parent is None and child.flattened
    assert parent.snaps == {}  # its only clone no longer needs it


def test_flatten_now_removes_a_deferred_parent(cluster, fake_ceph,
                                               make_flattener):
    parent, child = _clone(fake_ceph)
    parent.metadata[rbd_layout.META_DEFERRED] = '1'
    parent.trashed = True
    make_flattener(1).flatten_now('volumes', 'child')
    assert fake_ceph.trash() == [] and fake_ceph.names() == ['child']


def test_flatten_now_keeps_a_sealed_snapshot(cluster, fake_ceph,
                                             make_flattener):
    parent, child = _clone(fake_ceph)
    parent.metadata[rbd_layout.META_SEALED_SNAP] = SNAP
    make_flattener(1).flatten_now('volumes', 'child')
    assert child.parent is None
    assert list(parent.snaps) == [SNAP]


def test_flatten_now_of_a_non_clone(cluster, fake_ceph, make_flattener):
    state = fake_ceph.add_image('plain')
    with mock.patch.object(flattener.clones, 'release_parent') as release:
        make_flattener(1).flatten_now('volumes', 'plain')
    assert not state.flattened
    release.assert_not_called()


def test_flatten_now_of_a_deleted_image(cluster, fake_ceph, make_flattener):
    with mock.patch.object(flattener.clones, 'release_parent') as release:
        make_flattener(1).flatten_now('volumes', 'gone')
    release.assert_not_called()


def test_flatten_now_image_deleted_while_flattening(cluster, fake_ceph,
                                                    make_flattener):
    parent, child = _clone(fake_ceph)
    fake_ceph.errors[('flatten', 'child')] = fakes.rbd.ImageNotFound('gone')
    with mock.patch.object(flattener.clones, 'release_parent') as release:
        make_flattener(1).flatten_now('volumes', 'child')
    release.assert_not_called()
    assert list(parent.snaps) == [SNAP]


def test_flatten_now_other_errors_propagate(cluster, fake_ceph,
                                            make_flattener):
    _clone(fake_ceph)
    fake_ceph.errors[('flatten', 'child')] = fakes.rbd.IOError('eio')
    with pytest.raises(fakes.rbd.IOError):
        make_flattener(1).flatten_now('volumes', 'child')


# -- the queue ----------------------------------------------------------------

class Gate:
    """Replaces flatten_now: blocks each call until opened, counts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.calls = []
        self.open = threading.Event()

    def __call__(self, pool, name):
        with self.lock:
            self.calls.append((pool, name))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.open.wait(10)
            if name.startswith('fail'):
                raise RuntimeError('flatten failed')
        finally:
            with self.lock:
                self.running -= 1


def _wait_for(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.01)


def test_flatten_later_is_deduplicated(make_flattener):
    f = make_flattener(2)
    gate = Gate()
    with mock.patch.object(f, 'flatten_now', gate):
        for _ in range(5):
            f.flatten_later('volumes', 'a')
        f.flatten_later('volumes', 'b')
        f.flatten_later('images', 'a')  # another pool: another image
        assert f.pending() == 3
        gate.open.set()
        assert f.wait_idle(5)
    assert sorted(gate.calls) == [('images', 'a'), ('volumes', 'a'),
                                  ('volumes', 'b')]
    assert f.pending() == 0


def test_concurrency_is_bounded(make_flattener):
    f = make_flattener(3)
    gate = Gate()
    with mock.patch.object(f, 'flatten_now', gate):
        for i in range(10):
            f.flatten_later('volumes', 'v%d' % i)
        _wait_for(lambda: gate.running == 3)
        time.sleep(0.1)  # give a fourth worker (if any) the chance to start
        assert gate.running == 3
        assert f.pending() == 10
        gate.open.set()
        assert f.wait_idle(5)
    assert gate.max_running == 3
    assert len(gate.calls) == 10


def test_a_failed_flatten_does_not_stop_the_worker(make_flattener):
    f = make_flattener(1)
    gate = Gate()
    gate.open.set()
    with mock.patch.object(f, 'flatten_now', gate), \
            mock.patch.object(flattener.LOG, 'exception') as log:
        f.flatten_later('volumes', 'fail-1')
        f.flatten_later('volumes', 'ok-1')
        assert f.wait_idle(5)
    assert [c[1] for c in gate.calls] == ['fail-1', 'ok-1']
    log.assert_called_once()
    assert 'fail-1' in log.call_args.args


def test_requeue_after_completion(make_flattener):
    f = make_flattener(1)
    gate = Gate()
    gate.open.set()
    with mock.patch.object(f, 'flatten_now', gate):
        f.flatten_later('volumes', 'a')
        assert f.wait_idle(5)
        f.flatten_later('volumes', 'a')
        assert f.wait_idle(5)
    assert len(gate.calls) == 2


def test_wait_idle_times_out(make_flattener):
    f = make_flattener(1)
    gate = Gate()
    with mock.patch.object(f, 'flatten_now', gate):
        f.flatten_later('volumes', 'slow')
        assert f.wait_idle(0.05) is False
        gate.open.set()
        assert f.wait_idle(5) is True


def test_stop_ends_the_workers(make_flattener):
    f = make_flattener(3)
    assert all(w.is_alive() and w.daemon for w in f._workers)
    assert sorted(w.name for w in f._workers) == [
        'thunder-flatten-0', 'thunder-flatten-1', 'thunder-flatten-2']
    f.stop()
    for w in f._workers:
        w.join(5)
        assert not w.is_alive()


def test_background_flatten_end_to_end(cluster, fake_ceph, make_flattener):
    parent, child = _clone(fake_ceph)
    f = make_flattener(2)
    f.flatten_later('volumes', 'child')
    assert f.wait_idle(5)
    assert child.parent is None and parent.snaps == {}
