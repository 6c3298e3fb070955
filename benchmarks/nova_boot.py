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

"""N servers at once through Nova: thunder against Nova's own RBD paths.

Runs against the local stack (``tools/thunder-stack up``), with the
stack's Python (also ``tools/thunder-stack demo --nova``)::

    .stack/venv/bin/python benchmarks/nova_boot.py [--counts 1,4,8]
        [--rounds 3] [--flows thunder,ephemeral,rbd-volume]
        [--budget-minutes M] [--out DIR]

The guest image of :mod:`thunder_stack.guest` is uploaded once per flow:

``thunder``
    Glance's thunder store; servers boot from volumes of the ``thunder``
    type (ThunderDriver clones the image-volume's sealed snapshot).
``ephemeral``
    Glance's rbd store; servers boot from the image on Nova's ephemeral
    disks in Ceph (``[libvirt] images_type = rbd``: Nova clones the image
    it finds through Glance's ``direct_url``).
``rbd-volume``
    Glance's cinder store (image-volumes of the ``rbd`` type); servers boot
    from volumes of the ``rbd`` type (Cinder's RBDDriver clones the
    image-volume).

For every round, N and flow (the flows in a different order every round),
one compute API request (``min_count`` = ``max_count`` = N, flavor
``tiny``, no network) creates N servers; the benchmark polls the API until
every server is ACTIVE and its console (``os-getConsoleOutput``, what
``openstack console log show`` reads) shows the guest's marker, records
each server's times from the request, what its disk owns in Ceph (``rbd
du``) when it turns ACTIVE (bytes copied: the guest has not written yet)
and at its marker, whether it is a copy-on-write clone, and the RBD
snapshots the run added; then deletes the servers (their volumes go with
them) and waits until they and their volumes are gone. Everything it
created is deleted on failure, Ctrl-C and SIGTERM too.

Writes ``servers.csv`` (a row per server), ``runs.csv`` (a row per run),
``results.txt`` (the table of medians over the rounds, with the command,
machine and date) and, with matplotlib, ``marker.png`` and ``active.png``
into ``--out``.
"""

import argparse
import csv
import datetime
import json
import os
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import blockdev_mechanisms as bm  # noqa: E402
from benchmarks import cache_io  # noqa: E402
from thunder_stack import clients  # noqa: E402
from thunder_stack import demo  # noqa: E402
from thunder_stack import flows  # noqa: E402
from thunder_stack import guest as guest_mod  # noqa: E402
from thunder_stack import layout  # noqa: E402
from thunder_stack import services as svc  # noqa: E402
from thunder_stack import stack as stack_mod  # noqa: E402

#: flow -> Glance store of its image, volume type (None: Nova's ephemeral
#: disk), RBD pool of the servers' disks.
FLOWS = {
    'thunder': {'store': 'thunder', 'type': layout.THUNDER_BACKEND,
                'pool': layout.POOLS['thunder']},
    'ephemeral': {'store': layout.RBD_BACKEND, 'type': None,
                  'pool': layout.POOLS['nova']},
    'rbd-volume': {'store': layout.CINDER_STORE,
                   'type': layout.RBD_BACKEND,
                   'pool': layout.POOLS['rbd']},
}
BASELINE = 'ephemeral'
GOAL_FLOW = 'thunder'
FLAVOR = 'tiny'
MICROVERSION = '2.67'       # networks "none" (2.37), BDM volume_type (2.67)
POLL = 1.0
SERVER_COLUMNS = ('round', 'flow', 'n', 'server', 'active_s', 'marker_s',
                  'copied_bytes', 'after_boot_bytes', 'clone', 'error')
RUN_COLUMNS = ('round', 'flow', 'n', 'order', 'ok', 'active_mean',
               'active_max', 'marker_mean', 'marker_max', 'copied_bytes',
               'after_boot_bytes', 'clones', 'snapshots', 'seconds',
               'error')
MiB = 1024 * 1024


def log(message):
    print('.. %s' % message, file=sys.stderr, flush=True)


# -- statistics and tables (no side effects) ------------------------------

def parse_counts(text):
    """``"1,4,8"`` -> [1, 4, 8]; ValueError on anything else."""
    counts = [int(c) for c in text.split(',') if c.strip()]
    if not counts or any(c < 1 for c in counts):
        raise ValueError('counts must be positive integers: %r' % text)
    return counts


def parse_flows(text):
    flows = [f.strip() for f in text.split(',') if f.strip()]
    unknown = [f for f in flows if f not in FLOWS]
    if not flows or unknown:
        raise ValueError('unknown flow(s) %s (choose from %s)' % (
            ', '.join(unknown) or '(none)', ', '.join(FLOWS)))
    return flows


def flow_order(flows, round_index):
    """The flows rotated by the round: each runs first in turn."""
    k = round_index % len(flows)
    return flows[k:] + flows[:k]


def another_round_fits(elapsed, rounds_done, budget):
    """Whether a round as long as the mean so far ends within ``budget``."""
    if budget is None or rounds_done == 0:
        return True
    return elapsed + elapsed / rounds_done <= budget


def run_line(row):
    """A run's figures in one line, for the progress."""
    line = '%d/%d ready, marker mean %s s, max %s s, copied %s, %d ' \
        'snapshots, %.0f s' % (row['ok'], row['n'], _cell(row['marker_mean']),
                               _cell(row['marker_max']),
                               human(row['copied_bytes']), row['snapshots'],
                               row['seconds'])
    return line + ('; FAILED: %s' % row['error'] if row['error'] else '')


def run_row(round_index, flow, n, order, servers, snapshots, seconds,
            error=None):
    """A run's figures from its servers' rows (only those that booted)."""
    ok = [s for s in servers if s['marker_s'] is not None]

    def agg(key, func):
        values = [s[key] for s in ok if s[key] is not None]
        return func(values) if values else None

    return {'round': round_index, 'flow': flow, 'n': n, 'order': order,
            'ok': len(ok), 'active_mean': agg('active_s', statistics.mean),
            'active_max': agg('active_s', max),
            'marker_mean': agg('marker_s', statistics.mean),
            'marker_max': agg('marker_s', max),
            'copied_bytes': sum(s['copied_bytes'] or 0 for s in servers),
            'after_boot_bytes': sum(s['after_boot_bytes'] or 0
                                    for s in servers),
            'clones': sum(1 for s in servers if s['clone']),
            'snapshots': snapshots, 'seconds': round(seconds, 1),
            'error': error or ''}


def summarize(runs):
    """Per (flow, N): medians over the rounds and min-max spreads."""
    groups = {}
    for r in runs:
        groups.setdefault((r['flow'], r['n']), []).append(r)
    out = []
    for (flow, n), rows in groups.items():
        good = [r for r in rows if not r['error'] and r['ok'] == n]

        def med(key):
            values = [r[key] for r in good if r[key] is not None]
            return statistics.median(values) if values else None

        def spread(key):
            values = [r[key] for r in good if r[key] is not None]
            return (min(values), max(values)) if values else None

        out.append({
            'flow': flow, 'n': n, 'rounds': len(rows), 'good': len(good),
            'active_mean': med('active_mean'),
            'active_max': med('active_max'),
            'marker_mean': med('marker_mean'),
            'marker_mean_spread': spread('marker_mean'),
            'marker_max': med('marker_max'),
            'marker_max_spread': spread('marker_max'),
            'copied_max': max([r['copied_bytes'] for r in rows],
                              default=0),
            'after_boot': med('after_boot_bytes'),
            'clones': sum(r['clones'] for r in rows),
            'servers': n * len(rows),
            'snapshots': sum(r['snapshots'] for r in rows),
            'errors': sorted({r['error'] for r in rows if r['error']}),
        })
    out.sort(key=lambda s: (s['n'], list(FLOWS).index(s['flow'])))
    return out


def _cell(value, fmt='%.1f'):
    return '-' if value is None else fmt % value


def _spread(pair):
    return '-' if pair is None else '%.1f-%.1f' % pair


def human(n):
    return flows.human(n) if n is not None else '-'


def table(summaries):
    """The side-by-side table: one line per (N, flow)."""
    fmt = '%2s  %-10s %6s %9s %8s %6s %11s %8s %11s %9s %9s %7s %6s'
    lines = [fmt % ('N', 'flow', 'rounds', 'active', 'active', 'marker',
                    'marker', 'marker', 'marker', 'copied', 'written',
                    'clones', 'snaps'),
             fmt % ('', '', 'ok', 'mean s', 'max s', 'mean s', 'spread',
                    'max s', 'spread', '(max)', 'by guest', '', '')]
    for s in summaries:
        lines.append(fmt % (
            s['n'], s['flow'], '%d/%d' % (s['good'], s['rounds']),
            _cell(s['active_mean']), _cell(s['active_max']),
            _cell(s['marker_mean']), _spread(s['marker_mean_spread']),
            _cell(s['marker_max']), _spread(s['marker_max_spread']),
            human(s['copied_max']), human(s['after_boot']),
            '%d/%d' % (s['clones'], s['servers']), s['snapshots']))
    return lines


def goals(summaries, n=8):
    """Issue 12's shared-mode goal at N = ``n``: (text, met, measured).

    "Within noise": thunder's median of the mean times to the marker is
    at most the slowest round of the baseline's.
    """
    by = {(s['flow'], s['n']): s for s in summaries}
    ours, base = by.get((GOAL_FLOW, n)), by.get((BASELINE, n))
    if not ours or not base:
        return []
    out = []
    if ours['marker_mean'] is None or base['marker_mean_spread'] is None:
        out.append(('N=%d request -> marker no slower than %s' % (
            n, BASELINE), False, 'no complete run to compare'))
    else:
        met = ours['marker_mean'] <= base['marker_mean_spread'][1]
        out.append((
            'N=%d request -> marker no slower than %s (within noise)' % (
                n, BASELINE), met,
            '%s median %.1f s vs %s median %.1f s (rounds %.1f-%.1f)' % (
                GOAL_FLOW, ours['marker_mean'], BASELINE,
                base['marker_mean'], base['marker_mean_spread'][0],
                base['marker_mean_spread'][1])))
    out.append(('N=%d 0 bytes copied' % n, ours['copied_max'] == 0 and
                ours['good'] > 0, 'at most %s per run' % human(
                    ours['copied_max'])))
    return out


def goal_lines(results):
    return [demo.goal_line(*result) for result in results]


def write_csv(rows, columns, path):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, columns, extrasaction='ignore')
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ('' if v is None else round(v, 3)
                                 if isinstance(v, float) else v)
                             for k, v in row.items()})


def read_runs(path):
    """runs.csv back into rows (numbers as numbers, blanks as None)."""
    ints = ('round', 'n', 'ok', 'copied_bytes', 'after_boot_bytes',
            'clones', 'snapshots')
    rows = []
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key in ('flow', 'order', 'error'):
                    continue
                if value == '':
                    row[key] = None
                else:
                    row[key] = int(value) if key in ints else float(value)
            rows.append(row)
    return rows


def plot(summaries, out):
    try:
        import matplotlib
        matplotlib.use('Agg')
        from matplotlib import pyplot
    except ImportError:
        return 'matplotlib is not installed: no plots'
    charts = (('marker.png', 'marker', 'request -> marker on the console '
               '(s)'), ('active.png', 'active', 'request -> ACTIVE (s)'))
    for name, key, ylabel in charts:
        fig, ax = pyplot.subplots(figsize=(7, 4.5))
        for i, flow in enumerate(FLOWS):
            rows = [s for s in summaries if s['flow'] == flow and
                    s[key + '_mean'] is not None]
            if not rows:
                continue
            ns = [s['n'] for s in rows]
            ax.plot(ns, [s[key + '_mean'] for s in rows], 'o-',
                    color='C%d' % i, label='%s, mean' % flow)
            ax.plot(ns, [s[key + '_max'] for s in rows], 's--',
                    color='C%d' % i, alpha=0.6, label='%s, max' % flow)
            spreads = [s.get(key + '_mean_spread') for s in rows]
            if all(spreads):
                ax.vlines(ns, [p[0] for p in spreads],
                          [p[1] for p in spreads], color='C%d' % i,
                          alpha=0.4)
        ax.set_xlabel('servers requested at once (N)')
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({s['n'] for s in summaries}))
        ax.set_ylim(bottom=0)
        ax.set_title('medians over the rounds (bars: min-max of the '
                     'round means)', fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=100)
        pyplot.close(fig)
    return 'plots: %s' % ', '.join(c[0] for c in charts)


# -- the stack ----------------------------------------------------------------

class Compute:
    """The compute API over HTTP with the stack's admin token."""

    def __init__(self, stack):
        self.stack = stack
        self.api = clients.Api(stack)

    def call(self, method, path, body=None, ok=(200, 201, 202, 204)):
        for attempt in (1, 2):
            req = urllib.request.Request(
                self.stack.url('nova') + '/v2.1' + path, method=method,
                data=None if body is None else json.dumps(body).encode(),
                headers={'X-Auth-Token': self.api.token,
                         'Content-Type': 'application/json',
                         'OpenStack-API-Version': 'compute ' +
                         MICROVERSION})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    data = resp.read()
                    return json.loads(data) if data else None
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 1:
                    self.api = clients.Api(self.stack)     # token expired
                    continue
                if e.code in ok:
                    return None
                raise svc.StackError('%s %s: %s %s' % (
                    method, path, e.code, e.read()[-1000:].decode(
                        'utf-8', 'replace')))

    def create(self, name, image_id, n, volume_type):
        server = {'name': name, 'flavorRef': self.flavor(),
                  'networks': 'none', 'min_count': n, 'max_count': n}
        if volume_type:
            server['imageRef'] = ''
            server['block_device_mapping_v2'] = [{
                'source_type': 'image', 'uuid': image_id,
                'destination_type': 'volume', 'volume_size': 1,
                'volume_type': volume_type, 'boot_index': 0,
                'delete_on_termination': True}]
        else:
            server['imageRef'] = image_id
        server['return_reservation_id'] = True
        return self.call('POST', '/servers', {'server': server})

    def flavor(self):
        for f in self.call('GET', '/flavors')['flavors']:
            if f['name'] == FLAVOR:
                return f['id']
        raise svc.StackError('no flavor %r' % FLAVOR)

    def servers(self, reservation_id):
        return self.call('GET', '/servers/detail?reservation_id=%s'
                         % reservation_id)['servers']

    def console(self, server_id):
        """The console log ('' while the guest has none yet)."""
        out = self.call('POST', '/servers/%s/action' % server_id,
                        {'os-getConsoleOutput': {}}, ok=(404, 409))
        return (out or {}).get('output') or ''

    def delete(self, server_id):
        self.call('DELETE', '/servers/%s' % server_id, ok=(404,))

    def exists(self, server_id):
        try:
            self.call('GET', '/servers/%s' % server_id)
        except svc.StackError as e:
            if ': 404 ' in str(e):
                return False
            raise
        return True


def rbd_state(stack, pools):
    """{pool: ({image: own bytes}, set of image@snap)} of the pools."""
    state = {}
    for pool in pools:
        images, snaps = {}, set()
        for entry in clients.rbd_json(stack, 'ls', '-l', pool) or []:
            if entry.get('snapshot'):
                snaps.add('%s@%s' % (entry['image'], entry['snapshot']))
        du = clients.rbd_json(stack, 'du', '-p', pool) or {}
        for entry in du.get('images', []):
            if not entry.get('snapshot'):
                images[entry['name']] = entry['used_size']
        state[pool] = (images, snaps)
    return state


def snapshot_count(state):
    return sum(len(snaps) for _, snaps in state.values())


def disk_of(flow, server):
    """The RBD image name of a server's root disk (None if not known)."""
    if FLOWS[flow]['type'] is None:
        return '%s_disk' % server['id']
    attached = server.get('os-extended-volumes:volumes_attached') or []
    return 'volume-%s' % attached[0]['id'] if attached else None


class Bench:
    """The images, the runs, and the cleanup of everything made."""

    def __init__(self, stack, args):
        self.stack = stack
        self.args = args
        self.compute = Compute(stack)
        self.client_images = []
        self.images = {}
        self.servers = {}           # id -> volume ids seen
        self.server_rows = []
        self.runs = []
        self.volumes_left = set()
        self.rounds_done = 0
        self.pools = sorted({FLOWS[f]['pool'] for f in FLOWS} |
                            {layout.POOLS['images']})

    def run(self, cmd, **kwargs):
        return clients.cli(self.stack, *cmd, **kwargs)

    def prepare(self):
        if 'thunder' in self.args.flows and \
                not self.stack.state.get('thunder_store'):
            raise svc.StackError('the thunder Glance store is not '
                                 'enabled on this stack')
        image = guest_mod.build(self.stack.path('data', 'guest'))
        self.marker = image.marker
        for flow in self.args.flows:
            store = FLOWS[flow]['store']
            log('uploading the guest image (%s) to Glance\'s %s store' % (
                flows.human(os.path.getsize(image.path)), store))
            out = self.run(['glance', 'image-create', '--name',
                            'nova-boot-%s' % flow, '--disk-format', 'raw',
                            '--container-format', 'bare', '--file',
                            image.path, '--store', store])
            image_id = clients.table_value(out, 'id')
            self.client_images.append(image_id)
            if clients.table_value(out, 'status') != 'active':
                raise svc.StackError('image %s not active' % image_id)
            self.images[flow] = image_id

    def run_all(self):
        total = self.args.rounds * len(self.args.counts) * len(
            self.args.flows)
        budget = (self.args.budget_minutes * 60
                  if self.args.budget_minutes else None)
        started = time.monotonic()
        for r in range(self.args.rounds):
            if not another_round_fits(time.monotonic() - started, r,
                                      budget):
                log('stopping after %d round(s): another would end past '
                    '--budget-minutes %s' % (r, self.args.budget_minutes))
                break
            order = flow_order(self.args.flows, r)
            for n in self.args.counts:
                for flow in order:
                    log('run %d/%d: round %d, N=%d, %s' % (
                        len(self.runs) + 1, total, r + 1, n, flow))
                    row = self.run_one(r + 1, flow, n, ','.join(order))
                    self.runs.append(row)
                    log('  ' + run_line(row))
            self.rounds_done = r + 1

    def run_one(self, round_index, flow, n, order):
        spec = FLOWS[flow]
        started = time.monotonic()
        before = rbd_state(self.stack, self.pools)
        rows = {}
        error = None
        snapshots = 0
        try:
            sent = time.monotonic()
            res = self.compute.create('nova-boot-%s-%d-r%d' % (flow, n,
                                                               round_index),
                                      self.images[flow], n, spec['type'])
            self.wait(res['reservation_id'], flow, n, sent, round_index,
                      rows)
            after = rbd_state(self.stack, self.pools)
            snapshots = snapshot_count(after) - snapshot_count(before)
            images = after[spec['pool']][0]
            for row in rows.values():
                if row.get('disk') in images:
                    row['after_boot_bytes'] = images[row['disk']]
        except svc.StackError as e:
            error = str(e).splitlines()[0][:300]
        finally:
            self.delete_servers()
        servers = [rows[k] for k in sorted(rows)]
        for row in servers:
            self.server_rows.append(row)
        if not error and len(servers) != n:
            error = '%d of %d servers' % (len(servers), n)
        return run_row(round_index, flow, n, order, servers, snapshots,
                       time.monotonic() - started, error)

    def wait(self, reservation_id, flow, n, sent, round_index, rows):
        """Poll until every server shows its marker; rows: {id: row}."""
        spec = FLOWS[flow]
        deadline = sent + self.args.timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            servers = self.compute.servers(reservation_id)
            new_active = []
            for s in servers:
                volumes = self.servers.setdefault(s['id'], set())
                for v in s.get('os-extended-volumes:volumes_attached') or []:
                    volumes.add(v['id'])
                row = rows.setdefault(s['id'], {
                    'round': round_index, 'flow': flow, 'n': n,
                    'server': s['id'], 'active_s': None, 'marker_s': None,
                    'copied_bytes': None, 'after_boot_bytes': None,
                    'clone': None, 'error': '', 'disk': None})
                if s['status'] == 'ERROR':
                    raise svc.StackError('server %s ERROR: %s' % (
                        s['id'], (s.get('fault') or {}).get('message')))
                if s['status'] == 'ACTIVE' and row['active_s'] is None:
                    row['active_s'] = now - sent
                    row['disk'] = disk_of(flow, s)
                    new_active.append(row)
            if new_active:
                self.measure_disks(spec['pool'], new_active)
            for row in rows.values():
                if row['active_s'] is None or row['marker_s'] is not None:
                    continue
                console = self.compute.console(row['server'])
                if self.marker in console:
                    row['marker_s'] = time.monotonic() - sent
                elif guest_mod.failure_seen(console):
                    raise svc.StackError('guest of %s failed: %s' % (
                        row['server'], guest_mod.failure_seen(console)))
            ready = sum(1 for r in rows.values() if r['marker_s'])
            active = sum(1 for r in rows.values() if r['active_s'])
            self.progress(flow, n, len(servers), active, ready,
                          time.monotonic() - sent)
            if len(rows) == n and ready == n:
                return
            time.sleep(POLL)
        raise svc.StackError('%d of %d servers not ready after %d s'
                             % (n - sum(1 for r in rows.values()
                                        if r['marker_s']), n,
                                self.args.timeout))

    def measure_disks(self, pool, rows):
        """Bytes the new disks own at ACTIVE, and whether they are clones."""
        images = rbd_state(self.stack, [pool])[pool][0]
        for row in rows:
            name = row['disk']
            if name is None or name not in images:
                row['error'] = 'disk %s not found in %s' % (name, pool)
                continue
            row['copied_bytes'] = images[name]
            row['clone'] = clients.parent_of(
                self.stack, pool, name) is not None

    def progress(self, flow, n, created, active, ready, seconds):
        line = '   %-10s N=%d: %d created, %d active, %d ready, %5.0f s' % (
            flow, n, created, active, ready, seconds)
        if sys.stderr.isatty():
            sys.stderr.write('\r\033[K' + line)
            if ready == n:
                sys.stderr.write('\n')
            sys.stderr.flush()

    def delete_servers(self):
        """Delete every server made and wait for them and their volumes."""
        for server_id in list(self.servers):
            try:
                self.compute.delete(server_id)
            except svc.StackError as e:
                log('deleting server %s: %s' % (server_id, e))
        deadline = time.monotonic() + self.args.timeout
        while self.servers and time.monotonic() < deadline:
            for server_id in list(self.servers):
                if not self.compute.exists(server_id):
                    self.volumes_left |= self.servers.pop(server_id)
            time.sleep(POLL)
        if self.servers:
            raise svc.StackError('servers not deleted in %d s: %s' % (
                self.args.timeout, ', '.join(self.servers)))
        self.delete_volumes()

    def delete_volumes(self):
        """Volumes of deleted servers Nova did not delete (failed boots)."""
        left = self.volumes_left
        deadline = time.monotonic() + self.args.timeout
        while left and time.monotonic() < deadline:
            present = self.compute.api.volumes(left)
            left &= set(present)
            for vid, vol in present.items():
                if vol['status'] in ('available', 'error'):
                    self.run(['cinder', 'delete', vid], timeout=120)
            if left:
                time.sleep(POLL)
        if left:
            raise svc.StackError('volumes left: %s' % ', '.join(left))

    def cleanup(self):
        try:
            self.delete_servers()
        finally:
            for image_id in self.client_images:
                try:
                    self.run(['glance', 'image-delete', image_id])
                except svc.StackError as e:
                    log('deleting image %s: %s' % (image_id, e))


# -- main ---------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--counts', default='1,4,8', type=parse_counts,
                        help='servers per request (default 1,4,8)')
    parser.add_argument('--rounds', type=int, default=3,
                        help='repetitions of every (N, flow) (default 3)')
    parser.add_argument('--flows', default=','.join(FLOWS),
                        type=parse_flows,
                        help='among %s (default: all)' % ', '.join(FLOWS))
    parser.add_argument('--timeout', type=int, default=900,
                        help='seconds a run may take to boot, and to '
                        'delete (default 900)')
    parser.add_argument('--out', default=os.path.join(
        layout.stack_dir(), 'data', 'demo', 'nova-boot'),
        help='results directory (default: data/demo/nova-boot of the '
        'stack)')
    parser.add_argument('--budget-minutes', type=float,
                        help='start no round that would end after this '
                        'many minutes (judged by the rounds so far)')
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')
    return args


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    stack = stack_mod.Stack()
    if not stack.is_up():
        print('nova_boot: the local stack is not up (tools/thunder-stack '
              'up)', file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    bench = Bench(stack, args)
    started = time.monotonic()
    load_start = bm.load_average()
    failed = False
    try:
        bench.prepare()
        bench.run_all()
    except (svc.StackError, OSError, guest_mod.GuestError) as e:
        print('\nnova_boot: FAILED: %s' % e, file=sys.stderr)
        failed = True
    finally:
        log('deleting what the benchmark made')
        bench.cleanup()
    if not bench.runs:
        return 1
    return report(bench, args, started, load_start, argv) or int(failed)


def report(bench, args, started, load_start, argv):
    summaries = summarize(bench.runs)
    results = goals(summaries)
    command = 'python benchmarks/nova_boot.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv)
    lines = [
        'Servers through Nova, N at once (flavor %s, no network), guest '
        'image of thunder_stack.guest; medians over %d round(s)'
        % (FLAVOR, bench.rounds_done),
        'command: %s' % command.strip(),
        'machine: %s; %s; load average %s at the start, %s at the end' % (
            cache_io.machine(),
            datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), load_start,
            bm.load_average()),
        ''] + table(summaries) + [''] + goal_lines(results) + [
        '',
        'active/marker: from the request to ACTIVE / to the marker on the '
        'console, mean and max over the N servers of a run, median over '
        'the rounds; spread: min-max of the rounds.',
        'copied: what the new disks own in Ceph (rbd du) when ACTIVE, the '
        'largest run; written by guest: what they own at the marker '
        '(median); clones: copy-on-write clones among the servers; snaps: '
        'RBD snapshots the runs added (all rounds).']
    print('\n' + '\n'.join(lines))
    os.makedirs(args.out, exist_ok=True)
    write_csv(bench.server_rows, SERVER_COLUMNS,
              os.path.join(args.out, 'servers.csv'))
    write_csv(bench.runs, RUN_COLUMNS, os.path.join(args.out, 'runs.csv'))
    with open(os.path.join(args.out, 'results.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    note = plot(summaries, args.out)
    print('\nresults in %s (servers.csv, runs.csv, results.txt); %s; '
          '%.0f s in all' % (args.out, note, time.monotonic() - started))
    failed = any(r['error'] for r in bench.runs)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
