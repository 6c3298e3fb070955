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

The flows (:mod:`thunder_stack.flows`: thunder against glance_store's rbd
and cinder stores with Cinder's RBD driver) in ``--rounds`` interleaved
rounds for each of ``--volumes`` (e.g. ``10,100``), a table of medians and
spreads and the goal lines of the comparison.

With ``--bulk-boot``, the demo then runs the bulk boot benchmark
(``benchmarks/bulk_boot.py``, N emulated compute nodes booting one image
in peer mode and without it) with the stack's Python, its output streamed,
its results written under ``data/demo/bulk-boot`` unless its arguments say
``--out``, and its outcome added to the summary and to ``--json``.
"""

import json
import os
import shlex
import subprocess
import sys
import time

from thunder_stack import clients
from thunder_stack import flows as flows_mod
from thunder_stack import services as svc

BULK_BOOT = os.path.join(svc.CHECKOUT, 'benchmarks', 'bulk_boot.py')
NOVA_BOOT = os.path.join(svc.CHECKOUT, 'benchmarks', 'nova_boot.py')
NOVA_NODES = os.path.join(svc.CHECKOUT, 'benchmarks', 'nova_nodes.py')
NOVA_NODES_COUNT = 2
NOVA_NODES_LINK_MBIT = 100


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
        if name not in flows_mod.FLOWS:
            raise svc.StackError('unknown flow %r (choose from %s)'
                                 % (name, ', '.join(flows_mod.FLOWS)))
    bulk = (bulk_boot_command(stack, args)
            if getattr(args, 'bulk_boot', False) else None)
    nova = (nova_boot_command(stack, args)
            if getattr(args, 'nova', False) else None)
    nova_nodes = (nova_nodes_command(stack, args)
                  if getattr(args, 'nova_nodes', False) else None)
    results = []
    if names:
        image = flows_mod.make_image(
            stack.path('data', 'demo', 'image-%dMiB.raw'
                       % args.image_size_mib), args.image_size_mib)
        api = clients.Api(stack)
        results = flows_mod.run_all(stack, api, names, image, args)
        flows_mod.print_table(results, args, goal_line)
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
