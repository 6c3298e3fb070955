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

"""``tools/thunder-stack demo``: many volumes from one image, timed.

For each flow, the demo uploads one raw image with the real CLI
(``glance image-create --store``), creates N volumes from it at once (N
``cinder create --image-id`` processes started together), waits until all
are available and measures: the upload, each volume's time from its
request to ``available``, the total, and the bytes each new volume owns in
Ceph (``rbd du``: a copy-on-write clone owns none). Flows:

``thunder``
    The thunder Glance store and ThunderDriver (the ``thunder`` volume
    type). Without the thunder store (not written yet), the image goes to
    Glance's rbd store and ThunderDriver clones its ``rbd://`` location.
``upstream``
    glance_store's rbd store and Cinder's RBDDriver (the ``rbd`` type):
    Cinder clones the image's ``rbd://`` location.
``upstream-cinder``
    glance_store's cinder store (images as volumes of the ``rbd`` type) and
    Cinder's RBDDriver: Cinder clones the image-volume it finds through the
    ``cinder://`` location, taking a snapshot of it for every clone.

With ``--bulk-boot``, the demo then runs the bulk boot benchmark
(``benchmarks/bulk_boot.py``, N emulated compute nodes booting one image
in peer mode and without it) with the stack's Python, its output streamed,
its results written under ``data/demo/bulk-boot`` unless its arguments say
``--out``, and its outcome added to the summary and to ``--json``.
"""

import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
import uuid

from thunder_stack import clients
from thunder_stack import services as svc

FLOWS = {
    'thunder': {'store': 'thunder', 'type': 'thunder', 'pool': 'thunder'},
    'upstream': {'store': 'rbd', 'type': 'rbd', 'pool': 'volumes'},
    'upstream-cinder': {'store': 'cinder', 'type': 'rbd', 'pool': 'volumes'},
}
BLOCK = 4 * 1024 * 1024
BULK_BOOT = os.path.join(svc.CHECKOUT, 'benchmarks', 'bulk_boot.py')
NOVA_BOOT = os.path.join(svc.CHECKOUT, 'benchmarks', 'nova_boot.py')
NOVA_NODES = os.path.join(svc.CHECKOUT, 'benchmarks', 'nova_nodes.py')
NOVA_NODES_COUNT = 2
NOVA_NODES_LINK_MBIT = 100


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


def run_flow(stack, api, name, image_path, args):
    flow = dict(FLOWS[name])
    if name == 'thunder' and not stack.state.get('thunder_store'):
        flow['store'] = 'rbd'
        flow['note'] = 'thunder store not available: rbd store'
    tag = 'thunder-demo-%s-%s' % (name, uuid.uuid4().hex[:6])
    size_gib = max(1, int(math.ceil(args.image_size_mib / 1024.0)))
    result = dict(flow, flow=name, volumes=args.volumes, error=None)
    image_id = None
    volume_ids = []
    try:
        t0 = time.monotonic()
        out = clients.cli(stack, 'glance', 'image-create', '--name', tag,
                          '--disk-format', 'raw', '--container-format', 'bare',
                          '--file', image_path, '--store', flow['store'])
        result['upload_s'] = time.monotonic() - t0
        image_id = clients.table_value(out, 'id')
        status = clients.table_value(out, 'status')
        if status != 'active':
            raise svc.StackError('image %s is %s after upload'
                                 % (image_id, status))
        if flow['store'] == 'thunder':
            t1 = time.monotonic()
            result['aliases'] = clients.register_aliases(stack, image_id)
            result['aliases_s'] = time.monotonic() - t1
        procs = []
        start = time.monotonic()
        for i in range(args.volumes):
            env = dict(os.environ, **stack.openrc_env())
            env['PATH'] = os.path.join(stack.venv, 'bin') + ':' + env['PATH']
            procs.append((time.monotonic(), subprocess.Popen(
                ['cinder', 'create', '--image-id', image_id,
                 '--volume-type', flow['type'], '--name',
                 '%s-%02d' % (tag, i), str(size_gib)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=env)))
        requested = {}
        failures = []
        for sent, proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode:
                failures.append(err.strip()[-1000:])
                continue
            vid = clients.table_value(out, 'id')
            volume_ids.append(vid)
            requested[vid] = sent
        if failures:
            raise svc.StackError('%d "cinder create" failed: %s' % (
                len(failures), failures[0]))
        done = {}
        deadline = start + args.timeout
        while len(done) < len(volume_ids) and time.monotonic() < deadline:
            now = time.monotonic()
            for vid, vol in api.volumes(set(volume_ids)).items():
                if vid in done:
                    continue
                if vol['status'] == 'available':
                    done[vid] = now - requested[vid]
                elif vol['status'] == 'error':
                    raise svc.StackError('volume %s went to error; '
                                         'see %s' % (vid, stack.path(
                                             'log',
                                             'cinder-volume.log')))
            time.sleep(0.25)
        result['total_s'] = time.monotonic() - start
        if len(done) < len(volume_ids):
            raise svc.StackError('%d of %d volumes not available '
                                 'after %ss' % (
                                     len(volume_ids) - len(done),
                                     len(volume_ids), args.timeout))
        times = list(done.values())
        result['mean_s'] = sum(times) / len(times)
        result['max_s'] = max(times)
        copied = 0
        parents = set()
        clones = 0
        for vid in volume_ids:
            rbd_name = 'volume-%s' % vid
            copied += clients.own_bytes(stack, flow['pool'], rbd_name)
            parent = clients.parent_of(stack, flow['pool'], rbd_name)
            if parent:
                clones += 1
                parents.add(parent)
        result['bytes_copied'] = copied
        result['clones'] = clones
        result['parents'] = sorted(parents)
        # Snapshots the clones hang from, on their parent images: one for
        # every clone, or one for all.
        snaps = 0
        for image in {p.split('@')[0] for p in parents}:
            snaps += len(clients.rbd_json(stack, 'snap', 'ls', image))
        result['parent_snapshots'] = snaps
    except (svc.StackError, subprocess.SubprocessError) as e:
        result['error'] = str(e)
    finally:
        if not args.keep:
            _cleanup(stack, api, image_id, volume_ids)
    return result


def _cleanup(stack, api, image_id, volume_ids):
    for vid in volume_ids:
        try:
            clients.cli(stack, 'cinder', 'delete', vid)
        except svc.StackError:
            pass
    deadline = time.monotonic() + 300
    while volume_ids and time.monotonic() < deadline:
        if not api.volumes(set(volume_ids)):
            break
        time.sleep(1)
    if image_id:
        try:
            clients.cli(stack, 'glance', 'image-delete', image_id)
        except svc.StackError:
            pass


def human(n):
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if n < 1024 or unit == 'GiB':
            return ('%d %s' % (n, unit) if unit == 'B'
                    else '%.1f %s' % (n, unit))
        n /= 1024.0


def print_table(results, args):
    print()
    print('%d volumes from one %d MiB raw image, created at once'
          % (args.volumes, args.image_size_mib))
    header = ('flow', 'glance store', 'volume type', 'upload s', 'MiB/s',
              'vol mean s', 'vol max s', 'total s', 'bytes copied',
              'CoW clones', 'parent snaps')
    rows = []
    for r in results:
        if r.get('error') and 'total_s' not in r:
            rows.append((r['flow'], r['store'], r['type'],
                         '%.1f' % r['upload_s'] if 'upload_s' in r else '-',
                         '-', '-', '-', '-', '-', 'FAILED', '-'))
            continue
        rows.append((
            r['flow'], r['store'], r['type'], '%.1f' % r['upload_s'],
            '%.0f' % (args.image_size_mib / r['upload_s']),
            '%.2f' % r.get('mean_s', float('nan')),
            '%.2f' % r.get('max_s', float('nan')), '%.2f' % r['total_s'],
            human(r.get('bytes_copied', 0)),
            '%d/%d' % (r.get('clones', 0), r['volumes']),
            r.get('parent_snapshots', '-')))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header,) + tuple(rows):
        print('  '.join(str(x).ljust(w) for x, w in zip(row, widths)))
    for r in results:
        if r.get('note'):
            print('note (%s): %s' % (r['flow'], r['note']))
        if r.get('aliases'):
            print('%s: aliases %s added in %.1f s (not in the upload time)'
                  % (r['flow'], ', '.join(r['aliases']), r['aliases_s']))
        if r.get('parents'):
            images = sorted({p.split('@')[0] for p in r['parents']})
            if len(r['parents']) <= len(images):
                shown = ', '.join(r['parents'])
            else:
                shown = ', '.join('%s (%d snapshots)' % (i, sum(
                    1 for p in r['parents'] if p.startswith(i + '@')))
                    for i in images)
            print('%s: clones of %s' % (r['flow'], shown))
        if r.get('error'):
            print('error (%s): %s' % (r['flow'], r['error']))
    print('vol mean/max: from each "cinder create" to "available" (client '
          'start-up included); total: first request to last available.')
    print('bytes copied: data the new volumes own in Ceph (rbd du); '
          'parent snaps: snapshots on the images the clones hang from.')


def benchmark_command(stack, script, arg_string, option, results):
    """[the stack's Python, script, args...] and the results directory.

    The results go to the stack's ``data/demo/RESULTS`` unless the
    arguments say ``--out``. StackError if ``arg_string`` (given as
    ``option``) does not split.
    """
    try:
        extra = shlex.split(arg_string or '')
    except ValueError as e:
        raise svc.StackError('%s %r: %s' % (option, arg_string, e))
    out = None
    for i, arg in enumerate(extra):
        if arg == '--out' and i + 1 < len(extra):
            out = extra[i + 1]
        elif arg.startswith('--out='):
            out = arg[len('--out='):]
    if out is None:
        out = stack.path('data', 'demo', results)
        extra += ['--out', out]
    return [stack.python, script] + extra, os.path.abspath(out)


def bulk_boot_command(stack, args):
    """The benchmark's command line and results directory.

    StackError unless run as root or if ``--bulk-boot-args`` does not
    split.
    """
    _needs_root('--bulk-boot', 'the benchmark creates network namespaces '
                'and tc qdiscs')
    return benchmark_command(stack, BULK_BOOT, args.bulk_boot_args,
                             '--bulk-boot-args', 'bulk-boot')


def nova_boot_command(stack, args):
    """``benchmarks/nova_boot.py``'s command line and results directory."""
    return benchmark_command(stack, NOVA_BOOT, args.nova_args,
                             '--nova-args', 'nova-boot')


def nova_nodes_command(stack, args):
    """``benchmarks/nova_nodes.py``'s command line and results directory.

    StackError unless run as root (the emulated nodes are network
    namespaces) or if ``--nova-nodes-args`` does not split.
    """
    _needs_root('--nova-nodes', 'the compute nodes are network namespaces')
    return benchmark_command(stack, NOVA_NODES, args.nova_nodes_args,
                             '--nova-nodes-args', 'nova-nodes')


def _needs_root(option, why):
    """StackError unless run as root: ``OPTION needs root: WHY``."""
    if os.geteuid() != 0:
        raise svc.StackError('%s needs root: %s' % (option, why))


def run_benchmark(stack, flow, command, out):
    """Run a benchmark script, its output streamed; its outcome as a dict."""
    result = {'flow': flow, 'command': command, 'results_dir': out,
              'returncode': None, 'error': None}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [svc.CHECKOUT] + [p for p in [os.environ.get('PYTHONPATH')]
                          if p]))
    script = os.path.relpath(command[1], svc.CHECKOUT)
    svc.log('%s: %s' % (flow, ' '.join(shlex.quote(c) for c in [
        script] + command[2:])))
    sys.stdout.flush()
    started = time.time()
    try:
        proc = subprocess.Popen(command, env=env)
        try:
            result['returncode'] = proc.wait()
        except KeyboardInterrupt:
            proc.wait()     # the benchmark removes what it made first
            raise
    except OSError as e:
        result['error'] = 'cannot start %s: %s' % (command[0], e)
        return result
    result['started'] = started
    result['seconds'] = round(time.time() - started, 1)
    if result['returncode']:
        result['error'] = '%s exited with %d' % (script,
                                                 result['returncode'])
    return result


def run_bulk_boot(stack, command, out):
    """Run the bulk boot benchmark; its outcome with its run.json's."""
    result = run_benchmark(stack, 'bulk-boot', command, out)
    if 'started' in result:
        result.update(_bulk_boot_runs(out, result.pop('started')))
    return result


def goal_line(text, met, measured):
    """A goal as a line of a benchmark's results.txt (run_nova_boot's)."""
    return 'goal: %-58s %-7s %s' % (text, 'met' if met else 'MISSED',
                                    measured)


def run_nova_boot(stack, command, out, flow='nova-boot'):
    """Run a Nova benchmark; its outcome with its goals missed."""
    result = run_benchmark(stack, flow, command, out)
    started = result.pop('started', None)
    path = os.path.join(out, 'results.txt')
    try:
        if started and os.path.getmtime(path) >= started:
            with open(path) as f:
                goals = [line for line in f if line.startswith('goal: ')]
            result['goals'] = len(goals)
            result['goals_missed'] = [g[6:].strip() for g in goals
                                      if ' MISSED ' in g]
    except OSError:
        pass
    return result


def run_nova_nodes(stack, command, out):
    """Run ``benchmarks/nova_nodes.py`` on the stack's compute nodes.

    Brings up :data:`NOVA_NODES_COUNT` nodes behind
    :data:`NOVA_NODES_LINK_MBIT` Mbit/s links when none are up, and
    takes down those it brought up, even when the benchmark fails.
    """
    from thunder_stack import nodes as nodes_mod
    started_nodes = not stack.state.get('nodes')
    if started_nodes:
        nodes_mod.Nodes(stack, NOVA_NODES_COUNT, NOVA_NODES_LINK_MBIT).up()
    try:
        return run_nova_boot(stack, command, out, flow='nova-nodes')
    finally:
        if started_nodes:
            nodes_mod.Nodes(stack).down()


def _bulk_boot_runs(out, since):
    """What this run's ``run.json`` says: runs, unverified nodes, goals."""
    path = os.path.join(out, 'run.json')
    try:
        if os.path.getmtime(path) < since:
            return {}           # an earlier run's
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    measured = [r for r in meta.get('rows', []) if r.get('measured')]
    return {'runs': len(measured),
            'unverified_nodes': sum(r['nodes'] - r['verified']
                                    for r in measured),
            'goals': len(meta.get('goals', [])),
            'goals_missed': [g['goal'] for g in meta.get('goals', [])
                             if not g['met']]}


def print_benchmark(result, what):
    """One line: how a benchmark ended and where its results are."""
    if result['error']:
        status = 'FAILED: %s' % result['error']
    else:
        status = 'ok'
    if 'runs' in result:
        status += '; %d runs, %s' % (result['runs'], (
            'every node verified its bytes' if not result['unverified_nodes']
            else '%d nodes NOT verified' % result['unverified_nodes']))
    if result.get('goals'):
        status += '; goals met: %d of %d (results.txt)' % (
            result['goals'] - len(result['goals_missed']), result['goals'])
    print('%s: %s; results in %s' % (what, status, result['results_dir']))


def print_bulk_boot(result):
    print_benchmark(result, 'bulk boot')


def run_demo(stack, args):
    names = [f.strip() for f in args.flows.split(',') if f.strip()]
    for name in names:
        if name not in FLOWS:
            raise svc.StackError('unknown flow %r (choose from %s)'
                                 % (name, ', '.join(FLOWS)))
    bulk = (bulk_boot_command(stack, args)
            if getattr(args, 'bulk_boot', False) else None)
    nova = (nova_boot_command(stack, args)
            if getattr(args, 'nova', False) else None)
    nova_nodes = (nova_nodes_command(stack, args)
                  if getattr(args, 'nova_nodes', False) else None)
    results = []
    if names:
        image = make_image(stack.path('data', 'demo', 'image-%dMiB.raw'
                                      % args.image_size_mib),
                           args.image_size_mib)
        api = clients.Api(stack)
        for name in names:
            svc.log('demo flow %s: uploading %d MiB, then %d volumes'
                    % (name, args.image_size_mib, args.volumes))
            results.append(run_flow(stack, api, name, image, args))
        print_table(results, args)
    if nova:
        results.append(run_nova_boot(stack, *nova))
        print()
        print_benchmark(results[-1], 'nova boot')
    if nova_nodes:
        results.append(run_nova_nodes(stack, *nova_nodes))
        print()
        print_benchmark(results[-1], 'nova nodes')
    if bulk:
        results.append(run_bulk_boot(stack, *bulk))
        print()
        print_bulk_boot(results[-1])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
    return 1 if any(r.get('error') for r in results) else 0
