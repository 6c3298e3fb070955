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

"""Raw upload against qcow2 import into a thunder store, timed.

Runs against the local stack (``tools/thunder-stack up``)::

    tox -e bench -- benchmarks/image_formats.py RAW QCOW2 [--store thunder]
        [--runs 1]

QCOW2 must hold RAW's bytes (``qemu-img convert -O qcow2 RAW QCOW2``).
Each run uploads RAW (``glance image-create --disk-format raw``) and
imports QCOW2 (``glance image-create-via-import --disk-format qcow2``,
the data on stdin), waits until each is ``active`` and prints the time,
the image's format and size, its image-volume's size and the RBD data the
image-volume holds; both images are deleted after.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from thunder_stack import clients  # noqa: E402
from thunder_stack import layout  # noqa: E402
from thunder_stack import stack as stack_mod  # noqa: E402


def _report(stack, api, label, image_id, seconds):
    image = api.wait_image_active(image_id)
    [vol] = [v for v in api.get('/volumes/detail?all_tenants=1')['volumes']
             if v['name'] == 'image-%s' % image_id]
    name = 'volume-%s' % vol['id']
    pool = layout.POOLS['thunder']
    # The head and its sealed snapshot: the data is in the snapshot.
    data = sum(i['used_size'] for i in clients.rbd_json(
        stack, 'du', '%s/%s' % (pool, name))['images'] if i['name'] == name)
    print('%-13s %6.1f s  disk_format %-5s size %11d  image-volume %d GiB  '
          'RBD data %d MiB' % (label, seconds, image['disk_format'],
                               image['size'], vol['size'], data >> 20))
    sys.stdout.flush()
    clients.cli(stack, 'glance', 'image-delete', image_id)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('raw')
    parser.add_argument('qcow2')
    parser.add_argument('--store', default='thunder')
    parser.add_argument('--runs', type=int, default=1)
    args = parser.parse_args(argv)
    stack = stack_mod.Stack()
    api = clients.Api(stack)
    for _ in range(args.runs):
        t0 = time.monotonic()
        image_id = clients.table_value(clients.cli(
            stack, 'glance', 'image-create', '--name', 'bench-raw',
            '--disk-format', 'raw', '--container-format', 'bare', '--file',
            args.raw, '--store', args.store), 'id')
        _report(stack, api, 'raw upload', image_id, time.monotonic() - t0)
        t0 = time.monotonic()
        with open(args.qcow2, 'rb') as data:
            image_id = clients.table_value(clients.cli(
                stack, 'glance', 'image-create-via-import', '--name',
                'bench-qcow2', '--disk-format', 'qcow2',
                '--container-format', 'bare', '--stores', args.store,
                stdin=data), 'id')
        api.wait_image_active(image_id)
        _report(stack, api, 'qcow2 import', image_id, time.monotonic() - t0)
    return 0


if __name__ == '__main__':
    sys.exit(main())
