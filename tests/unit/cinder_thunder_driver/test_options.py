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

"""The driver's configuration options."""

import configparser
import os

from cinder.volume import driver as volume_driver
from cinder.volume.drivers import rbd as cinder_rbd
from oslo_config import cfg
import pytest

from cinder_thunder_driver import driver
from cinder_thunder_driver import options

EXPECTED = {
    'thunder_rbd_pool', 'thunder_rbd_ceph_conf', 'thunder_rbd_cluster_name',
    'thunder_rbd_user', 'thunder_rbd_keyring_conf', 'thunder_rbd_secret_uuid',
    'thunder_rados_connect_timeout', 'thunder_max_clone_depth',
    'thunder_flatten_workers', 'thunder_deferred_purge_interval',
    'thunder_mode', 'thunder_cache_control_socket', 'thunder_cache_timeout',
    'thunder_loop_direct_io',
}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def _listed():
    return [opt for _group, opts in options.list_opts() for opt in opts]


def test_list_opts_returns_every_option():
    groups = [group for group, _opts in options.list_opts()]
    assert groups == ['backend_defaults']
    names = [opt.name for opt in _listed()]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED
    assert set(names) == {opt.name for opt in options.thunder_opts}


@pytest.mark.parametrize('opt', options.thunder_opts, ids=lambda o: o.name)
def test_option_is_documented(opt):
    assert opt.name.startswith('thunder_')
    assert opt.help and len(opt.help.split()) >= 5
    assert opt.help.rstrip().endswith('.')


def test_defaults_are_sane():
    defaults = {opt.name: opt.default for opt in options.thunder_opts}
    assert defaults['thunder_rbd_pool'] == 'volumes'
    assert defaults['thunder_rbd_ceph_conf'] == '/etc/ceph/ceph.conf'
    assert defaults['thunder_rbd_cluster_name'] == 'ceph'
    # Unset: cephx user, keyring and libvirt secret are deployment facts.
    for name in ('thunder_rbd_user', 'thunder_rbd_keyring_conf',
                 'thunder_rbd_secret_uuid'):
        assert defaults[name] is None
    assert 1 <= defaults['thunder_rados_connect_timeout'] <= 60
    assert 2 <= defaults['thunder_max_clone_depth'] <= 16
    assert 1 <= defaults['thunder_flatten_workers'] <= 8
    assert 60 <= defaults['thunder_deferred_purge_interval'] <= 3600


@pytest.mark.parametrize('name, too_small', [
    ('thunder_rados_connect_timeout', 0),
    ('thunder_max_clone_depth', 0),
    ('thunder_flatten_workers', 0),
    ('thunder_deferred_purge_interval', 9),
])
def test_minimums_are_enforced(make_conf, name, too_small):
    make_conf()
    with pytest.raises(ValueError):
        cfg.CONF.set_override(name, too_small, group='thunder_unit')


def test_options_are_registered_under_backend_defaults():
    for opt in options.thunder_opts:
        assert (getattr(cfg.CONF.backend_defaults, opt.name) ==
                opt.default)


def test_backend_section_overrides_backend_defaults(make_conf):
    conf = make_conf(thunder_rbd_pool='fast')
    assert conf.thunder_rbd_pool == 'fast'
    assert conf.thunder_max_clone_depth == 4


def test_driver_declares_its_options():
    assert driver.ThunderDriver.get_driver_options() is options.thunder_opts


def test_no_clash_with_cinder_options():
    """The driver runs next to Cinder's RBD driver in one cinder-volume."""
    ours = {opt.name for opt in options.thunder_opts}
    theirs = {opt.name for opt in cinder_rbd.RBD_OPTS}
    theirs |= {opt.name for opt in volume_driver.volume_opts}
    assert not ours & theirs


def test_config_generator_entry_point():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, 'setup.cfg'))
    entry = parser['entry_points']['oslo.config.opts']
    assert ('cinder_thunder_driver = cinder_thunder_driver.options:list_opts'
            in [line.strip() for line in entry.splitlines()])
