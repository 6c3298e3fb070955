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

"""The bounded node cache and thunder-cache-manage, with real daemons.

* Eviction under a small ``[cache] max_size``: least recently used first,
  never an image a volume reads, evicted through ``thunder-cache-manage``
  only when unused.
* The cache filesystem full mid-fetch: a few-MiB ext4 on a loop device
  mounted as ``cache_dir``. Reads fail cleanly while it is full, no
  chunk is ever marked that does not verify, and once space is back (a
  file removed, or an idle image evicted by the daemon itself) the reads
  succeed with every byte checked. The mount and loop device are removed
  after each test, failed or not.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests import cache_helpers
from tests.functional.thunder_cache import cache_daemons

CHUNK = 256 * 1024
MiB = 1024 * 1024


def _no_fuse():
    if not os.path.exists('/dev/fuse') or not shutil.which('fusermount3'):
        return 'no FUSE'
    try:
        import thunder_cache.volumes.fusefs  # noqa: F401
    except (ImportError, OSError) as e:
        return 'no libfuse 3: %s' % e
    return None


def _no_loop():
    if os.geteuid() != 0:
        return 'loop devices need root'
    if not shutil.which('losetup') or not shutil.which('mkfs.ext4'):
        return 'losetup or mkfs.ext4 is not installed'
    if subprocess.run(['losetup', '--find'], capture_output=True).returncode:
        return 'no free loop device'
    return None


def _image(workdir, name, size):
    data = os.urandom(size)
    path = os.path.join(workdir, name + '.vol')
    manifest = cache_helpers.write_volume(path, data, CHUNK)
    return {'id': name, 'data': data, 'manifest': manifest,
            'origin': {'type': 'file', 'path': path}}


def _describe(daemon, *images):
    for image in images:
        daemon.describe(image['id'], image['manifest'],
                        origin=image['origin'])


def _read_all(daemon, image):
    data = daemon.read(image['id'], 0, len(image['data']))
    assert data == image['data']


def _manage(daemon, *args):
    proc = subprocess.run(
        [sys.executable, '-m', 'thunder_cache.manage', '--config-file',
         daemon.conf_path] + list(args), cwd=cache_daemons.REPO,
        capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def _cached(daemon):
    return sorted(name for name in os.listdir(os.path.join(daemon.dir,
                                                           'cache'))
                  if name.startswith('img-'))


def _no_traceback(daemon):
    # mfusepy logs the errors it returns to the kernel (EIO) at debug
    # level with their traceback: not the daemon's.
    with open(daemon.log_path) as f:
        log = f.read()
    assert not re.search(r' thunder_cache[.\w]* Traceback', log), log[-3000:]


def _wait(predicate, daemon, timeout=20):
    assert cache_helpers.eventually(predicate, timeout), daemon.log()


# -- eviction under a limit ---------------------------------------------------

@pytest.mark.skipif(_no_fuse() is not None, reason=str(_no_fuse()))
def test_eviction_under_a_small_limit(workdir):
    images = [_image(workdir, 'img-%s' % n, 3 * MiB) for n in 'abc']
    a, b, c = images
    daemon = cache_daemons.VolumeDaemon(
        workdir, 'n1', extra='[cache]\nmax_size = %d\ncheck_interval = 0.2\n'
                             'low_water_percent = 90' % (7 * MiB))
    _describe(daemon, *images)
    daemon.start()
    try:
        _read_all(daemon, a)
        time.sleep(1.1)  # last uses a second apart
        _read_all(daemon, b)
        time.sleep(1.1)
        assert _cached(daemon) == ['img-a', 'img-b']
        _read_all(daemon, c)  # 9 MiB: over the limit, a goes
        _wait(lambda: daemon.metric(
            'thunder_cache_images_evicted_total') == 1, daemon)
        assert _cached(daemon) == ['img-b', 'img-c']
        assert 'Evicted image img-a' in daemon.log()

        # A volume reads b: b stays although it is the oldest now.
        daemon.control.call('create_volume', volume_id='vol-b',
                            size=4 * MiB, image_id='img-b')
        time.sleep(1.1)
        _read_all(daemon, a)  # fetched again, same bytes; c goes
        _wait(lambda: _cached(daemon) == ['img-a', 'img-b'], daemon)

        code, out, _err = _manage(daemon, 'image', 'list', '--json')
        assert code == 0, _err
        listed = {i['image_id']: i for i in json.loads(out)}
        assert listed['img-b']['volumes'] == ['vol-b']
        assert listed['img-a']['chunks_present'] == listed['img-a']['chunks']
        assert listed['img-a']['state'] in ('open', 'busy')

        code, _out, err = _manage(daemon, 'image', 'evict', 'img-b')
        assert code == 1 and 'vol-b' in err, err
        assert 'img-b' in _cached(daemon)
        daemon.delete_volume('vol-b')
        code, out, err = _manage(daemon, 'image', 'evict', 'img-b')
        assert code == 0, err
        assert out.startswith('Evicted image img-b (')
        assert _cached(daemon) == ['img-a']
        assert _manage(daemon, 'image', 'evict', 'img-b')[0] == 1

        code, out, _err = _manage(daemon, 'image', 'verify', 'img-a')
        assert code == 0 and 'all match' in out, out
        _no_traceback(daemon)
    finally:
        daemon.stop()
    leftovers = [n for n in os.listdir(os.path.join(daemon.dir, 'cache'))
                 if n.startswith('.evicted-')]
    assert leftovers == []


@pytest.mark.skipif(_no_fuse() is not None, reason=str(_no_fuse()))
def test_image_deleted_in_glance_leaves_once_unused(workdir):
    """The image-volume gone from Cinder: cache and advertisement go.

    The node advertises itself on the image-volume (a fake Cinder); once
    the volume answers 404 the image is marked gone, kept while a volume
    reads it, and removed with its descriptor when that volume goes.
    """
    image = _image(workdir, 'img-g', 2 * MiB)
    volume_id = str(uuid.uuid4())
    cinder = cache_daemons.FakeCinder(volume_id, time.strftime(
        '%Y-%m-%dT%H:%M:%S.000000', time.gmtime(time.time() - 60)), {})
    cinder.start()
    daemon = cache_daemons.VolumeDaemon(
        workdir, 'n1', extra='\n'.join(
            ['[cache]', 'check_interval = 0.2'] + cinder.options()))
    daemon.describe(image['id'], image['manifest'], origin=image['origin'],
                    origin_volume_id=volume_id)
    descriptor = os.path.join(daemon.dir, 'images.d', 'img-g.json')
    daemon.start()
    try:
        daemon.control.call('create_volume', volume_id='vol-g',
                            size=2 * MiB, image_id='img-g')
        _read_all(daemon, image)
        _wait(lambda: 'thunder_peer_n1' in cinder.metadata, daemon)
        cinder.deleted = True  # the thunder store deleted it
        _wait(lambda: 'is gone (its image-volume' in daemon.log(), daemon,
              timeout=30)
        time.sleep(1)  # checks go on: the volume keeps the image
        assert _cached(daemon) == ['img-g'] and os.path.exists(descriptor)
        assert _read_volume(daemon, 'vol-g', 2 * MiB) == image['data']
        daemon.delete_volume('vol-g')
        # The evictor removes the cache, then the descriptor.
        _wait(lambda: _cached(daemon) == [] and
              not os.path.exists(descriptor), daemon)
        assert not os.path.exists(descriptor)
        assert daemon.control.call('stats')['images'] == 0
        assert 'deleted in Glance' in daemon.log()
        _no_traceback(daemon)
    finally:
        daemon.stop()
        cinder.stop()


# -- the cache filesystem full ------------------------------------------------

@pytest.fixture
def small_fs(workdir):
    """A 16 MiB ext4 (no journal, no reserve) mounted as n1's cache_dir."""
    reason = _no_loop()
    if reason:
        pytest.skip(reason)
    backing = os.path.join(workdir, 'fs.img')
    with open(backing, 'wb') as f:
        f.truncate(16 * MiB)
    subprocess.run(['mkfs.ext4', '-q', '-F', '-O', '^has_journal', '-m', '0',
                    backing], check=True, capture_output=True)
    mountpoint = os.path.join(workdir, 'n1', 'cache')
    os.makedirs(mountpoint)
    device = subprocess.run(['losetup', '--find', '--show', backing],
                            check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        subprocess.run(['mount', device, mountpoint], check=True,
                       capture_output=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(['umount', mountpoint], check=True)
    finally:
        subprocess.run(['losetup', '-d', device], check=True)
    listed = subprocess.run(['losetup', '-j', backing], capture_output=True,
                            text=True).stdout
    assert listed == ''


def _full_daemon(workdir, read_retry, kind=cache_daemons.Daemon):
    return kind(workdir, 'n1', extra='[cache]\nread_retry = %s\n'
                                     'check_interval = 30' % read_retry)


def _read_volume(daemon, volume_id, length, step=128 * 1024):
    """The volume's bytes, read ``step`` at a time (OSError on a failure).

    The error's ``good`` attribute holds the bytes read before it.
    """
    data = bytearray()
    fd = os.open(os.path.join(daemon.paths['mount'], volume_id), os.O_RDONLY)
    try:
        while len(data) < length:
            try:
                data += os.pread(fd, step, len(data))
            except OSError as e:
                e.good = bytes(data)
                raise
    finally:
        os.close(fd)
    return bytes(data)


@pytest.mark.skipif(_no_fuse() is not None, reason=str(_no_fuse()))
def test_disk_full_fails_cleanly_then_recovers(workdir, small_fs):
    image = _image(workdir, 'img-x', 8 * MiB)
    filler = os.path.join(small_fs, 'filler')
    with open(filler, 'wb') as f:
        f.write(os.urandom(11 * MiB))
        os.fsync(f.fileno())
    daemon = _full_daemon(workdir, 1, cache_daemons.VolumeDaemon)
    _describe(daemon, image)
    daemon.start()
    try:
        daemon.control.call('create_volume', volume_id='vol-x',
                            size=8 * MiB, image_id='img-x')
        # A guest's read through its volume: EIO, not bytes never stored.
        with pytest.raises(OSError) as error:
            _read_volume(daemon, 'vol-x', 8 * MiB)
        assert error.value.errno == errno.EIO
        good = error.value.good
        assert len(good) < len(image['data'])
        assert good == image['data'][:len(good)]
        with pytest.raises(IOError):
            _read_all(daemon, image)
        assert daemon.metric('thunder_cache_cache_full_errors_total') >= 1
        assert daemon.metric('thunder_cache_cache_full_events_total') >= 1
        assert 'the cache filesystem is full' in daemon.log()
        # What is marked present verifies; the rest is not marked.
        code, out, err = _manage(daemon, 'image', 'verify', 'img-x',
                                 '--json')
        assert code == 0, (out, err)
        result = json.loads(out)
        assert 0 < result['chunks_checked'] < result['chunks']

        os.unlink(filler)  # space is back
        assert _read_volume(daemon, 'vol-x', 8 * MiB) == image['data']
        _read_all(daemon, image)
        code, out, _err = _manage(daemon, 'image', 'verify', 'img-x',
                                  '--json')
        assert code == 0
        assert json.loads(out)['chunks_checked'] == json.loads(out)['chunks']
        _no_traceback(daemon)
        daemon.delete_volume('vol-x')
    finally:
        daemon.stop()


def test_disk_full_evicts_an_idle_image_first(workdir, small_fs):
    first = _image(workdir, 'img-old', 8 * MiB)
    second = _image(workdir, 'img-new', 8 * MiB)
    daemon = _full_daemon(workdir, 30)
    _describe(daemon, first, second)
    daemon.start()
    try:
        _read_all(daemon, first)
        # No limit configured: only the full filesystem makes room.
        _read_all(daemon, second)
        assert _cached(daemon) == ['img-new']
        assert daemon.metric('thunder_cache_cache_full_errors_total',
                             image='img-new') >= 1
        assert daemon.metric('thunder_cache_images_evicted_total') == 1
        assert 'Evicted image img-old' in daemon.log()
        assert 'the cache filesystem is full' in daemon.log()
        code, out, _err = _manage(daemon, 'image', 'verify', 'img-new')
        assert code == 0 and 'all match' in out
        _no_traceback(daemon)
    finally:
        daemon.stop()
