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

"""Volume from an image: ThunderDriver's clone against Cinder's full copy.

On a real single-node Ceph (started here, or ``--ceph-conf`` of a running
one), for image-volumes of each size (default 1 and 8 GiB, filled with
incompressible data and sealed the way the thunder store seals them):

* clone: ``ThunderDriver.clone_image()`` from the image's thunder location,
  the path ``cinder create --image-id`` takes (median of ``--repeat``);
* full copy: ``create_volume()`` then ``copy_image_to_volume()``, the path
  Cinder takes when no driver clones: Cinder's own ``image_utils``
  downloads the image to a file (served from RBD with no HTTP hop, which
  flatters the copy), runs ``qemu-img`` and writes it into the volume.

Then ``--count`` volumes from one image, one after the other, to show that
the clone time does not grow with the number of clones. Prints a table
with the ratios and checks the goals: clone at 8 GiB within 1.2x of 1 GiB,
and at least 20x faster than the full copy at 1 GiB.

    tox -e bench -- benchmarks/clone_vs_copy.py [--sizes 1,8] [--count 50]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

from cinder import context as cinder_context
from oslo_utils import units

from tests.harness import standalone
from thunder_common import locations
from thunder_common import rbd_layout
from thunder_stack import ceph as local_ceph
from thunder_stack import rbd_image_service

BACKEND = 'thunder_benchmark'
CHUNK = 4 * units.Mi


def fill(drv, name, size):
    """Write ``size`` bytes that neither compress nor deduplicate."""
    block = bytearray(os.urandom(CHUNK))
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, name) as image:
            for offset in range(0, size, CHUNK):
                block[:16] = uuid.uuid4().bytes
                image.write(bytes(block), offset)


def make_image(drv, images, size_gb):
    """An image-volume as the thunder store leaves it: written, sealed."""
    volume = standalone.Volume(size=size_gb)
    drv.create_volume(volume)
    fill(drv, volume.name, size_gb * units.Gi)
    image_id = str(uuid.uuid4())
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, volume.name) as image:
            rbd_layout.seal_image_volume(image, image_id)
    images.register(image_id, volume.name, size_gb * units.Gi)
    meta = {'id': image_id, 'disk_format': 'raw', 'container_format': 'bare',
            'size': size_gb * units.Gi}
    url = locations.thunder_location(volume.id).url
    return volume, meta, (url, [{'url': url, 'metadata': {}}])


def timed(func, *args):
    start = time.perf_counter()
    func(*args)
    return time.perf_counter() - start


def clone(drv, meta, location, size_gb, made):
    volume = standalone.Volume(size=size_gb)
    made.append(volume)
    start = time.perf_counter()
    _, cloned = drv.clone_image(None, volume, location, meta, None)
    elapsed = time.perf_counter() - start
    if not cloned:
        raise RuntimeError('clone_image declined image %s' % meta['id'])
    return elapsed


def full_copy(drv, images, meta, size_gb, made):
    volume = standalone.Volume(size=size_gb)
    made.append(volume)
    ctx = cinder_context.get_admin_context()
    start = time.perf_counter()
    drv.create_volume(volume)
    drv.copy_image_to_volume(ctx, volume, images, meta['id'])
    return time.perf_counter() - start


def run(drv, images, sizes, repeat, count, copy_sizes):
    made, rows = [], []
    try:
        sources = []
        for size_gb in sizes:
            print('.. %d GiB image-volume: writing' % size_gb,
                  file=sys.stderr)
            image, meta, location = make_image(drv, images, size_gb)
            made.append(image)
            sources.append((size_gb, meta, location))
        copies = {}
        for size_gb, meta, _ in sources:
            if size_gb in copy_sizes:
                print('.. %d GiB image-volume: full copy' % size_gb,
                      file=sys.stderr)
                copies[size_gb] = full_copy(drv, images, meta, size_gb, made)
        # Clones of the different sizes interleaved, so that whatever else
        # the machine does weighs on all sizes alike.
        print('.. clones', file=sys.stderr)
        clone_times = {size_gb: [] for size_gb in sizes}
        for _ in range(repeat):
            for size_gb, meta, location in sources:
                clone_times[size_gb].append(
                    clone(drv, meta, location, size_gb, made))
        rows = [(size_gb, statistics.median(clone_times[size_gb]),
                 max(clone_times[size_gb]), copies.get(size_gb))
                for size_gb in sizes]

        print('.. %d volumes from one image' % count, file=sys.stderr)
        size_gb, meta, location = sources[0]
        many = [clone(drv, meta, location, size_gb, made)
                for _ in range(count)]
    finally:
        for volume in reversed(made):
            drv.delete_volume(volume)
        drv.flattener.wait_idle(timeout=600)
    return rows, many


def report(rows, many, count):
    print()
    print('Volume from image: thunder clone vs. full copy (seconds)')
    print()
    print('%-10s %14s %12s %14s %14s' % ('image', 'clone median',
                                         'clone max', 'full copy',
                                         'copy / clone'))
    for size_gb, median, worst, copy_time in rows:
        print('%-10s %14.4f %12.4f %14s %14s' % (
            '%d GiB' % size_gb, median, worst,
            '-' if copy_time is None else '%.2f' % copy_time,
            '-' if copy_time is None else '%.0fx' % (copy_time / median)))
    print()
    print('%d volumes from one %d GiB image, one after the other:'
          % (count, rows[0][0]))
    print('  total %.3f s, mean %.4f s, first %.4f s, last %.4f s, '
          'max %.4f s' % (sum(many), statistics.mean(many), many[0],
                          many[-1], max(many)))
    print()
    by_size = {r[0]: r for r in rows}
    goals = []
    if 1 in by_size and 8 in by_size:
        ratio = by_size[8][1] / by_size[1][1]
        goals.append(('clone at 8 GiB within 1.2x of 1 GiB',
                      '%.2fx' % ratio, ratio <= 1.2))
    if 1 in by_size and by_size[1][3] is not None:
        speedup = by_size[1][3] / by_size[1][1]
        goals.append(('clone >= 20x faster than full copy at 1 GiB',
                      '%.0fx' % speedup, speedup >= 20))
    for goal, value, met in goals:
        print('goal: %-46s %8s  %s' % (goal, value, 'met' if met else
                                       'MISSED'))
    return all(met for _, _, met in goals)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='1,8',
                        help='image sizes in GiB (default: 1,8)')
    parser.add_argument('--copy-sizes', default=None,
                        help='sizes to also full-copy (default: all)')
    parser.add_argument('--repeat', type=int, default=9,
                        help='clones timed per size (default: 9)')
    parser.add_argument('--count', type=int, default=50,
                        help='volumes made from one image (default: 50)')
    parser.add_argument('--ceph-conf',
                        help='use this running cluster (pool "volumes") '
                             'instead of starting one')
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(',')]
    copy_sizes = (sizes if args.copy_sizes is None else
                  [int(s) for s in args.copy_sizes.split(',') if s])

    workdir = cluster = None
    conf = args.ceph_conf
    if conf is None:
        workdir = tempfile.mkdtemp(prefix='thunder-bench-')
        # BlueStore on a sparse file: the images and their copies do not
        # have to fit in memory.
        cluster = local_ceph.LocalCeph(
            workdir, pools=('volumes',), objectstore='bluestore',
            size_gib=max(40, 3 * sum(sizes)))
        print('.. starting Ceph in %s' % workdir, file=sys.stderr)
        cluster.start()
        conf = cluster.conf_path
    standalone.use_local_privsep_helper()
    try:
        drv = standalone.make_driver(BACKEND, thunder_rbd_ceph_conf=conf,
                                     thunder_rbd_pool='volumes')
        images = rbd_image_service.RbdImageService(conf, pool='volumes')
        try:
            rows, many = run(drv, images, sizes, args.repeat, args.count,
                             copy_sizes)
        finally:
            drv.stop_background_work(timeout=600)
        return 0 if report(rows, many, args.count) else 1
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
