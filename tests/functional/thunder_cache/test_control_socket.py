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

"""The control socket of a real daemon, attacked by its own group.

A member of the control group (cinder) tries to make the daemon read files
and Ceph settings of its choosing, races requests on one image and one
volume, and sends sizes and ids no volume has; the daemon answers each with
a clean error, leaves nothing behind and logs no traceback. Each daemon is
a ``thunder-cache`` process with its volume files mounted (FUSE).
"""

import errno
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid

import pytest

from tests import cache_helpers
from tests.functional.thunder_cache import cache_daemons
from thunder_cache.control import client as control_client

CHUNK = 64 * 1024
SIZE = 3 * 1024 * 1024 + 1234
GiB = 1024 * 1024 * 1024
TiB = 1024 * GiB


def _unavailable():
    if not os.path.exists('/dev/fuse'):
        return '/dev/fuse does not exist'
    if not shutil.which('fusermount3'):
        return 'fusermount3 is not installed'
    try:
        import thunder_cache.volumes.fusefs  # noqa: F401
    except (ImportError, OSError) as e:
        return 'no libfuse 3: %s' % e
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None,
                                reason=str(_unavailable()))


@pytest.fixture
def images(workdir):
    """The one directory file origins may lie under ([origin])."""
    path = os.path.join(workdir, 'images')
    os.makedirs(path)
    return path


@pytest.fixture
def node(workdir, images):
    daemon = cache_daemons.VolumeDaemon(
        workdir, 'n', origin_dirs=[images],
        extra='[origin]\nrbd_connect_timeout = 1')
    daemon.start()
    yield daemon
    daemon.stop()
    assert not os.path.ismount(daemon.paths['mount'])


def _image_volume(images, name='image-volume'):
    data = os.urandom(SIZE)
    path = os.path.join(images, name)
    manifest = cache_helpers.write_volume(path, data, CHUNK)
    return path, data, manifest


def _kind(node, op, **args):
    with pytest.raises(control_client.ControlError) as info:
        node.control.call(op, **args)
    return info.value.kind, info.value.message


def _full_log(node):
    with open(node.log_path) as f:
        return f.read()


def _no_traceback(node):
    log = _full_log(node)
    assert 'Traceback' not in log, log[-3000:]


# -- the daemon reads only what its configuration names -----------------------

def test_file_read_oracle_refused(node, images, workdir):
    """The digest in an error never tells a root-readable file's bytes.

    On the old daemon a descriptor naming the peer secret with a 1-byte
    manifest got back the sha256 of that byte: the secret, byte by byte.
    """
    secret = node.secret_path
    with open(secret, 'rb') as f:
        content = f.read()
    # Any read from now on moves the access time (relatime: atime < mtime).
    os.utime(secret, (1, time.time()))
    os.symlink(secret, os.path.join(images, 'link'))
    single_bytes = {hashlib.sha256(bytes([b])).hexdigest()
                    for b in range(256)}
    prefixes = {hashlib.sha256(content[:n]).hexdigest()
                for n in range(1, 65)}
    for path in (secret, os.path.join(images, '..', 'secret'),
                 os.path.join(images, 'link')):
        for offset, length in ((0, 1), (1, 1), (0, 32), (0, 64)):
            kind, message = _kind(
                node, 'register_image', image_id='img-oracle',
                manifest_digest='0' * 64, manifest_offset=offset,
                manifest_length=length,
                origin={'type': 'file', 'path': path})
            # Refused as such, or (a link, found when opened) unreadable.
            assert kind in ('BadRequest', 'DescriptorError'), message
            assert kind == 'BadRequest' or 'not a regular file' in message
            assert not [d for d in single_bytes | prefixes if d in message]
    assert os.stat(secret).st_atime == 1, 'the daemon read the secret'
    log = _full_log(node)
    assert not [d for d in single_bytes | prefixes if d in log]
    assert not os.listdir(os.path.join(node.dir, 'images.d'))
    _no_traceback(node)


def test_caller_chosen_ceph_identity_refused(node, workdir):
    """librados never runs with a configuration the caller chose.

    On the old daemon it did, as the daemon's user: this one creates a log
    file and an admin socket where the caller says.
    """
    evil = os.path.join(workdir, 'evil')
    os.makedirs(evil)
    conf = os.path.join(evil, 'ceph.conf')
    with open(conf, 'w') as f:
        f.write('[global]\nmon host = 127.0.0.1:1\n'
                'log file = %s/created.log\n'
                'admin socket = %s/created.asok\n' % (evil, evil))
    volume_id = str(uuid.uuid4())
    for key, value in (('ceph_conf', conf),
                       ('keyring', os.path.join(evil, 'keyring')),
                       ('user', 'admin'), ('cluster_name', 'evil')):
        kind, message = _kind(
            node, 'register_image', image_id='img-ceph',
            manifest_digest='0' * 64, image_size=SIZE,
            origin_volume_id=volume_id,
            origin={'type': 'rbd', 'pool': 'volumes',
                    'image': 'volume-' + volume_id, key: value})
        assert kind == 'BadRequest', message
        assert key in message
    # Pools and images are the daemon's to choose too.
    for origin in ({'type': 'rbd', 'pool': 'secrets'},
                   {'type': 'rbd', 'image': 'volume-' + str(uuid.uuid4())}):
        kind, _message = _kind(
            node, 'register_image', image_id='img-ceph',
            manifest_digest='0' * 64, image_size=SIZE,
            origin_volume_id=volume_id, origin=origin)
        assert kind == 'BadRequest'
    assert sorted(os.listdir(evil)) == ['ceph.conf']
    _no_traceback(node)


def test_file_origin_in_the_allowed_directory_works(node, images):
    path, data, manifest = _image_volume(images)
    info = node.control.call(
        'register_image', image_id='img-ok',
        manifest_digest=manifest.digest(), image_size=len(data),
        origin={'type': 'file', 'path': path})
    assert info['image_size'] == len(data)
    node.control.call('create_volume', volume_id='volume-ok', size=GiB,
                      image_id='img-ok')
    with open(os.path.join(node.paths['mount'], 'volume-ok'), 'rb') as f:
        assert f.read(len(data)) == data
    node.delete_volume('volume-ok')


# -- races --------------------------------------------------------------------

def _together(count, target):
    """``target(i)`` in ``count`` threads released at once; the results."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(i):
        barrier.wait(30)
        try:
            results[i] = ('ok', target(i))
        except control_client.ControlError as e:
            results[i] = (e.kind, e.message)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_registrations_of_one_image(node, images):
    """Eight registrations of one image at once all succeed.

    The old daemon wrote every descriptor through one temporary name:
    all but one failed with FileNotFoundError.
    """
    path, data, manifest = _image_volume(images)
    descriptors = os.path.join(node.dir, 'images.d')
    for round_ in range(4):
        image_id = 'img-race-%d' % round_
        results = _together(8, lambda i: node.control.call(
            'register_image', image_id=image_id,
            manifest_digest=manifest.digest(), image_size=len(data),
            origin={'type': 'file', 'path': path}))
        assert [r[0] for r in results] == ['ok'] * 8, results
        assert {r[1]['image_size'] for r in results} == {len(data)}
    assert sorted(os.listdir(descriptors)) == [
        'img-race-%d.json' % n for n in range(4)]
    _no_traceback(node)


def test_create_and_delete_of_one_volume_racing(node, images):
    """Only clean answers; never half a volume; nothing left at the end."""
    path, data, manifest = _image_volume(images)
    node.control.call('register_image', image_id='img-churn',
                      manifest_digest=manifest.digest(),
                      image_size=len(data),
                      origin={'type': 'file', 'path': path})
    seen = []

    def churn(i):
        answers = []
        for _ in range(25):
            for op, args in (('create_volume', {'size': GiB,
                                                'image_id': 'img-churn'}),
                             ('delete_volume', {})):
                try:
                    node.control.call(op, volume_id='volume-churn', **args)
                    answers.append('ok')
                except control_client.ControlError as e:
                    answers.append(e.kind)
                    if e.kind not in ('VolumeExists', 'VolumeNotFound'):
                        answers.append(e.message)
        seen.extend(answers)

    _together(8, churn)
    assert set(seen) <= {'ok', 'VolumeExists', 'VolumeNotFound'}, [
        a for a in seen if a not in ('ok', 'VolumeExists',
                                     'VolumeNotFound')][:10]
    layers = node.paths['layers']
    if os.listdir(layers):
        # What is left is a whole volume, served and readable.
        assert sorted(os.listdir(os.path.join(layers, 'volume-churn'))) == [
            'bitmap', 'data', 'volume.json']
        with open(os.path.join(node.paths['mount'], 'volume-churn'),
                  'rb') as f:
            assert f.read(len(data)) == data
        node.control.call('delete_volume', volume_id='volume-churn')
    assert os.listdir(layers) == []
    assert os.listdir(node.paths['mount']) == []
    _no_traceback(node)


# -- unbounded inputs ---------------------------------------------------------

@pytest.mark.parametrize('op, args', [
    ('create_volume', {'volume_id': 'volume-x', 'size': 2 ** 63}),
    ('create_volume', {'volume_id': 'volume-x', 'size': 2 ** 64 + 7}),
    ('create_volume', {'volume_id': 'volume-x', 'size': 10 ** 30}),
    ('create_volume', {'volume_id': 'volume-x', 'size': 65 * TiB}),
    ('create_volume', {'volume_id': 'volume-x', 'size': -1}),
    ('create_volume', {'volume_id': 'volume-x', 'size': True}),
    ('create_volume', {'volume_id': 'volume-x', 'size': {'gib': 1}}),
    ('create_volume', {'volume_id': 5, 'size': GiB}),
    ('create_volume', {'volume_id': ['volume-x'], 'size': GiB}),
    ('create_volume', {'volume_id': {'a': [1, {'b': None}]}, 'size': GiB}),
    ('create_volume', {'volume_id': 'v' * 50000, 'size': GiB}),
    ('create_volume', {'volume_id': 'volume-x', 'size': GiB,
                       'image_id': ['img']}),
    ('create_volume', {'volume_id': 'volume-x', 'size': GiB,
                       'image_id': {'x': 1}}),
    ('create_volume', {'volume_id': 'volume-x', 'size': GiB,
                       'source': 7}),
    ('create_volume', {'volume_id': 'volume-x', 'size': GiB,
                       'read_only': 1}),
    ('create_volume', {'volume_id': 'volume-x', 'size': GiB,
                       'unknown': 'key'}),
    ('resize_volume', {'volume_id': 'volume-y', 'size': 2 ** 63}),
    ('resize_volume', {'volume_id': 'volume-y', 'size': 2 ** 80}),
    ('resize_volume', {'volume_id': 7, 'size': GiB}),
    ('delete_volume', {'volume_id': None}),
    ('delete_volume', {'volume_id': [None]}),
    ('volume_info', {'volume_id': 3.5}),
    ('register_image', {'image_id': 5, 'manifest_digest': '0' * 64,
                        'image_size': 4096}),
    ('register_image', {'image_id': 'img-x', 'manifest_digest': '0' * 64,
                        'image_size': 2 ** 70}),
    ('register_image', {'image_id': 'img-x', 'manifest_digest': '0' * 64,
                        'manifest_offset': 0, 'manifest_length': 2 ** 40}),
    ('register_image', {'image_id': 'img-x', 'manifest_digest': '0' * 64,
                        'image_size': 4096, 'peers': [{'x': 1}]}),
    ('register_image', {'image_id': 'img-x', 'manifest_digest': [1],
                        'image_size': 4096}),
    ('register_image', {'image_id': 'img-x', 'manifest_digest': '0' * 64,
                        'image_size': 4096, 'surprise': True}),
])
def test_hostile_arguments_are_bad_requests(node, op, args):
    node.control.call('create_volume', volume_id='volume-y', size=GiB)
    kind, message = _kind(node, op, **args)
    assert kind == 'BadRequest', message
    assert len(message) < 1000
    assert node.control.call('volume_info', volume_id='volume-y')[
        'size'] == GiB
    assert os.listdir(node.paths['layers']) == ['volume-y']
    assert sorted(os.listdir(node.paths['mount'])) == ['volume-y']
    _no_traceback(node)


def test_volume_file_grown_past_the_limit(node):
    """A truncate through the mount is held to the same limit: EFBIG."""
    node.control.call('create_volume', volume_id='volume-t', size=GiB)
    path = os.path.join(node.paths['mount'], 'volume-t')
    for size in (65 * TiB, 2 ** 62):
        with pytest.raises(OSError) as info:
            os.truncate(path, size)
        assert info.value.errno == errno.EFBIG
    assert os.path.getsize(path) == GiB
    os.truncate(path, 2 * GiB)
    assert node.control.call('volume_info', volume_id='volume-t')[
        'size'] == 2 * GiB
    # An answer, not a fault: mfusepy notes the errno it returns (at
    # debug level, with its stack); the daemon logs nothing of its own.
    log = _full_log(node)
    assert 'returning errno 27 (File too large)' in log
    assert not re.search(r' (WARNING|ERROR|CRITICAL) thunder_cache', log)


def _rss(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    raise AssertionError('no VmRSS for %d' % pid)


def test_memory_of_a_huge_sparse_volume_is_bounded(node):
    """A 2 TiB volume's bitmap (64 MiB) is never held whole.

    The old daemon read it whole when the volume was created or opened,
    and kept it: its memory grew by the bitmap's size, 32 MiB per TiB.
    """
    size = 2 * TiB
    before = _rss(node.pid)
    node.control.call('create_volume', volume_id='volume-huge', size=size)
    path = os.path.join(node.paths['mount'], 'volume-huge')
    step = size // 500 // 4096 * 4096
    fd = os.open(path, os.O_RDWR)
    try:
        for n in range(500):
            os.pwrite(fd, b'%08d' % n, n * step)
        os.fsync(fd)
        for n in range(0, 500, 50):
            assert os.pread(fd, 8, n * step) == b'%08d' % n
    finally:
        os.close(fd)
    grown = _rss(node.pid) - before
    assert node.control.call('volume_info', volume_id='volume-huge')[
        'written_bytes'] == 500 * 4096
    # A restart opens the layer (and counts its bits) again.
    node.stop()
    node.start()
    after_restart = _rss(node.pid)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 8, 499 * step) == b'%08d' % 499
    finally:
        os.close(fd)
    print('2 TiB volume: daemon RSS %.1f MiB before, +%.1f MiB once '
          'created and written, %.1f MiB after a restart'
          % (before / 2 ** 20, grown / 2 ** 20, after_restart / 2 ** 20))
    assert grown < 24 * 2 ** 20
    assert _rss(node.pid) < before + 24 * 2 ** 20
    node.delete_volume('volume-huge')
    _no_traceback(node)


# -- least privilege ----------------------------------------------------------

UNPRIVILEGED = 'nobody'


def _unprivileged_unavailable():
    if os.geteuid() != 0:
        return 'changing to another user needs root'
    for tool in ('unshare', 'setpriv', 'mount'):
        if not shutil.which(tool):
            return '%s is not installed' % tool
    try:
        pwd.getpwnam(UNPRIVILEGED)
    except KeyError:
        return 'no user %s' % UNPRIVILEGED
    return None


def _fuse_conf_allows_other():
    try:
        with open('/etc/fuse.conf') as f:
            return any(line.strip() == 'user_allow_other' for line in f)
    except OSError:
        return False


def _loop_device_free():
    return shutil.which('losetup') and not subprocess.run(
        ['losetup', '--find'], capture_output=True).returncode


def _host_as_deployed(workdir):
    """A command prefix giving the daemon a host set up as documented.

    ``user_allow_other`` in /etc/fuse.conf and a /dev/fuse any user may
    open (Debian's udev rule makes it 0666): where this host differs,
    the daemon runs in a mount namespace of its own with a fuse.conf and
    a /dev/fuse node that do, bound over the host's (left untouched).
    """
    binds = []
    if not _fuse_conf_allows_other():
        conf = os.path.join(workdir, 'fuse.conf')
        with open(conf, 'w') as f:
            f.write('user_allow_other\n')
        binds.append((conf, '/etc/fuse.conf'))
    if stat.S_IMODE(os.stat('/dev/fuse').st_mode) & 0o006 != 0o006:
        device = os.path.join(workdir, 'fuse')
        os.mknod(device, stat.S_IFCHR | 0o666, os.stat('/dev/fuse').st_rdev)
        os.chmod(device, 0o666)
        binds.append((device, '/dev/fuse'))
    if not binds:
        return []
    script = ' && '.join('mount --bind %s %s' % pair for pair in binds)
    return ['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
            script + ' && exec "$@"', 'sh']


def _chown_tree(path, uid, gid):
    for root, dirs, files in os.walk(path):
        for name in [root] + [os.path.join(root, n) for n in dirs + files]:
            os.lchown(name, uid, gid)


@pytest.mark.skipif(_unprivileged_unavailable() is not None,
                    reason=str(_unprivileged_unavailable()))
def test_daemon_serves_volumes_without_root(workdir):
    """thunder-cache as an unprivileged user: no root needed to serve.

    The daemon runs as ``nobody`` with no capabilities; its directories
    are its own. FUSE's ``allow_other`` (so that root, i.e. losetup, can
    open the volume files) needs ``user_allow_other`` in /etc/fuse.conf:
    when the host's does not say it, the daemon runs in a mount namespace
    where a copy that does is bound over it, the host's file untouched.
    The files are read as root through the daemon's namespace.
    """
    user = pwd.getpwnam(UNPRIVILEGED)
    os.chmod(workdir, 0o700)
    images = os.path.join(workdir, 'images')
    os.makedirs(images)
    path, data, manifest = _image_volume(images)
    node = cache_daemons.VolumeDaemon(workdir, 'u', origin_dirs=[images])
    os.chmod(node.secret_path, 0o600)
    _chown_tree(workdir, user.pw_uid, user.pw_gid)
    # As the systemd unit runs it: no capability but CAP_SYS_ADMIN in the
    # bounding set, which the set-user-ID fusermount3 needs to mount.
    node.command_prefix = _host_as_deployed(workdir) + [
        'setpriv', '--reuid=%d' % user.pw_uid, '--regid=%d' % user.pw_gid,
        '--clear-groups', '--inh-caps=-all',
        '--bounding-set=-all,+sys_admin', '--']
    node.start()
    try:
        with open('/proc/%d/status' % node.pid) as f:
            status = dict(line.split(':', 1) for line in f)
        assert status['Uid'].split() == [str(user.pw_uid)] * 4
        assert status['Gid'].split() == [str(user.pw_gid)] * 4
        assert int(status['CapEff'], 16) == 0
        info = node.control.call(
            'register_image', image_id='img-nonroot',
            manifest_digest=manifest.digest(), image_size=len(data),
            origin={'type': 'file', 'path': path})
        assert info['image_size'] == len(data)
        node.control.call('create_volume', volume_id='volume-nonroot',
                          size=GiB, image_id='img-nonroot')
        # As root (what losetup does), through the daemon's mount.
        volume = '/proc/%d/root%s/volume-nonroot' % (node.pid,
                                                     node.paths['mount'])
        with open(volume, 'r+b') as f:
            assert f.read(len(data)) == data
            f.seek(GiB - 4096)
            f.write(b'written as root')
        with open(volume, 'rb') as f:
            f.seek(GiB - 4096)
            assert f.read(15) == b'written as root'
        if _loop_device_free():
            # What the driver does through privsep: a loop device (root)
            # over the file the unprivileged daemon serves.
            device = subprocess.run(
                ['losetup', '--find', '--show', '--read-only', volume],
                check=True, capture_output=True, text=True).stdout.strip()
            try:
                with open(device, 'rb') as f:
                    assert f.read(len(data)) == data
            finally:
                subprocess.run(['losetup', '--detach', device], check=True)
        layers = os.stat(os.path.join(node.paths['layers'],
                                      'volume-nonroot', 'data'))
        assert (layers.st_uid, layers.st_gid) == (user.pw_uid, user.pw_gid)
        node.delete_volume('volume-nonroot')
        _no_traceback(node)
    finally:
        node.stop()
