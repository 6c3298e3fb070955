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

"""Fixtures for the store's unit tests: a fake Cinder and in-memory RBD.

The store's ``RbdVolume`` is replaced by
:class:`tests.store_helpers.MemoryRbdVolume`; the clock of the volume waits
is virtual, so timeouts take no time.
"""

from unittest import mock

import pytest

from glance_thunder_store import volumes as volumes_mod
from tests import fake_cinder
from tests import store_helpers as helpers


@pytest.fixture
def clock():
    vclock = helpers.VirtualClock()
    with mock.patch.object(volumes_mod, 'time', vclock):
        yield vclock


@pytest.fixture
def memory():
    backend = helpers.MemoryBackend(gib=4 * helpers.MiB)
    helpers.MemoryRbdVolume.backend = backend
    with mock.patch.object(volumes_mod.rbd_volume, 'RbdVolume',
                           helpers.MemoryRbdVolume), \
            mock.patch.object(volumes_mod.units, 'Gi', backend.gib):
        yield backend
    helpers.MemoryRbdVolume.write_hook = None
    assert all(i.open == 0 for i in backend.images.values()), \
        'test left an image-volume open'


@pytest.fixture
def cinder(memory, clock):
    """The fake Cinder; checks that no connection is left open."""
    fake = fake_cinder.FakeCinder(memory)
    yield fake
    assert fake.connections() == 0, 'test left a connection open'


def _use(store, cinder):
    store.clients.client = lambda context=None: cinder
    return store


@pytest.fixture
def store(cinder):
    """A single-store thunder Store talking to the fake Cinder."""
    return _use(helpers.make_store(thunder_store_manifest_chunk_size=64),
                cinder)


@pytest.fixture
def multi_store(cinder):
    """A multi-store thunder Store, backend ``fast``."""
    store = helpers.make_store('fast', thunder_store_manifest_chunk_size=64)
    return _use(store, cinder)
