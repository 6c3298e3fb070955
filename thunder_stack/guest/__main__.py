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

"""``python -m thunder_stack.guest``: build, boot, check a console log."""

import argparse
import json
import statistics
import sys

from thunder_stack import guest
from thunder_stack.guest import qemu


def _filler(value):
    if value == 'max':
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError('an integer or "max"')


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='python -m thunder_stack.guest',
        description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    b = sub.add_parser('build', help='build the image (or reuse it) and '
                       'print its path')
    b.add_argument('--out', default=None,
                   help='cache directory (default: data/guest in the '
                   'local stack\'s directory)')
    b.add_argument('--size-mib', type=int, default=guest.DEFAULT_SIZE_MIB,
                   help='virtual size in MiB (default %d)' % (
                       guest.DEFAULT_SIZE_MIB))
    fill = b.add_mutually_exclusive_group()
    fill.add_argument('--filler-mib', type=_filler, default=0,
                      help='MiB of pseudo-random files a boot does not '
                      'read (default 0), or "max"')
    fill.add_argument('--fill', dest='filler_mib', action='store_const',
                      const='max', help='as much filler as the file system '
                      'holds (--filler-mib max)')
    b.add_argument('--format', choices=guest.FORMATS, default='raw')
    b.add_argument('--json', action='store_true',
                   help='print the image\'s metadata as JSON')
    t = sub.add_parser('boot', help='boot copies of an image under qemu '
                       'until the marker, and time them')
    t.add_argument('image')
    t.add_argument('--format', choices=guest.FORMATS, default=None,
                   help='default: qcow2 if the name ends with .qcow2')
    t.add_argument('--runs', type=int, default=1)
    t.add_argument('--timeout', type=int, default=120,
                   help='seconds a boot may take (default 120)')
    t.add_argument('--accel', default='tcg',
                   help='qemu accelerator (default tcg, as Nova\'s '
                   'virt_type = qemu)')
    t.add_argument('--memory-mib', type=int, default=256)
    m = sub.add_parser('marker', help='exit 0 if a console log (a file, '
                       'or - for stdin) holds the marker, 2 if the boot '
                       'failed, 1 if neither; print the marker\'s fields')
    m.add_argument('console_log')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == 'build':
            image = guest.build(args.out or guest.default_cache_dir(),
                                args.size_mib, args.format, args.filler_mib)
            print(json.dumps(image.as_dict(), indent=1, sort_keys=True)
                  if args.json else image.path)
        elif args.command == 'boot':
            return _boot_command(args)
        else:
            return _marker_command(args)
    except guest.GuestError as exc:
        print('guest: error: %s' % exc, file=sys.stderr)
        return 1
    return 0


def _boot_command(args):
    fmt = args.format or ('qcow2' if args.image.endswith('.qcow2')
                          else 'raw')
    times = []
    for index in range(args.runs):
        result = qemu.boot_copy(args.image, fmt, args.timeout, args.accel,
                                args.memory_mib)
        times.append(result['seconds'])
        print(json.dumps(dict(result, run=index + 1), sort_keys=True),
              flush=True)
    print('%d boots to the marker: %.1f-%.1f s (median %.1f s)' % (
        len(times), min(times), max(times), statistics.median(times)))
    return 0


def _marker_command(args):
    if args.console_log == '-':
        text = sys.stdin.read()
    else:
        with open(args.console_log, errors='replace') as f:
            text = f.read()
    fields = guest.parse_marker(text)
    if fields is not None:
        print(json.dumps(fields, sort_keys=True))
        return 0
    why = guest.failure_seen(text)
    if why:
        print('the guest failed: %s' % why, file=sys.stderr)
        return 2
    return 1


if __name__ == '__main__':
    sys.exit(main())
