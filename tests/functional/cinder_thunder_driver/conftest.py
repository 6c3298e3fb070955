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

"""Fixtures for the driver's functional tests (see also the parent's)."""

import pytest

from cinder_thunder_driver import peer
from tests.functional.cinder_thunder_driver import peer_helpers
from tests.harness import standalone


@pytest.fixture
def driver(node):
    """A PeerDriver in this process on the ``node`` daemon of the test."""
    drv = standalone.make_driver(
        peer_helpers.BACKEND, driver_class=peer.PeerDriver,
        thunder_cache_control_socket=node.paths['control'],
        thunder_rbd_pool='volumes')
    yield drv
    standalone.clear_configuration(peer_helpers.BACKEND)
