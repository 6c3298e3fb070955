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

"""thunder-cache-manage: parsing, the files it reads, what it prints."""

import io
import json
import os
from unittest import mock

import pytest

from tests import cache_helpers
from thunder_cache.cache import node as node_mod
from thunder_cache.control import server as control_server
from thunder_cache import manage
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod

CHUNK = manifest_mod.MIN_CHUNK_SIZE
SIZE = CHUNK * 4 + 7
IMAGE = 'img-manage'


class Node:
    """A node's files: a cache half filled, a descriptor, a volume."""

    def __init__(self, tmp_path, blockdev=False):
        self.dir = tmp_path
        self.image = os.urandom(SIZE)
        origin = str(tmp_path / 'image.vol')
        manifest = cache_helpers.write_volume(origin, self.image, CHUNK)
        node = node_mod.Node('n1', 'http://127.0.0.1:9',
                             str(tmp_path / 'cache'), cache_helpers.client())
        node.register(node_mod.ImageSpec(
            IMAGE, manifest.digest(), sources.FileOrigin(origin),
            image_size=SIZE))
        node.read_image(IMAGE, 0, CHUNK * 2)  # chunks 0 and 1
        node.close()
        (tmp_path / 'cache' / 'images.d').mkdir()
        (tmp_path / 'cache' / 'images.d' / (IMAGE + '.json')).write_text(
            json.dumps({'manifest_digest': manifest.digest(),
                        'image_size': SIZE,
                        'peers': ['http://127.0.0.1:7']}))
        volume = tmp_path / 'layers' / 'vol-1'
        volume.mkdir(parents=True)
        (volume / 'volume.json').write_text(json.dumps(
            {'id': 'vol-1', 'size': 1 << 30, 'image_id': IMAGE,
             'read_only': False}))
        (volume / 'data').write_bytes(b'x' * 8192)
        self.control = str(tmp_path / 'control.sock')
        self.conf = str(tmp_path / 'thunder-cache.conf')
        with open(self.conf, 'w') as f:
            f.write('[node]\ncache_dir = %s\n[blockdev]\nenabled = %s\n'
                    'layers_dir = %s\ncontrol_socket = %s\n'
                    % (tmp_path / 'cache', blockdev, tmp_path / 'layers',
                       self.control))

    def run(self, *args):
        out = io.StringIO()
        code = manage.main(['--config-file', self.conf] + list(args), out)
        return code, out.getvalue()


@pytest.fixture
def files(tmp_path):
    return Node(tmp_path)


def test_image_list_table(files):
    code, out = files.run('image', 'list')
    assert code == manage.OK
    header, row = out.strip().split('\n')
    assert header.split()[:3] == ['IMAGE', 'SIZE', 'CHUNKS']
    cells = row.split()
    assert cells[:4] == [IMAGE, str(SIZE), '2', '5']
    assert 'vol-1' in cells and 'http://127.0.0.1:7' in cells
    assert 'unknown' in cells  # no daemon to ask


def test_image_list_json(files):
    code, out = files.run('image', 'list', '--json')
    assert code == manage.OK
    [image] = json.loads(out)
    assert image['image_id'] == IMAGE
    assert image['chunks_present'] == 2 and image['chunks'] == 5
    assert image['disk_bytes'] >= 2 * CHUNK
    assert image['volumes'] == ['vol-1']
    assert image['trace'] == 'none'
    assert image['last_used'].endswith('Z')


def test_verify_ok(files):
    code, out = files.run('image', 'verify', IMAGE)
    assert code == manage.OK
    assert out.strip() == ('Image %s: 2 of 5 chunks present, all match the '
                           'manifest' % IMAGE)


def test_verify_lists_bad_chunks(files):
    path = files.dir / 'cache' / IMAGE / 'data'
    with open(path, 'r+b') as f:
        f.seek(CHUNK + 10)
        f.write(b'\xff\x00\xff')
    code, out = files.run('image', 'verify', IMAGE, '--json')
    assert code == manage.FAILED
    assert json.loads(out)['bad_chunks'] == [1]
    code, out = files.run('image', 'verify', IMAGE)
    assert 'do NOT match the manifest: 1' in out


def test_verify_unknown_image(files, capsys):
    code, _out = files.run('image', 'verify', 'nope')
    assert code == manage.FAILED
    assert 'not cached on this node' in capsys.readouterr().err


def test_verify_refuses_a_manifest_of_another_digest(files, capsys):
    path = files.dir / 'cache' / 'images.d' / (IMAGE + '.json')
    path.write_text(json.dumps({'manifest_digest': 'a' * 64}))
    code, _out = files.run('image', 'verify', IMAGE)
    assert code == manage.FAILED
    assert 'bad manifest' in capsys.readouterr().err


def test_volume_list(files):
    code, out = files.run('volume', 'list', '--json')
    assert code == manage.OK
    [volume] = json.loads(out)
    assert volume['id'] == 'vol-1' and volume['image_id'] == IMAGE
    assert volume['allocated_bytes'] >= 8192
    assert volume['open'] is None
    code, out = files.run('volume', 'list')
    assert out.split('\n')[1].split()[:3] == ['vol-1', str(1 << 30), IMAGE]


def test_evict_without_blockdev_is_unavailable(files):
    assert files.run('image', 'evict', IMAGE)[0] == manage.UNAVAILABLE


@pytest.mark.parametrize('args', [[], ['image'], ['image', 'verify'],
                                  ['image', 'nope'], ['disk', 'list']])
def test_usage_errors(files, args, capsys):
    assert files.run(*args)[0] == manage.USAGE


@pytest.fixture
def daemon(tmp_path):
    """Files and a control socket answering like the daemon."""
    files = Node(tmp_path, blockdev=True)
    asked = []

    def evict_image(image_id):
        asked.append(image_id)
        if image_id == 'busy':
            raise node_mod.ImageBusy('image busy is in use: 1 volumes')
        return {'image_id': image_id, 'freed_bytes': 1234}

    status = {IMAGE: {'open': True, 'busy': None, 'gone': None,
                      'peers': ['http://127.0.0.1:8'], 'last_used': 0,
                      'volumes': ['vol-1'], 'trace': 'replaying'}}
    server = control_server.ControlServer(
        files.control, {'evict_image': evict_image,
                        'cache_status': lambda: {'images': status},
                        'volume_info': lambda volume_id: {'open_count': 1}},
        expected=(node_mod.ImageBusy,))
    server.start()
    files.asked = asked
    yield files
    server.stop()


def test_evict_through_the_daemon(daemon):
    code, out = daemon.run('image', 'evict', IMAGE)
    assert code == manage.OK
    assert out.strip() == 'Evicted image %s (1234 bytes freed)' % IMAGE
    assert daemon.asked == [IMAGE]


def test_evict_refused(daemon, capsys):
    code, out = daemon.run('image', 'evict', 'busy', '--json')
    assert code == manage.FAILED
    assert 'in use' in json.loads(out)['error']
    assert 'refused: image busy is in use' in capsys.readouterr().err


def test_list_with_the_daemon(daemon):
    [image] = json.loads(daemon.run('image', 'list', '--json')[1])
    assert image['state'] == 'open' and image['trace'] == 'replaying'
    assert image['peers'] == ['http://127.0.0.1:8']
    [volume] = json.loads(daemon.run('volume', 'list', '--json')[1])
    assert volume['open'] == 1


def test_evict_daemon_away(tmp_path):
    files = Node(tmp_path, blockdev=True)
    assert files.run('image', 'evict', IMAGE)[0] == manage.UNAVAILABLE


def test_table_cells():
    text = manage.table([{'a': None, 'b': [1, 2], 'c': True}],
                        (('A', 'a'), ('B', 'b'), ('C', 'c')))
    assert text.split('\n') == ['A  B    C', '-  1,2  yes']


def test_default_config_file_is_the_daemons():
    with mock.patch.object(manage.cfg, 'find_config_files',
                           return_value=[]) as find:
        conf = manage.parse(['volume', 'list'])
    find.assert_called_once_with(project='thunder', prog='thunder-cache')
    assert conf.command.name == 'volume'
