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

"""The demo's flows: many volumes from one image, thunder against upstream.

One *run* of a flow uploads a raw image with the real CLI (``glance
image-create --store``), asks Cinder for N volumes from it at once (N
``POST /volumes`` through the API, sent together), waits until all are
available and records the upload, each volume's time from its request to
``available`` and the total, on the client's clock and on the servers'
(Glance's ``created_at`` to ``updated_at`` when the image turns active,
Cinder's ``created_at`` to ``updated_at`` when a volume turns available:
whole seconds, as the databases keep them), and the bytes each new volume
owns in Ceph (``rbd du``: a copy-on-write clone owns none). It also
records the admin calls the image needed before the fast paths could clone
it (``glance location-add`` of the aliases of a thunder:// image; none for
an image located by its sealed snapshot, the store's default) and the
size in GiB of the Cinder volume holding the image, which is what it takes
of the volume quota (0 for the rbd store). Flows:

``thunder``
    The thunder Glance store and ThunderDriver (the ``thunder`` volume
    type). Without the thunder store, the image goes to Glance's rbd store
    and ThunderDriver clones its ``rbd://`` location.
``thunder-import``
    The same image converted to qcow2 (``qemu-img convert``, once) and
    imported into the thunder store with Glance's image import (``glance
    image-create-via-import --disk-format qcow2``), whose
    ``image_conversion`` plugin stores it as raw; then volumes of the
    ``thunder`` type, as above. Its upload time runs until the image is
    ``active`` (staging, conversion and the store's upload).
``upstream``
    glance_store's rbd store and Cinder's RBDDriver (the ``rbd`` type):
    Cinder clones the image's ``rbd://`` location.
``upstream-cinder``
    glance_store's cinder store (images as volumes of the ``rbd`` type) and
    Cinder's RBDDriver: Cinder clones the image-volume it finds through the
    ``cinder://`` location, taking a snapshot of it for every clone.

:func:`run_all` repeats the runs in rounds, interleaved (each round runs
every flow for every volume count, the flows' order rotated from round to
round, so no flow always goes first on a machine warming up), and
:func:`summarize` gives each flow's medians and spread.
"""

from concurrent import futures
import datetime
import math
import os
import random
import statistics
import subprocess
import time
import uuid

from thunder_stack import clients
from thunder_stack.guest import common as guest_common
from thunder_stack import services as svc

FLOWS = {
    'thunder': {'store': 'thunder', 'type': 'thunder', 'pool': 'thunder'},
    'thunder-import': {'store': 'thunder', 'type': 'thunder',
                       'pool': 'thunder', 'disk_format': 'qcow2'},
    'upstream': {'store': 'rbd', 'type': 'rbd', 'pool': 'volumes'},
    'upstream-cinder': {'store': 'cinder', 'type': 'rbd', 'pool': 'volumes'},
}
# The flow thunder is compared with, for the goal lines.
BASELINE = 'upstream'
# Issue 16's bound: a qcow2 import takes at most this times the raw upload.
IMPORT_RATIO_GOAL = 1.5
BLOCK = 4 * 1024 * 1024
# Requests sent at once when N volumes are asked for.
CREATE_CONCURRENCY = 20
# What is compared across rounds: (key, column, format).
MEASURES = (('upload_s', 'upload s', '%.1f'),
            ('upload_mib_s', 'MiB/s', '%.0f'),
            ('upload_server_s', 'upload srv s', '%.0f'),
            ('mean_s', 'vol mean s', '%.2f'),
            ('max_s', 'vol max s', '%.2f'),
            ('total_s', 'total s', '%.2f'),
            ('server_max_s', 'vol srv max s', '%.0f'))


def make_image(path, size_mib, seed=20140417):
    """A raw image with real-ish content: data blocks with some holes."""
    if os.path.exists(path) and os.path.getsize(path) == size_mib * 2 ** 20:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = random.Random(seed)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        remaining = size_mib * 2 ** 20
        index = 0
        while remaining:
            n = min(BLOCK, remaining)
            if index % 4 == 3:
                f.seek(n, os.SEEK_CUR)  # a hole, as unused disk space is
            else:
                f.write(rng.randbytes(n))
            remaining -= n
            index += 1
        f.truncate()
    os.replace(tmp, path)
    return path


def make_qcow2(raw_path):
    """``raw_path`` converted to qcow2 beside it (made once)."""
    path = os.path.splitext(raw_path)[0] + '.qcow2'
    if not (os.path.exists(path) and
            os.path.getmtime(path) >= os.path.getmtime(raw_path)):
        guest_common.raw_to_qcow2(raw_path, path)
    return path


def parse_time(text):
    """A Glance or Cinder timestamp as seconds since the epoch (UTC)."""
    text = text.rstrip('Z')
    for fmt in ('%Y-%m-%dT%H:%M:%S.%f', '%Y-%m-%dT%H:%M:%S'):
        try:
            stamp = datetime.datetime.strptime(text, fmt)
        except ValueError:
            continue
        return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
    raise svc.StackError('unreadable timestamp %r' % text)


def server_seconds(record):
    """``updated_at - created_at`` of an API record, in seconds."""
    return (parse_time(record['updated_at']) -
            parse_time(record['created_at']))


def run_flow(stack, api, name, image_path, args, count):
    """One run of flow ``name``: an upload, then ``count`` volumes."""
    flow = dict(FLOWS[name])
    if flow['store'] == 'thunder' and not stack.state.get('thunder_store'):
        flow['store'] = 'rbd'
        flow['note'] = 'thunder store not available: rbd store'
    tag = 'thunder-demo-%s-%s' % (name, uuid.uuid4().hex[:6])
    size_gib = max(1, int(math.ceil(args.image_size_mib / 1024.0)))
    result = dict(flow, flow=name, volumes=count, error=None)
    image_id = None
    volume_ids = []
    try:
        t0 = time.monotonic()
        image_id, image = _upload(stack, api, tag, flow, image_path)
        result['upload_s'] = time.monotonic() - t0
        result['upload_mib_s'] = args.image_size_mib / result['upload_s']
        result['upload_server_s'] = server_seconds(image)
        locs = clients.image_locations(stack, image_id)
        result['image_volume_gib'] = image_volume_gib(api, locs)
        result.update(_register_aliases(stack, image_id, locs))
        start = time.monotonic()
        requested = _create_volumes(api, image_id, flow['type'], tag, count,
                                    size_gib, volume_ids)
        result.update(_wait_available(stack, api, requested, start,
                                      args.timeout))
        result.update(_inspect_clones(stack, flow['pool'], volume_ids))
    except (svc.StackError, guest_common.GuestError, OSError,
            subprocess.SubprocessError) as e:
        result['error'] = str(e)
    finally:
        if not args.keep:
            _cleanup(stack, api, image_id, volume_ids)
    return result


def _upload(stack, api, tag, flow, image_path):
    """The image uploaded (raw) or imported (qcow2); (id, Glance record)."""
    if flow.get('disk_format') == 'qcow2':
        # The data on stdin: glance refuses --file with a stdin that is not
        # a terminal, as in any script.
        with open(make_qcow2(image_path), 'rb') as data:
            out = clients.cli(stack, 'glance', 'image-create-via-import',
                              '--name', tag, '--disk-format', 'qcow2',
                              '--container-format', 'bare', '--stores',
                              flow['store'], stdin=data)
        image_id = clients.table_value(out, 'id')
        return image_id, api.wait_image_active(image_id)
    out = clients.cli(stack, 'glance', 'image-create', '--name', tag,
                      '--disk-format', 'raw', '--container-format', 'bare',
                      '--file', image_path, '--store', flow['store'])
    image_id = clients.table_value(out, 'id')
    image = api.image(image_id)
    if image['status'] != 'active':
        raise svc.StackError('image %s is %s after upload'
                             % (image_id, image['status']))
    return image_id, image


def image_volume_gib(api, locs):
    """GiB of the Cinder volume(s) the image's locations name (quota)."""
    ids = clients.image_volume_ids(locs)
    return sum(v['size'] for v in api.volumes(ids).values()) if ids else 0


def _register_aliases(stack, image_id, locs):
    """The admin calls a thunder:// image needs: its aliases, timed."""
    if not any(loc['url'].startswith('thunder://') for loc in locs):
        return {'admin_calls': 0}
    t1 = time.monotonic()
    added = clients.register_aliases(stack, image_id, locs)
    return {'aliases': added, 'aliases_s': time.monotonic() - t1,
            'admin_calls': len(added)}


def zero_copy_without_admin(run):
    """Whether a run's volumes were all CoW clones, no admin call made."""
    return (not run.get('error') and run.get('admin_calls') == 0 and
            run.get('clones') == run['volumes'] and
            run.get('bytes_copied') == 0)


def _create_volumes(api, image_id, volume_type, tag, count, size_gib,
                    volume_ids):
    """Ask for ``count`` volumes at once; {id: time requested}.

    ``volume_ids`` gets every volume made, even when some requests fail.
    """
    def create(i):
        sent = time.monotonic()
        return api.create_volume('%s-%02d' % (tag, i), size_gib, image_id,
                                 volume_type), sent

    requested = {}
    failures = []
    with futures.ThreadPoolExecutor(min(count, CREATE_CONCURRENCY)) as pool:
        for job in [pool.submit(create, i) for i in range(count)]:
            try:
                vid, sent = job.result()
            except (OSError, ValueError) as e:
                failures.append(str(e))
                continue
            volume_ids.append(vid)
            requested[vid] = sent
    if failures:
        raise svc.StackError('%d of %d volume requests failed: %s' % (
            len(failures), count, failures[0]))
    return requested


def _wait_available(stack, api, requested, start, timeout):
    done = {}
    server = {}
    deadline = start + timeout
    while len(done) < len(requested) and time.monotonic() < deadline:
        now = time.monotonic()
        for vid, vol in api.volumes(set(requested)).items():
            if vid in done:
                continue
            if vol['status'] == 'available':
                done[vid] = now - requested[vid]
                server[vid] = server_seconds(vol)
            elif vol['status'] == 'error':
                raise svc.StackError('volume %s went to error; see %s' % (
                    vid, stack.path('log', 'cinder-volume.log')))
        time.sleep(0.25)
    total = time.monotonic() - start
    if len(done) < len(requested):
        raise svc.StackError('%d of %d volumes not available after %ss' % (
            len(requested) - len(done), len(requested), timeout))
    times = list(done.values())
    return {'total_s': total, 'mean_s': sum(times) / len(times),
            'max_s': max(times), 'server_max_s': max(server.values()),
            'server_mean_s': sum(server.values()) / len(server)}


def _inspect_clones(stack, pool, volume_ids):
    copied = 0
    parents = set()
    clones = 0
    for vid in volume_ids:
        rbd_name = 'volume-%s' % vid
        copied += clients.own_bytes(stack, pool, rbd_name)
        parent = clients.parent_of(stack, pool, rbd_name)
        if parent:
            clones += 1
            parents.add(parent)
    # Snapshots the clones hang from, on their parent images: one for
    # every clone, or one for all.
    snaps = 0
    for image in {p.split('@')[0] for p in parents}:
        snaps += len(clients.rbd_json(stack, 'snap', 'ls', image))
    return {'bytes_copied': copied, 'clones': clones,
            'parents': sorted(parents), 'parent_snapshots': snaps}


def _cleanup(stack, api, image_id, volume_ids):
    for vid in volume_ids:
        try:
            api.delete_volume(vid)
        except OSError:
            pass
    deadline = time.monotonic() + 600
    while volume_ids and time.monotonic() < deadline:
        if not api.volumes(set(volume_ids)):
            break
        time.sleep(1)
    if image_id:
        try:
            clients.cli(stack, 'glance', 'image-delete', image_id)
        except svc.StackError:
            pass


def run_all(stack, api, names, image_path, args, log=svc.log):
    """Every flow for every volume count, ``args.rounds`` times, interleaved.

    Returns the runs (each with its ``round``), in the order they ran.
    """
    runs = []
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        order = names[shift:] + names[:shift]
        for count in args.volumes:
            for name in order:
                log('demo round %d/%d, flow %s: uploading %d MiB, then %d '
                    'volumes' % (round_ + 1, args.rounds, name,
                                 args.image_size_mib, count))
                result = run_flow(stack, api, name, image_path, args,
                                  count)
                result['round'] = round_ + 1
                runs.append(result)
    return runs


def summarize(runs):
    """Per (volumes, flow): medians and (min, max) of every measure."""
    groups = {}
    for run in runs:
        groups.setdefault((run['volumes'], run['flow']), []).append(run)
    summary = []
    for (count, name), group in groups.items():
        good = [r for r in group if not r.get('error')]
        entry = {'flow': name, 'volumes': count, 'store': group[0]['store'],
                 'type': group[0]['type'], 'rounds': len(group),
                 'failed': len(group) - len(good),
                 'bytes_copied': sum(r.get('bytes_copied', 0) for r in good),
                 'clones': sum(r.get('clones', 0) for r in good),
                 'volumes_made': sum(r['volumes'] for r in good),
                 'admin_calls': sum(r.get('admin_calls', 0) for r in good),
                 'zero_copy_runs': sum(map(zero_copy_without_admin, good)),
                 'good': len(good)}
        gib = [r['image_volume_gib'] for r in good
               if 'image_volume_gib' in r]
        if gib:
            entry['image_volume_gib'] = statistics.median(gib)
        for key, _column, _fmt in MEASURES:
            values = [r[key] for r in good if key in r]
            if values:
                entry[key] = statistics.median(values)
                entry[key + '_range'] = (min(values), max(values))
        summary.append(entry)
    return summary


def goals(summary):
    """thunder against :data:`BASELINE`, per volume count: (text, met, how)."""
    found = {(s['volumes'], s['flow']): s for s in summary}
    lines = []
    for count in sorted({s['volumes'] for s in summary}):
        ours, theirs = found.get((count, 'thunder')), found.get(
            (count, BASELINE))
        lines.extend(_baseline_goals(count, ours, theirs))
        imported = found.get((count, 'thunder-import'))
        if ours and imported and 'upload_s' in ours and (
                'upload_s' in imported):
            ratio = imported['upload_s'] / ours['upload_s']
            lines.append((
                'thunder qcow2 import <= %gx the raw upload (medians, '
                '%d-volume runs)' % (IMPORT_RATIO_GOAL, count),
                ratio <= IMPORT_RATIO_GOAL,
                '%.1f s vs %.1f s: %.2fx' % (imported['upload_s'],
                                             ours['upload_s'], ratio)))
    return lines


def _baseline_goals(count, ours, theirs):
    """thunder's total and upload against the baseline's, for one count."""
    if not ours or not theirs or 'total_s' not in ours or (
            'total_s' not in theirs):
        return []
    return [
        ('thunder total for %d volumes <= %s (medians)' % (count, BASELINE),
         ours['total_s'] <= theirs['total_s'],
         '%.2f s vs %.2f s' % (ours['total_s'], theirs['total_s'])),
        ('thunder upload MiB/s >= %s (medians, %d-volume runs)' % (
            BASELINE, count),
         ours['upload_mib_s'] >= theirs['upload_mib_s'],
         '%.0f vs %.0f MiB/s' % (ours['upload_mib_s'],
                                 theirs['upload_mib_s']))]


def human(n):
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if n < 1024 or unit == 'GiB':
            return ('%d %s' % (n, unit) if unit == 'B'
                    else '%.1f %s' % (n, unit))
        n /= 1024.0


def _cell(entry, key, fmt):
    if key not in entry:
        return '-'
    low, high = entry[key + '_range']
    if entry['rounds'] - entry['failed'] < 2:
        return fmt % entry[key]
    return '%s (%s-%s)' % (fmt % entry[key], fmt % low, fmt % high)


def print_table(runs, args, goal_line):
    summary = summarize(runs)
    print()
    print('Volumes from one %d MiB raw image (thunder-import: as qcow2), '
          'created at once; %d round(s), flows interleaved; median (min-max)'
          % (args.image_size_mib, args.rounds))
    header = (('N', 'flow', 'glance store', 'volume type') +
              tuple(column for _key, column, _fmt in MEASURES) +
              ('bytes copied', 'CoW clones', 'admin calls',
               'zero-copy, no admin', 'image-vol GiB', 'failed'))
    rows = []
    for s in summary:
        rows.append((s['volumes'], s['flow'], s['store'], s['type']) + tuple(
            _cell(s, key, fmt) for key, _column, fmt in MEASURES) + (
            human(s['bytes_copied']),
            '%d/%d' % (s['clones'], s['volumes_made']),
            s['admin_calls'],
            '%d/%d runs' % (s['zero_copy_runs'], s['good']),
            '%g' % s['image_volume_gib'] if 'image_volume_gib' in s
            else '-',
            '%d/%d' % (s['failed'], s['rounds'])))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header,) + tuple(rows):
        print('  '.join(str(x).ljust(w) for x, w in zip(row, widths)))
    for run in runs:
        if run.get('note'):
            print('note (%s): %s' % (run['flow'], run['note']))
            break
    aliases = [r for r in runs if r.get('aliases')]
    if aliases:
        print('%s: thunder:// image, aliases (%s) added by %d admin calls '
              'in %.1f s median (not in the upload time)' % (
                  aliases[0]['flow'],
                  ', '.join(u.split('://')[0] + '://'
                            for u in aliases[0]['aliases']),
                  len(aliases[0]['aliases']),
                  statistics.median(r['aliases_s'] for r in aliases)))
    for run in runs:
        if run.get('error'):
            print('error (round %d, %s, %d volumes): %s' % (
                run['round'], run['flow'], run['volumes'], run['error']))
    print('upload: glance image-create --file, client clock; upload srv: '
          'Glance created_at -> active. vol mean/max: each POST /volumes -> '
          'available (client); total: first request -> last available; vol '
          'srv max: Cinder created_at -> available (server clocks, whole '
          'seconds).')
    print('bytes copied: data the new volumes own in Ceph (rbd du), all '
          'rounds. admin calls: glance location-add calls before cloning, '
          'all rounds; zero-copy, no admin: runs with every volume a CoW '
          'clone and no admin call. image-vol GiB: the Cinder volume '
          'holding the image (volume quota used; 0: none).')
    for text, met, how in goals(summary):
        print(goal_line(text, met, how))
    return summary
