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

"""Tests for thunder_cache.cache.origins: only allowed origins are named."""

import os
import stat
import threading
from unittest import mock
import uuid

from oslo_config import cfg
import pytest

from thunder_cache.cache import node as node_mod
from thunder_cache.cache import origins
from thunder_cache import errors
from thunder_cache import options
from thunder_cache.peer import sources

VOLUME_ID = str(uuid.uuid4())


class FakeRbdOrigin(sources.Origin):
    """Records how the policy builds an RBD origin."""

    made = []

    def __init__(self, pool, image, snapshot=None, **kwargs):
        self.pool, self.image, self.snapshot = pool, image, snapshot
        self.kwargs = kwargs
        self.name = 'rbd:%s/%s' % (pool, image)
        FakeRbdOrigin.made.append(self)


@pytest.fixture(autouse=True)
def fake_rbd(monkeypatch):
    FakeRbdOrigin.made = []
    monkeypatch.setattr(origins.sources, 'RbdOrigin', FakeRbdOrigin)


RBD_OPTIONS = {'ceph_conf': '/etc/ceph/ours.conf', 'user': 'thunder',
               'keyring': '/etc/ceph/ours.keyring', 'cluster_name': 'ceph',
               'timeout': 3}


@pytest.fixture
def allowed(tmp_path):
    d = tmp_path / 'allowed'
    d.mkdir()
    return d


@pytest.fixture
def policy(allowed):
    return origins.OriginPolicy(['volumes', 'images2'], 'volume-%s',
                                [str(allowed)], RBD_OPTIONS)


def _refused(policy, entry, volume_id=VOLUME_ID):
    with pytest.raises(node_mod.BadDescriptor) as info:
        policy(entry, origin_volume_id=volume_id)
    assert isinstance(info.value, errors.BadRequest)
    assert isinstance(info.value, node_mod.DescriptorError)
    return str(info.value)


# -- rbd --------------------------------------------------------------------

def test_rbd_origin_uses_the_daemons_identity(policy):
    origin = policy({'type': 'rbd'}, origin_volume_id=VOLUME_ID)
    assert (origin.pool, origin.image, origin.snapshot) == (
        'volumes', 'volume-' + VOLUME_ID, None)
    assert origin.kwargs == RBD_OPTIONS
    same = policy({'type': 'rbd', 'pool': 'images2',
                   'image': 'volume-' + VOLUME_ID, 'snapshot': 'sealed'},
                  origin_volume_id=VOLUME_ID)
    assert (same.pool, same.snapshot) == ('images2', 'sealed')
    assert same.kwargs == RBD_OPTIONS


@pytest.mark.parametrize('key', ['ceph_conf', 'keyring', 'user', 'conf',
                                 'cluster_name', 'rados_id', 'mon_host'])
def test_rbd_origin_naming_a_ceph_identity_is_refused(policy, key):
    message = _refused(policy, {'type': 'rbd', 'pool': 'volumes',
                                key: '/tmp/attacker'})
    assert key in message
    assert 'own [origin]' in message
    assert not FakeRbdOrigin.made


@pytest.mark.parametrize('entry', [
    {'type': 'rbd', 'path': '/etc/shadow'},
    {'type': 'rbd', 'extra': 1},
    {'type': 'rbd', 'pool': 'volumes', 'options': {'a': 'b'}},
])
def test_rbd_origin_unknown_keys_refused(policy, entry):
    assert 'unknown keys' in _refused(policy, entry)


@pytest.mark.parametrize('entry, volume_id, message', [
    ({'type': 'rbd', 'pool': 'other'}, VOLUME_ID, 'rbd_pools'),
    ({'type': 'rbd', 'pool': ''}, VOLUME_ID, 'rbd_pools'),
    ({'type': 'rbd', 'pool': 5}, VOLUME_ID, 'string'),
    ({'type': 'rbd', 'pool': ['volumes']}, VOLUME_ID, 'string'),
    ({'type': 'rbd'}, None, 'origin_volume_id'),
    ({'type': 'rbd', 'image': 'volume-other'}, VOLUME_ID,
     'rbd_volume_name_template'),
    ({'type': 'rbd', 'image': 'secret-image'}, VOLUME_ID,
     'rbd_volume_name_template'),
    ({'type': 'rbd', 'image': 7}, VOLUME_ID, 'string'),
    ({'type': 'rbd', 'snapshot': '../x'}, VOLUME_ID, 'snapshot'),
    ({'type': 'rbd', 'snapshot': 'a' * 129}, VOLUME_ID, 'snapshot'),
    ({'type': 'nfs'}, VOLUME_ID, 'unknown origin type'),
    ({'type': ['rbd']}, VOLUME_ID, 'unknown origin type'),
    ({}, VOLUME_ID, 'unknown origin type'),
])
def test_rbd_origin_refused(policy, entry, volume_id, message):
    assert message in _refused(policy, entry, volume_id)
    assert not FakeRbdOrigin.made


def test_no_rbd_pools_refuses_rbd(allowed):
    policy = origins.OriginPolicy([], 'volume-%s', [str(allowed)])
    assert 'rbd_pools is empty' in _refused(policy, {'type': 'rbd'})


@pytest.mark.parametrize('template', ['volume-%s', '%s', 'vol_%s.img'])
def test_good_templates(template):
    assert origins.check_template(template) == template


@pytest.mark.parametrize('template', ['volume', 'volume-%s-%s', '%d',
                                      '../%s', 'v/%s', '%(id)s', '', None,
                                      'x%%s'])
def test_bad_templates(template):
    with pytest.raises(ValueError, match='rbd_volume_name_template'):
        origins.check_template(template)


# -- files ------------------------------------------------------------------

def _write(path, data=b'image-volume bytes'):
    path.write_bytes(data)
    return str(path)


def test_file_origin_under_an_allowed_dir(policy, allowed):
    (allowed / 'sub').mkdir()
    path = _write(allowed / 'sub' / 'volume')
    origin = policy({'type': 'file', 'path': path})
    assert isinstance(origin, origins.ConfinedFileOrigin)
    assert bytes(origin.read(0, 5)) == b'image'
    assert origin.name == 'file:' + path


def test_file_origins_refused_by_default(tmp_path):
    path = _write(tmp_path / 'volume')
    policy = origins.OriginPolicy(['volumes'])
    assert 'file_origin_dirs is empty' in _refused(
        policy, {'type': 'file', 'path': path})


@pytest.mark.parametrize('suffix', [
    '/../secret', '/./volume', '//volume', '/sub/../../secret',
    '/volume/', '-sibling/volume', ''])
def test_file_origin_escapes_refused(policy, allowed, tmp_path, suffix):
    _write(tmp_path / 'secret')
    (tmp_path / 'allowed-sibling').mkdir()
    _write(tmp_path / 'allowed-sibling' / 'volume')
    _refused(policy, {'type': 'file', 'path': str(allowed) + suffix})


@pytest.mark.parametrize('path', [
    'relative/volume', '/etc/shadow', '/', 5, None, '', ['/x'],
    '/allowed\0/x', 'x' * 5000])
def test_file_origin_bad_paths_refused(policy, path):
    _refused(policy, {'type': 'file', 'path': path})


@pytest.mark.parametrize('key', ['offset', 'ceph_conf', 'root'])
def test_file_origin_unknown_keys_refused(policy, allowed, key):
    path = _write(allowed / 'volume')
    _refused(policy, {'type': 'file', 'path': path, key: '/'})


def _open_error(origin):
    with pytest.raises(sources.OriginError) as info:
        origin.read(0, 16)
    return str(info.value)


def test_symlink_last_component_never_followed(policy, allowed, tmp_path):
    secret = _write(tmp_path / 'secret', b'the secret')
    os.symlink(secret, str(allowed / 'volume'))
    origin = policy({'type': 'file', 'path': str(allowed / 'volume')})
    assert 'not a regular file' in _open_error(origin)


def test_symlink_directory_never_followed(policy, allowed, tmp_path):
    (tmp_path / 'elsewhere').mkdir()
    _write(tmp_path / 'elsewhere' / 'volume', b'the secret')
    os.symlink(str(tmp_path / 'elsewhere'), str(allowed / 'link'))
    origin = policy({'type': 'file',
                     'path': str(allowed / 'link' / 'volume')})
    _open_error(origin)


def test_symlink_swapped_in_after_registration(policy, allowed, tmp_path):
    """The check is made at every open, not once."""
    path = _write(allowed / 'volume')
    origin = policy({'type': 'file', 'path': path})
    assert bytes(origin.read(0, 5)) == b'image'
    os.unlink(path)
    os.symlink(_write(tmp_path / 'secret', b'the secret'), path)
    assert 'not a regular file' in _open_error(origin)


def test_fifo_is_never_opened(policy, allowed):
    """Opening a FIFO would block the daemon until a writer comes."""
    path = str(allowed / 'fifo')
    os.mkfifo(path)
    origin = policy({'type': 'file', 'path': path})
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        error=_open_error(origin)), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), 'the FIFO was opened and blocks'
    assert 'not a regular file' in result['error']


def test_directory_refused(policy, allowed):
    (allowed / 'dir').mkdir()
    origin = policy({'type': 'file', 'path': str(allowed / 'dir')})
    assert 'not a regular file' in _open_error(origin)


@pytest.mark.skipif(os.geteuid() != 0, reason='mknod needs root')
def test_character_device_never_opened(policy, allowed):
    path = str(allowed / 'zero')
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    origin = policy({'type': 'file', 'path': path})
    with mock.patch('os.open', wraps=os.open) as opened:
        assert 'not a regular file' in _open_error(origin)
    assert 'zero' not in [c.args[0] for c in opened.call_args_list]


def test_file_replaced_between_check_and_open(policy, allowed, tmp_path):
    path = _write(allowed / 'volume')
    other = _write(tmp_path / 'other', b'other bytes')
    origin = policy({'type': 'file', 'path': path})
    real_stat = os.stat

    def stat_then_swap(name, *args, **kwargs):
        result = real_stat(name, *args, **kwargs)
        if name == 'volume':
            os.rename(other, path)
        return result

    with mock.patch('os.stat', stat_then_swap):
        assert 'replaced' in _open_error(origin)


def test_open_confined_leaves_no_descriptor(policy, allowed):
    path = _write(allowed / 'volume')
    origin = policy({'type': 'file', 'path': path})
    before = len(os.listdir('/proc/self/fd'))
    for _ in range(20):
        origin.read(0, 4)
        with pytest.raises(sources.OriginError):
            policy({'type': 'file',
                    'path': str(allowed / 'missing')}).read(0, 4)
    assert len(os.listdir('/proc/self/fd')) == before


def test_root_dir_allowed_when_configured(tmp_path):
    path = _write(tmp_path / 'volume')
    policy = origins.OriginPolicy(file_dirs=['/'])
    assert bytes(policy({'type': 'file', 'path': path}).read(0, 5)) == \
        b'image'


@pytest.mark.parametrize('dirs', [['relative'], [''], ['/a\0b']])
def test_bad_file_dirs_refused(dirs):
    with pytest.raises(ValueError, match='file_origin_dirs'):
        origins.OriginPolicy(file_dirs=dirs)


# -- from the configuration --------------------------------------------------

def test_from_conf(tmp_path):
    conf = cfg.ConfigOpts()
    options.register(conf)
    conf([])
    policy = origins.OriginPolicy.from_conf(conf)
    assert policy.rbd_pools == ('volumes',)
    assert policy.volume_name_template == 'volume-%s'
    assert policy.file_dirs == ()
    assert policy.rbd_options == {
        'ceph_conf': '/etc/ceph/ceph.conf', 'user': None, 'keyring': None,
        'cluster_name': 'ceph', 'timeout': 10}
    conf.set_override('file_origin_dirs', [str(tmp_path) + '/'], 'origin')
    conf.set_override('rbd_pools', ['a', 'b'], 'origin')
    policy = origins.OriginPolicy.from_conf(conf)
    assert policy.file_dirs == (str(tmp_path),)
    assert policy.rbd_pools == ('a', 'b')
