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


"""``tools/thunder-stack``: the command line of the local stack.

``up``, ``down``, ``status``, ``demo``, ``nodes`` and ``tempest``, each
handing its options to the module that does the job
(:mod:`thunder_stack.stack`, :mod:`~thunder_stack.demo`,
:mod:`~thunder_stack.nodes`, :mod:`~thunder_stack.tempest`). Exit status:
0, 1 on an error (one line on stderr), 3 from ``status`` when a service is
not ok.
"""

import argparse
import sys

from thunder_stack import ceph as ceph_mod
from thunder_stack import demo as demo_mod
from thunder_stack import layout
from thunder_stack import nodes as nodes_mod
from thunder_stack import services as svc
from thunder_stack import stack as stack_mod
from thunder_stack import supervise
from thunder_stack import tempest as tempest_mod


def print_status(rows):
    if not rows:
        print('thunder-stack: no stack in %s' % layout.stack_dir())
        return
    print('%-24s %-8s %-7s %-10s %s' % ('SERVICE', 'PID', 'PORT', 'STATE',
                                        'DETAIL'))
    for r in rows:
        print('%-24s %-8s %-7s %-10s %s' % (
            r['name'], r['pid'] or '-', r['port'] or '-', r['state'],
            r.get('reason', '')))


def positive(text):
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError('wants a whole number >= 1, not %r'
                                         % text)
    return value


def volume_counts(text):
    """``demo --volumes``: one count or several, comma-separated."""
    try:
        counts = [int(x) for x in text.split(',')]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            'wants a count or counts like 10,100, not %r' % text)
    return counts


def build_parser():
    """tools/thunder-stack's commands and options."""
    parser = argparse.ArgumentParser(
        prog='tools/thunder-stack',
        description='Real Keystone, Glance, Cinder, RabbitMQ, MariaDB and '
                    'Ceph on 127.0.0.1, kept in one directory (%s).'
                    % layout.stack_dir())
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('up', help='install what is missing and start '
                              'everything (idempotent)')
    sub.add_parser('down', help='stop every service by PID')
    sub.add_parser('status', help='each service with its PID, port and '
                                  'health')
    demo = sub.add_parser('demo', help='up, then create many volumes from '
                                       'one image with thunder and with '
                                       'upstream; print the timings '
                                       '(--bulk-boot: then the bulk boot '
                                       'benchmark)')
    demo.add_argument('--volumes', '-n', default='10', type=volume_counts,
                      help='volumes to create from the image at once, or '
                           'several counts to run in turn, e.g. 10,100 '
                           '(default 10)')
    demo.add_argument('--rounds', type=positive, default=3,
                      help='rounds of every flow and count, interleaved; '
                           'the table shows medians and spreads (default 3)')
    demo.add_argument('--image-size-mib', type=int, default=1024,
                      help='size of the raw image (default 1024 MiB)')
    demo.add_argument('--flows',
                      default='thunder,thunder-import,upstream,'
                              'upstream-cinder',
                      help='comma-separated flows: thunder (thunder store, '
                           'ThunderDriver), thunder-import (the image as '
                           'qcow2 through Glance\'s image import, then as '
                           'thunder), upstream (rbd store, RBDDriver), '
                           'upstream-cinder (cinder store, RBDDriver)')
    demo.add_argument('--keep', action='store_true',
                      help='keep the demo volumes and images')
    demo.add_argument('--timeout', type=int, default=900,
                      help='seconds to wait for the volumes')
    demo.add_argument('--json', help='also write the results to this file')
    demo.add_argument('--bulk-boot', action='store_true',
                      help='after the flows (alone with --flows ""), run '
                           'benchmarks/bulk_boot.py: N emulated nodes boot '
                           'one image (needs root)')
    demo.add_argument('--bulk-boot-args', default='--quick',
                      help='arguments of benchmarks/bulk_boot.py, one '
                           'string (default "--quick"; "" for the full '
                           'benchmark; one option alone as '
                           '--bulk-boot-args=--quick); results go to '
                           'data/demo/bulk-boot of the stack unless it '
                           'has --out')
    demo.add_argument('--nova', action='store_true',
                      help='after the flows (alone with --flows ""), run '
                           'benchmarks/nova_boot.py: N servers at once '
                           'through Nova, thunder against Nova\'s own RBD '
                           'paths')
    demo.add_argument('--nova-args', default='',
                      help='arguments of benchmarks/nova_boot.py, one '
                           'string (default "": the full comparison; e.g. '
                           '"--counts 1 --rounds 1"); results go to '
                           'data/demo/nova-boot of the stack unless it has '
                           '--out')
    demo.add_argument('--nova-nodes', action='store_true',
                      help='after the flows (alone with --flows ""), run '
                           'benchmarks/nova_nodes.py: one server per '
                           'emulated compute node at once, peer mode '
                           'against Nova\'s image cache (needs root; '
                           'brings up 2 nodes behind 100 Mbit/s links '
                           'unless nodes are up)')
    demo.add_argument('--nova-nodes-args',
                      default='--rounds 3 --image-mib 1024',
                      help='arguments of benchmarks/nova_nodes.py, one '
                           'string (default "--rounds 3 --image-mib 1024", '
                           'about half an hour); results '
                           'go to data/demo/nova-nodes of the stack unless '
                           'it has --out')
    tempest = sub.add_parser('tempest', help="run Tempest's volume tests "
                                             'against the stack')
    tempest.add_argument('--regex', default=None,
                         help='tests to run (default: Tempest and '
                              'cinder-tempest-plugin volume API tests)')
    tempest.add_argument('--exclude', default=None,
                         help='tests to leave out (a regex)')
    tempest.add_argument('--concurrency', type=int, default=2)
    tempest.add_argument('--volume-type', default=None,
                         help="volume type of Tempest's volumes (default: "
                              "Cinder's, %s; %s: peer mode)"
                              % (layout.THUNDER_BACKEND,
                                 layout.PEER_BACKEND))
    nodes = sub.add_parser('nodes', help='add emulated compute nodes to '
                                         'the running stack (up), or remove '
                                         'them (down): see '
                                         'thunder_stack/nodes.py')
    nodes.add_argument('action', choices=('up', 'down'))
    nodes.add_argument('--count', type=int, default=2,
                       help='compute nodes node-1..node-N (default 2)')
    nodes.add_argument('--link-mbit', type=int, default=None,
                       help='shape every node\'s link to this rate, both '
                            'ways (default: unshaped)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    stack = stack_mod.Stack()
    try:
        if args.command == 'up':
            stack.up()
            print_status(stack.status())
        elif args.command == 'down':
            stack.down()
        elif args.command == 'status':
            rows = stack.status()
            print_status(rows)
            return 0 if supervise.is_up(rows) else 3
        elif args.command == 'demo':
            if args.bulk_boot:
                demo_mod.bulk_boot_command(stack, args)     # before "up"
            if args.nova:
                demo_mod.nova_boot_command(stack, args)
            if args.nova_nodes:
                demo_mod.nova_nodes_command(stack, args)
            if not stack.is_up():
                stack.up()
            return demo_mod.run_demo(stack, args)
        elif args.command == 'nodes':
            if args.action == 'up':
                nodes_mod.Nodes(stack, args.count, args.link_mbit).up()
                print_status(stack.status())
            else:
                nodes_mod.Nodes(stack).down()
        elif args.command == 'tempest':
            if not stack.is_up():
                stack.up()
            args.regex = args.regex or tempest_mod.DEFAULT_REGEX
            return tempest_mod.run_tempest(stack, args)
    except (svc.StackError, svc.ServiceError, ceph_mod.CephError) as e:
        print('thunder-stack: error: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
