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

"""Fixtures for functional tests: a real Ceph cluster and a real driver.

The session starts one single-node Ceph (thunder_stack.ceph.LocalCeph) in a
temporary directory and stops it at the end. Set THUNDER_TEST_CEPH_CONF to
the ceph.conf of a running cluster to use that one instead (its
``volumes`` pool must exist).
"""

import os
import shutil
import tempfile

from oslo_config import cfg
import pytest

from tests.harness import standalone

BACKEND = 'thunder_functional'


@pytest.fixture(scope='session', autouse=True)
def privsep_helper():
    standalone.use_local_privsep_helper()
    yield
    cfg.CONF.clear_override('helper_command', group='cinder_sys_admin')


@pytest.fixture(scope='session')
def ceph():
    """The ceph.conf path of a running Ceph."""
    existing = os.environ.get('THUNDER_TEST_CEPH_CONF')
    if existing:
        yield existing
        return
    if not shutil.which('ceph-mon'):
        pytest.fail('ceph-mon is not installed: run tools/run-tests, which '
                    'installs Ceph from Debian packages.')
    from thunder_stack import ceph as local_ceph
    workdir = tempfile.mkdtemp(prefix='thunder-ceph-')
    cluster = local_ceph.LocalCeph(workdir, pools=('volumes', 'images'),
                                   port=0)
    try:
        cluster.start()
        yield cluster.conf_path
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def make_driver(ceph):
    """Build set-up ThunderDriver instances; all are shut down after."""
    built = []

    def build(**overrides):
        overrides.setdefault('thunder_rbd_ceph_conf', ceph)
        overrides.setdefault('thunder_rbd_pool', 'volumes')
        overrides.setdefault('thunder_rados_connect_timeout', 5)
        drv = standalone.make_driver(BACKEND, **overrides)
        built.append(drv)
        return drv

    yield build
    for drv in built:
        drv.stop_background_work(timeout=120)
    standalone.clear_configuration(BACKEND)


@pytest.fixture
def thunder(make_driver):
    """A driver on the test pool; fails the test if it leaks RBD images."""
    drv = make_driver()
    before = set(_all_images(drv))
    yield drv
    drv.flattener.wait_idle(timeout=120)
    from cinder_thunder_driver import clones
    clones.purge_deferred(drv.cluster)
    leaked = set(_all_images(drv)) - before
    assert not leaked, 'test leaked RBD images: %s' % sorted(leaked)


def _all_images(drv):
    with drv.cluster.ioctx() as ioctx:
        names = list(drv.cluster.rbd().list(ioctx))
        trashed = ['trash:' + t['name']
                   for t in drv.cluster.rbd().trash_list(ioctx)]
    return names + trashed
