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

"""``thunder-cache-manage``: the operator's view of a node's caches.

Usage::

    thunder-cache-manage --config-file /etc/thunder/thunder-cache.conf \\
        image list [--json]
    thunder-cache-manage ... image verify IMAGE_ID [--json]
    thunder-cache-manage ... image evict IMAGE_ID [--json]
    thunder-cache-manage ... volume list [--json]

The read-only commands read the daemon's files (``[node] cache_dir``,
``descriptors_dir``, ``[blockdev] layers_dir``), and add what only the
running daemon knows (peers, fetches in flight, open volumes) when its
control socket answers. ``image evict`` goes through the control socket
(``evict_image``): the daemon refuses to evict an image a volume reads
or a fetch or transfer uses, so nothing here can break an attached
volume.

Exit codes: :data:`OK`, :data:`FAILED` (bad chunks found, eviction
refused, no such image), :data:`USAGE` (bad arguments),
:data:`UNAVAILABLE` (the daemon does not answer, for ``image evict``).
"""

import datetime
import json
import os
import sys

from oslo_config import cfg

from thunder_cache.boot import lifecycle
from thunder_cache.cache import chunkmap
from thunder_cache.cache import eviction
from thunder_cache.cache import image_cache
from thunder_cache.cache import node as node_mod
from thunder_cache.control import client as control_client
from thunder_cache import options
from thunder_cache.volumes import volumes
from thunder_common import manifest as manifest_mod

OK = 0
FAILED = 1
USAGE = 2
UNAVAILABLE = 3


class CommandError(Exception):
    """A command that failed; ``code`` is the exit code."""

    def __init__(self, message, code=FAILED):
        super().__init__(message)
        self.code = code


# -- reading the files --------------------------------------------------------

def _read_json(path, limit=node_mod.MAX_DESCRIPTOR_BYTES):
    try:
        with open(path, 'rb') as f:
            data = json.loads(f.read(limit))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _when(timestamp):
    if not timestamp:
        return None
    return datetime.datetime.fromtimestamp(
        timestamp, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


class Files:
    """The daemon's directories, as its configuration names them."""

    def __init__(self, conf):
        self.cache_dir = conf.node.cache_dir
        self.descriptors_dir = conf.node.descriptors_dir or os.path.join(
            self.cache_dir, 'images.d')
        self.layers_dir = conf.blockdev.layers_dir
        self.exclude = (self.descriptors_dir, self.layers_dir,
                        conf.blockdev.mount_dir)

    def images(self):
        return node_mod.cache_dirs(self.cache_dir, self.exclude)

    def descriptor(self, image_id):
        return _read_json(os.path.join(self.descriptors_dir,
                                       image_id + '.json')) or {}

    def volumes(self):
        """The volumes' ``volume.json`` plus their layers' bytes on disk."""
        found = []
        try:
            names = sorted(os.listdir(self.layers_dir))
        except FileNotFoundError:
            return found
        for name in names:
            directory = os.path.join(self.layers_dir, name)
            meta = _read_json(os.path.join(directory, volumes.META_FILE))
            if meta is None or meta.get('id') != name:
                continue
            found.append({'id': name, 'size': meta.get('size'),
                          'image_id': meta.get('image_id'),
                          'read_only': meta.get('read_only'),
                          'allocated_bytes': node_mod.disk_usage(directory)})
        return found

    def manifest(self, image_id, directory):
        """The cache's manifest, checked against the descriptor's digest."""
        try:
            with open(os.path.join(directory, node_mod.MANIFEST_FILE),
                      'rb') as f:
                data = f.read()
        except OSError as e:
            raise CommandError('image %s: no manifest in its cache: %s'
                               % (image_id, e))
        digest = self.descriptor(image_id).get('manifest_digest')
        try:
            if isinstance(digest, str):
                return manifest_mod.load_verified(data, digest)
            return manifest_mod.Manifest.from_bytes(data)
        except ValueError as e:
            raise CommandError('image %s: bad manifest: %s' % (image_id, e))

    def present(self, manifest, directory):
        """Indexes the chunk map marks present ([] without a valid map)."""
        try:
            bits = chunkmap.read_map(
                os.path.join(directory, image_cache.MAP_FILE),
                manifest.digest(), manifest.chunk_size, manifest.image_size,
                manifest.chunk_count)
        except (OSError, chunkmap.ChunkMapError):
            return []
        return [i for i in range(manifest.chunk_count)
                if bits[i >> 3] & (1 << (i & 7))]


def _daemon(conf):
    """The daemon's control client, or None without blockdev."""
    if not conf.blockdev.enabled:
        return None
    return control_client.ControlClient(conf.blockdev.control_socket,
                                        timeout=30)


def _status(client):
    """The daemon's ``cache_status`` images, or None if it is away."""
    if client is None:
        return None
    try:
        return client.call('cache_status')['images']
    except control_client.ControlError:
        return None


# -- commands -----------------------------------------------------------------

def image_list(conf, files):
    status = _status(_daemon(conf))
    users = {}
    for volume in files.volumes():
        users.setdefault(volume['image_id'], []).append(volume['id'])
    rows = []
    for image_id, directory in sorted(files.images().items()):
        known = (status or {}).get(image_id) or {}
        row = {'image_id': image_id, 'size': None, 'chunks': None,
               'chunks_present': None,
               'disk_bytes': node_mod.disk_usage(directory),
               'volumes': users.get(image_id, []),
               'peers': known.get('peers',
                                  files.descriptor(image_id).get('peers')),
               'trace': known.get('trace') or (
                   'recorded' if os.path.exists(os.path.join(
                       directory, lifecycle.TRACE_FILE)) else 'none'),
               'last_used': _when(known.get('last_used') or
                                  eviction.last_used(directory)),
               'state': ('gone' if known.get('gone') else
                         'busy' if known.get('busy') else
                         'open' if known.get('open') else
                         'closed' if status is not None else 'unknown')}
        try:
            manifest = files.manifest(image_id, directory)
            row.update(size=manifest.image_size,
                       chunks=manifest.chunk_count,
                       chunks_present=len(files.present(manifest,
                                                        directory)))
        except CommandError as e:
            row['error'] = str(e)
        rows.append(row)
    return OK, rows


def image_verify(conf, files, image_id):
    directory = files.images().get(image_id)
    if directory is None:
        raise CommandError('image %s is not cached on this node' % image_id)
    manifest = files.manifest(image_id, directory)
    present = files.present(manifest, directory)
    bad = []
    with open(os.path.join(directory, image_cache.DATA_FILE), 'rb') as f:
        for index in present:
            offset, length = manifest.chunk_range(index)
            if not manifest.verify_chunk(index,
                                         os.pread(f.fileno(), length,
                                                  offset)):
                bad.append(index)
    result = {'image_id': image_id, 'chunks': manifest.chunk_count,
              'chunks_checked': len(present), 'bad_chunks': bad}
    return (FAILED if bad else OK), result


def image_evict(conf, files, image_id):
    client = _daemon(conf)
    if client is None:
        raise CommandError('[blockdev] enabled is off: the daemon has no '
                           'control socket to evict through', UNAVAILABLE)
    try:
        return OK, client.call('evict_image', image_id=image_id)
    except control_client.ControlError as e:
        if e.kind == 'Unavailable':
            raise CommandError(e.message, UNAVAILABLE)
        raise CommandError('refused: %s' % e.message)


def volume_list(conf, files):
    client = _daemon(conf)
    rows = files.volumes()
    for row in rows:
        row['open'] = None
        if client is not None:
            try:
                row['open'] = client.call('volume_info',
                                          volume_id=row['id'])['open_count']
            except control_client.ControlError:
                client = None  # away: do not ask again for each volume
    return OK, rows


# -- printing -----------------------------------------------------------------

IMAGE_COLUMNS = (('IMAGE', 'image_id'), ('SIZE', 'size'),
                 ('CHUNKS', 'chunks_present'), ('OF', 'chunks'),
                 ('ON DISK', 'disk_bytes'), ('VOLUMES', 'volumes'),
                 ('PEERS', 'peers'), ('TRACE', 'trace'),
                 ('STATE', 'state'), ('LAST USED', 'last_used'))
VOLUME_COLUMNS = (('VOLUME', 'id'), ('SIZE', 'size'),
                  ('IMAGE', 'image_id'), ('ALLOCATED', 'allocated_bytes'),
                  ('READ-ONLY', 'read_only'), ('OPEN', 'open'))


def _cell(value):
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, (list, tuple)):
        return ','.join(str(v) for v in value) if value else '-'
    return str(value)


def table(rows, columns):
    """``rows`` (dicts) as a text table with a header line."""
    cells = [[title for title, _key in columns]]
    cells += [[_cell(row.get(key)) for _title, key in columns]
              for row in rows]
    widths = [max(len(line[i]) for line in cells)
              for i in range(len(columns))]
    return '\n'.join('  '.join(cell.ljust(width) for cell, width in
                               zip(line, widths)).rstrip()
                     for line in cells)


def render(command, result, as_json):
    """What to print for a command's result."""
    if as_json:
        return json.dumps(result, indent=2, sort_keys=True)
    if command == 'image list':
        return table(result, IMAGE_COLUMNS)
    if command == 'volume list':
        return table(result, VOLUME_COLUMNS)
    if command == 'image verify':
        text = ('Image %(image_id)s: %(chunks_checked)d of %(chunks)d chunks '
                'present, ' % result)
        if not result['bad_chunks']:
            return text + 'all match the manifest'
        return text + '%d do NOT match the manifest: %s' % (
            len(result['bad_chunks']),
            ' '.join(str(i) for i in result['bad_chunks']))
    return 'Evicted image %(image_id)s (%(freed_bytes)d bytes freed)' % (
        result)


# -- the command line ---------------------------------------------------------

COMMANDS = {('image', 'list'): image_list, ('image', 'verify'): image_verify,
            ('image', 'evict'): image_evict,
            ('volume', 'list'): volume_list}


def add_parsers(subparsers):
    for noun, verbs in (('image', ('list', 'verify', 'evict')),
                        ('volume', ('list',))):
        parser = subparsers.add_parser(noun, help='%s commands' % noun)
        actions = parser.add_subparsers(dest='action', required=True)
        for verb in verbs:
            sub = actions.add_parser(verb)
            if verb != 'list':
                sub.add_argument('image_id', metavar='IMAGE_ID')
            sub.add_argument('--json', action='store_true',
                             help='print JSON instead of text')


command_opt = cfg.SubCommandOpt('noun', dest='command', title='Commands',
                                handler=add_parsers, help='image or volume')


def parse(argv):
    """The configuration with the command line parsed."""
    conf = cfg.ConfigOpts()
    options.register(conf)
    conf.register_cli_opt(command_opt)
    # Without --config-file: the daemon's (/etc/thunder/thunder-cache.conf).
    daemons = cfg.find_config_files(project='thunder', prog='thunder-cache')
    conf(argv, project='thunder', prog='thunder-cache-manage',
         default_config_files=daemons)
    return conf


def main(argv=None, out=None):
    out = out or sys.stdout
    try:
        conf = parse(sys.argv[1:] if argv is None else argv)
    except (cfg.Error, SystemExit) as e:
        if isinstance(e, SystemExit):
            return USAGE if e.code else OK
        print('thunder-cache-manage: %s' % e, file=sys.stderr)
        return USAGE
    noun, verb = conf.command.name, conf.command.action
    args = [conf.command.image_id] if verb != 'list' else []
    try:
        code, result = COMMANDS[(noun, verb)](conf, Files(conf), *args)
    except CommandError as e:
        if conf.command.json:
            print(json.dumps({'error': str(e)}), file=out)
        print('thunder-cache-manage: %s' % e, file=sys.stderr)
        return e.code
    except OSError as e:
        print('thunder-cache-manage: %s' % e, file=sys.stderr)
        return FAILED
    print(render('%s %s' % (noun, verb), result, conf.command.json),
          file=out)
    return code


if __name__ == '__main__':
    sys.exit(main())
