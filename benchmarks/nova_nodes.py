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

"""Peer mode against Nova's image cache, through Nova, on emulated nodes.

Needs the local stack and its compute nodes up (as root)::

    tools/thunder-stack up
    tools/thunder-stack nodes up --count 2 --link-mbit 100
    python benchmarks/nova_nodes.py [--rounds 1] [--image-mib 64]
        [--out doc/source/nova-nodes]

Every round uploads the guest image (:mod:`thunder_stack.guest`) anew to
the thunder store, so that every flow starts cold, then boots one server
per node, all at once, through the Nova API, in each flow:

peer
    from a new thunder-peer volume of the image in the node's zone
    (``--block-device ...volume_type=thunder-peer``): the nodes' caches
    fetch the chunks the boot reads, from each other (advertised) or the
    image-volume;
image-cache
    from the image (``--image``), on the node's local disk
    (``[libvirt] images_type = qcow2``): each node's nova-compute downloads
    the whole image from Glance into ``_base`` first;
pre-cache
    ``openstack aggregate cache image`` to every node's aggregate first
    (compute API 2.81; the nodes download the image ahead of the boots:
    the time to warm is measured until every node's ``_base`` holds it),
    then as image-cache.

Per server: request to ``ACTIVE`` and to the guest's marker on the console.
Per flow: the bytes the origins (Ceph and Glance, behind the testbed's
origin namespace) sent through the origin's shaped link, and per node the
bytes the node's thunder-cache fetched from the origin and from peers
(peer) or the size of its ``_base`` copy (image-cache, pre-cache).

Writes ``results.csv`` (one row per server), ``results.txt`` (the
table, the goals, the command, the date) and ``results.png`` into
``--out``.
"""

import argparse
import csv
import datetime
import hashlib
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from thunder_stack import clients  # noqa: E402
from thunder_stack import demo  # noqa: E402
from thunder_stack import guest as guest_mod  # noqa: E402
from thunder_stack import layout  # noqa: E402
from thunder_stack import nodes as nodes_mod  # noqa: E402
from thunder_stack import stack as stack_mod  # noqa: E402

FLOWS = ('peer', 'image-cache', 'pre-cache')
FLAVOR = 'tiny'
TIMEOUT = 900
COLUMNS = ('round', 'flow', 'node', 'server', 'active_s', 'marker_s',
           'warm_s', 'origin_link_bytes', 'node_origin_bytes',
           'node_peer_bytes', 'image_bytes')


def log(message):
    print('.. %s' % message, file=sys.stderr, flush=True)


class Bench:

    def __init__(self, args):
        self.args = args
        self.stack = stack_mod.Stack()
        self.nodes = nodes_mod.Nodes(self.stack)
        if not self.nodes.count:
            raise SystemExit('no compute nodes: tools/thunder-stack nodes '
                             'up --count 2 first')
        self.api = clients.Api(self.stack)
        image = guest_mod.build(
            self.stack.path('data', 'guest'), size_mib=args.image_mib,
            filler_mib='max' if args.image_mib > guest_mod.DEFAULT_SIZE_MIB
            else 0)
        self.image_path, self.marker = image.path, image.marker
        self.rows = []

    def cli(self, *args):
        return clients.cli(self.stack, 'openstack', *args)

    def json(self, *args):
        return json.loads(self.cli(*(args + ('-f', 'json'))))

    def upload(self, name):
        out = clients.cli(self.stack, 'glance', 'image-create', '--name', name,
                          '--disk-format', 'raw', '--container-format', 'bare',
                          '--file', self.image_path, '--store', 'thunder')
        return clients.table_value(out, 'id')

    # -- a flow -----------------------------------------------------------

    def boot_all(self, flow, image_id):
        """One server per node at once; {node: (id, requested at)}."""
        servers = {}
        for node in self.nodes.nodes:
            if flow == 'peer':
                source = ['--block-device',
                          'source_type=image,uuid=%s,destination_type=volume,'
                          'volume_size=1,volume_type=%s,boot_index=0,'
                          'delete_on_termination=true'
                          % (image_id, layout.PEER_BACKEND)]
            else:
                source = ['--image', image_id]
            started = time.monotonic()
            server = self.json('server', 'create', '--flavor', FLAVOR,
                               '--nic', 'none', '--availability-zone',
                               node.name, *source,
                               'bench-%s-%s' % (flow, node.name))
            servers[node.name] = (server['id'], started)
        return servers

    def wait(self, servers):
        """{node: (seconds to ACTIVE, seconds to the marker)}."""
        active, marker = {}, {}
        deadline = time.monotonic() + TIMEOUT
        while len(marker) < len(servers):
            if time.monotonic() > deadline:
                raise SystemExit('no marker on %s after %ds' % (
                    sorted(set(servers) - set(marker)), TIMEOUT))
            for name, (server_id, started) in servers.items():
                if name not in active:
                    status = self.json('server', 'show', server_id)['status']
                    if status == 'ERROR':
                        raise SystemExit('server %s on %s: ERROR'
                                         % (server_id, name))
                    if status == 'ACTIVE':
                        active[name] = time.monotonic() - started
                elif name not in marker and self.marker in self.cli(
                        'console', 'log', 'show', server_id):
                    marker[name] = time.monotonic() - started
            time.sleep(0.5)
        return {name: (active[name], marker[name]) for name in servers}

    def delete(self, servers):
        for server_id, _ in servers.values():
            self.cli('server', 'delete', '--wait', server_id)

    def base_file(self, node, image_id):
        return node.path('data', 'nova', 'instances', '_base',
                         hashlib.sha1(image_id.encode()).hexdigest())

    def pre_cache(self, image_id):
        """Seconds until every node's _base holds the image."""
        started = time.monotonic()
        for node in self.nodes.nodes:
            clients.cli(self.stack, 'openstack', '--os-compute-api-version',
                        '2.81', 'aggregate', 'cache', 'image', node.name,
                        image_id)
        deadline = started + TIMEOUT
        while time.monotonic() < deadline:
            if all(os.path.exists(self.base_file(n, image_id))
                   for n in self.nodes.nodes):
                return time.monotonic() - started
            time.sleep(0.5)
        raise SystemExit('the image is not cached on every node after %ds'
                         % TIMEOUT)

    def run_flow(self, round_, flow):
        image_id = self.upload('bench-%s-%d' % (flow, round_))
        servers = {}
        try:
            before_link = self.nodes.testbed.sent_bytes(0)
            before = {n.name: self.counters(n, image_id)
                      for n in self.nodes.nodes}
            warm = self.pre_cache(image_id) if flow == 'pre-cache' else None
            servers = self.boot_all(flow, image_id)
            times = self.wait(servers)
            link = self.nodes.testbed.sent_bytes(0) - before_link
            for node in self.nodes.nodes:
                after = self.counters(node, image_id)
                base = self.base_file(node, image_id)
                self.rows.append({
                    'round': round_, 'flow': flow, 'node': node.name,
                    'server': servers[node.name][0],
                    'active_s': round(times[node.name][0], 2),
                    'marker_s': round(times[node.name][1], 2),
                    'warm_s': warm and round(warm, 2),
                    'origin_link_bytes': link,
                    'node_origin_bytes': int(
                        after.get('bytes_from_origin', 0) -
                        before[node.name].get('bytes_from_origin', 0)),
                    'node_peer_bytes': int(
                        after.get('bytes_from_peers', 0) -
                        before[node.name].get('bytes_from_peers', 0)),
                    'image_bytes': (os.path.getsize(base)
                                    if os.path.exists(base) else 0)})
                log('%s round %d %s: ACTIVE %.1f s, marker %.1f s' % (
                    flow, round_, node.name, *times[node.name]))
        finally:
            self.delete(servers)
            clients.cli(self.stack, 'glance', 'image-delete', image_id)

    def counters(self, node, image_id):
        return nodes_mod.image_counters(node, image_id)

    def run(self):
        for round_ in range(1, self.args.rounds + 1):
            for flow in self.args.flows.split(','):
                log('round %d: %s' % (round_, flow))
                self.run_flow(round_, flow)


def table(rows, image_bytes):
    """The side-by-side table, one line per flow.

    Times over the servers (median/max); bytes per round (the origin's
    link; the nodes' caches, summed over the nodes), median over rounds.
    """
    lines = ['%-12s %5s %12s %12s %8s %15s %15s %15s' % (
        'flow', 'nodes', 'ACTIVE s', 'marker s', 'warm s',
        'origin link MB', 'cache origin MB', 'cache peers MB')]
    for flow in FLOWS:
        mine = [r for r in rows if r['flow'] == flow]
        if not mine:
            continue
        rounds = sorted({r['round'] for r in mine})

        def times(key):
            values = [float(r[key]) for r in mine]
            return '%.1f/%.1f' % (statistics.median(values), max(values))

        def per_round(key, total=True):
            sums = []
            for k in rounds:
                values = [float(r[key]) for r in mine if r['round'] == k]
                sums.append(sum(values) if total else values[0])
            return statistics.median(sums) / 1e6

        warm = [float(r['warm_s']) for r in mine if r['warm_s'] not in
                (None, '')]
        lines.append('%-12s %5d %12s %12s %8s %15.1f %15.1f %15.1f' % (
            flow, len(mine) // len(rounds), times('active_s'),
            times('marker_s'),
            '%.1f' % statistics.median(warm) if warm else '-',
            per_round('origin_link_bytes', total=False),
            per_round('node_origin_bytes'), per_round('node_peer_bytes')))
    lines.append('(times: median/max over servers, from the request; bytes: '
                 'per round; image %.1f MB)' % (image_bytes / 1e6))
    return lines


def _flow_rows(rows, flow):
    return [r for r in rows if r['flow'] == flow]


def _round_values(rows, key):
    """Per round, ``key`` of the round's first row (a per-round figure)."""
    firsts = {}
    for r in rows:
        firsts.setdefault(r['round'], float(r[key]))
    return [firsts[k] for k in sorted(firsts)]


def working_set(rows):
    """Bytes one peer-mode boot reads: the most any node's cache fetched."""
    return max((float(r['node_origin_bytes']) + float(r['node_peer_bytes'])
                for r in _flow_rows(rows, 'peer')), default=0.0)


def goals(rows):
    """The issue's two peer-mode goals, measured in this run.

    Origin bytes of the whole run's peer boots (the origin's link, all
    rounds) at most 1.2 times the boots' working set (one per round), and
    servers ready at least 2 times sooner than with Nova's image cache
    (median request -> marker).
    """
    peer = _flow_rows(rows, 'peer')
    cache = _flow_rows(rows, 'image-cache')
    lines = []
    if peer and working_set(rows):
        links = _round_values(peer, 'origin_link_bytes')
        ratio = sum(links) / (working_set(rows) * len(links))
        lines.append(demo.goal_line(
            'origin bytes <= 1.2x the working set', ratio <= 1.2,
            '%.2fx (%.1f MB per round, working set %.1f MB)' % (
                ratio, sum(links) / len(links) / 1e6,
                working_set(rows) / 1e6)))
    if peer and cache:
        ratio = (statistics.median(float(r['marker_s']) for r in cache) /
                 statistics.median(float(r['marker_s']) for r in peer))
        lines.append(demo.goal_line(
            'ready >= 2x sooner than the image cache', ratio >= 2,
            '%.1fx (median request -> marker)' % ratio))
    return lines


def plot(rows, out):
    """results.png: request -> marker and origin bytes, per flow."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        from matplotlib import pyplot
    except ImportError:
        return 'matplotlib is not installed: no plot'
    flows = [f for f in FLOWS if _flow_rows(rows, f)]
    fig, (left, right) = pyplot.subplots(1, 2, figsize=(9, 4))
    for i, flow in enumerate(flows):
        mine = _flow_rows(rows, flow)
        markers = [float(r['marker_s']) for r in mine]
        median = statistics.median(markers)
        left.bar(i, median, color='C%d' % i)
        left.vlines(i, min(markers), max(markers), color='black')
        links = _round_values(mine, 'origin_link_bytes')
        right.bar(i, statistics.median(links) / 1e6, color='C%d' % i)
        right.vlines(i, min(links) / 1e6, max(links) / 1e6, color='black')
    for ax, label in ((left, 'request -> marker (s)'),
                      (right, "origin's link, per round (MB)")):
        ax.set_xticks(range(len(flows)))
        ax.set_xticklabels(flows)
        ax.set_ylabel(label)
        ax.grid(True, axis='y', alpha=0.3)
    right.set_yscale('log')
    fig.suptitle('one server per node at once; bars: medians, lines: '
                 'min-max', fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'results.png'), dpi=100)
    pyplot.close(fig)
    return 'plot: results.png'


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=1)
    parser.add_argument('--flows', default=','.join(FLOWS))
    parser.add_argument('--image-mib', type=int, default=64,
                        help='size of the guest image (default 64; larger '
                             'ones are filled with data)')
    parser.add_argument('--out', default=os.path.join(
        REPO, 'doc', 'source', 'nova-nodes'))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    bench = Bench(args)
    bench.run()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'results.csv'), 'w') as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(bench.rows)
    lines = table(bench.rows, os.path.getsize(bench.image_path))
    lines += goals(bench.rows)
    lines += ['', plot(bench.rows, args.out),
              'nodes: %d, links %s Mbit/s; %s' % (
        bench.nodes.count, bench.nodes.link_mbit,
        datetime.datetime.now(datetime.timezone.utc).strftime(
            '%Y-%m-%d %H:%M UTC')),
        'command: python benchmarks/nova_nodes.py %s' % ' '.join(
            argv if argv is not None else sys.argv[1:])]
    with open(os.path.join(args.out, 'results.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
