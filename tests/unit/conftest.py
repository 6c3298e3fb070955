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

"""Fixtures for unit tests: a fake Ceph and drivers configured against it.

No test needs the real ``rados``/``rbd`` bindings: every module that
imported them (as None, through ``try_import``) gets the fakes of
:mod:`tests.unit.fakes` for the duration of each test.
"""

from unittest import mock

from cinder.volume import configuration
from cinder.volume import driver as volume_driver
from oslo_config import cfg
import pytest

from cinder_thunder_driver import clones
from cinder_thunder_driver import cluster as cluster_mod
from cinder_thunder_driver import driver
from cinder_thunder_driver import flattener
from cinder_thunder_driver import options
from tests.unit import fakes
from thunder_cache.peer import protocol

BACKEND = 'thunder_unit'


@pytest.fixture(autouse=True)
def fake_ceph():
    """The fake cluster behind the patched ``rados`` and ``rbd`` modules.

    Also checks that every test closes the images and I/O contexts it
    opened.
    """
    ceph = fakes.FakeCeph()
    rados_mod, rbd_mod = fakes.make_modules(ceph)
    with mock.patch.object(cluster_mod, 'rados', rados_mod), \
            mock.patch.object(cluster_mod, 'rbd', rbd_mod), \
            mock.patch.object(clones, 'rbd', rbd_mod), \
            mock.patch.object(flattener, 'rbd', rbd_mod), \
            mock.patch.object(driver, 'rbd', rbd_mod):
        yield ceph
    assert ceph.open_count() == 0, 'test leaked open RBD images'
    assert all(i.closed for i in ceph.open_ioctxs), 'test leaked ioctxs'


@pytest.fixture
def https():
    """Peer URLs are https:// for the test (``[peer] tls_enabled``)."""
    protocol.use_tls(True)
    try:
        yield
    finally:
        protocol.use_tls(False)


@pytest.fixture
def ceph_conf(tmp_path):
    path = tmp_path / 'ceph.conf'
    path.write_text('[global]\nmon_host = 192.0.2.1\n')
    return str(path)


@pytest.fixture
def make_conf(ceph_conf):
    """Build a backend Configuration; overrides are undone afterwards."""

    def build(**overrides):
        conf = configuration.Configuration(volume_driver.volume_opts,
                                           config_group=BACKEND)
        conf.append_config_values(options.thunder_opts)
        overrides.setdefault('thunder_rbd_ceph_conf', ceph_conf)
        overrides.setdefault('volume_backend_name', 'thunder')
        for name, value in overrides.items():
            cfg.CONF.set_override(name, value, group=BACKEND)
        return conf

    yield build
    for opt in options.thunder_opts + list(volume_driver.volume_opts):
        cfg.CONF.clear_override(opt.name, group=BACKEND)


@pytest.fixture
def make_driver(make_conf):
    """Build ThunderDriver instances (without do_setup)."""
    built = []

    def build(**overrides):
        drv = driver.ThunderDriver(configuration=make_conf(**overrides))
        built.append(drv)
        return drv

    yield build
    for drv in built:
        if drv.flattener is not None:
            drv.flattener.stop()


@pytest.fixture
def drv(make_driver):
    """A driver whose flattener is a mock (no background threads)."""
    d = make_driver()
    d.flattener = mock.Mock(spec=flattener.Flattener)
    return d


@pytest.fixture
def cluster(make_conf):
    return cluster_mod.Cluster(make_conf())


# Fixtures of the thunder Glance store's tests.
from tests.unit.store_fixtures import cinder  # noqa: E402,F401,I100,I202
from tests.unit.store_fixtures import clock  # noqa: E402,F401
from tests.unit.store_fixtures import memory  # noqa: E402,F401
from tests.unit.store_fixtures import multi_store  # noqa: E402,F401
from tests.unit.store_fixtures import store  # noqa: E402,F401
