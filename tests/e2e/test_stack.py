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

"""The local stack itself: idempotent, configured by the devstack plugin."""

import csv
import hashlib
import json
import os
import subprocess
import time

from tests.e2e import conftest
from thunder_stack import clients
from thunder_stack import ini


def test_up_again_changes_nothing(stack):
    before = {s.name: s.pid() for s in stack.services()}
    result = subprocess.run([conftest.TOOL, 'up'], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    after = {s.name: s.pid() for s in stack.services()}
    assert after == before
    assert all(before.values())


def test_status_reports_every_service(stack):
    result = subprocess.run([conftest.TOOL, 'status'], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ('mysql', 'rabbitmq', 'ceph', 'keystone', 'glance-api',
                 'cinder-api', 'cinder-scheduler', 'cinder-volume',
                 'thunder-stack@thunder', 'thunder-stack@rbd', 'virtlogd',
                 'libvirtd', 'placement-api', 'neutron-api', 'nova-api',
                 'nova-conductor', 'nova-scheduler', 'nova-compute',
                 'compute thunder-stack'):
        assert name in result.stdout


def test_configuration_comes_from_the_devstack_plugin(stack):
    cinder = stack.path('etc', 'cinder', 'cinder.conf')
    assert ini.iniget(cinder, 'thunder', 'volume_driver') == \
        'cinder_thunder_driver.driver.ThunderDriver'
    assert ini.iniget(cinder, 'thunder', 'thunder_rbd_pool') == 'thunder'
    assert ini.iniget(cinder, 'thunder',
                      'image_volume_cache_enabled') == 'False'
    glance = stack.path('etc', 'glance', 'glance-api.conf')
    if stack.state.get('thunder_store'):
        backends = ini.iniget(glance, 'DEFAULT', 'enabled_backends')
        assert 'thunder:thunder' in backends.split(',')
        assert ini.iniget(glance, 'thunder', 'thunder_store_volume_type') \
            == 'thunder'


def test_upstream_flow_clones_too(stack, client, image_file):
    """The comparison path: Glance's rbd store and Cinder's RBDDriver."""
    path, _ = image_file
    image_id = client.upload(str(path), 'rbd')
    vid = client.create_volume(image_id, 'rbd')
    client.wait_volume(vid)
    parent = conftest.rbd_json(stack, 'info', 'volumes/volume-%s' % vid)
    assert parent['parent']['pool'] == 'images'
    assert parent['parent']['image'] == image_id
    assert clients.own_bytes(stack, 'volumes', 'volume-%s' % vid) == 0


def test_data_survives_down_and_up(stack, client, image_file, tmp_path,
                                   request):
    """down stops every process; up brings back the same images."""
    if stack.state.get('thunder_store'):
        request.getfixturevalue('thunder_store')
        store = 'thunder'
    else:
        store = 'rbd'
    path, digest = image_file
    image_id = client.upload(str(path), store)
    vid = client.create_volume(image_id, 'thunder')
    client.wait_volume(vid)
    pids = [s.pid() for s in stack.services()]
    # The native volume server outlives the daemon: down stops it too.
    pids += conftest.native_pids(stack.thunder_cache_paths)

    result = subprocess.run([conftest.TOOL, 'down'], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for pid in pids:
        assert not os.path.exists('/proc/%d/cmdline' % pid) or \
            stack.root.encode() not in open(
                '/proc/%d/cmdline' % pid, 'rb').read()
    assert not os.path.ismount(stack.thunder_cache_paths['mount'])
    assert not stack.ceph().running()

    result = subprocess.run([conftest.TOOL, 'up'], capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[
        -3000:]
    client.api = clients.Api(stack)
    assert client.wait_volume(vid, timeout=60)['status'] == 'available'
    out = tmp_path / 'after-restart.raw'
    client.run('glance', 'image-download', '--file', str(out), image_id)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def test_demo_with_the_bulk_boot(stack, tmp_path):
    """``demo --bulk-boot``: two flows, then the benchmark, in one command.

    The thunder flow and the qcow2 import into the thunder store (zero-copy
    clones, no admin call, the image-volume the image's GiB, the import's
    goal line printed). The benchmark's quick mode, 1 and 2 nodes, the peer
    strategy: its results go to the stack's data directory, every node read
    the image's bytes, and the demo's summary and JSON say so.
    """
    out = stack.path('data', 'demo', 'bulk-boot')
    report = tmp_path / 'demo.json'
    started = time.time()
    result = subprocess.run(
        [conftest.TOOL, 'demo', '--flows', 'thunder,thunder-import',
         '--volumes', '2',
         '--rounds', '1', '--image-size-mib', '64', '--json', str(report),
         '--bulk-boot',
         '--bulk-boot-args', '--quick --nodes 1,2 --strategies peer'],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout[-3000:] +
                                    result.stderr[-3000:])
    assert ('bulk boot: ok; 2 runs, every node verified its bytes'
            in result.stdout), result.stdout[-3000:]
    with open(os.path.join(out, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    assert os.path.getmtime(os.path.join(out, 'results.csv')) >= started
    assert [(r['strategy'], int(r['nodes'])) for r in rows] == [
        ('peer', 1), ('peer', 2)]
    for r in rows:
        assert r['measured'] == 'True', r
        assert int(r['verified']) == int(r['nodes']), r
        assert not r['errors'], r
    assert 'goal: thunder qcow2 import <= 1.5x the raw upload' in \
        result.stdout, result.stdout[-3000:]
    with open(report) as f:
        *flows, bulk = json.load(f)
    assert [f['flow'] for f in flows] == ['thunder', 'thunder-import']
    for flow in flows:
        assert flow['error'] is None, flow
        assert (flow['round'], flow['volumes'], flow['clones']) == (1, 2, 2)
        assert flow['bytes_copied'] == 0 and flow['admin_calls'] == 0
        assert flow['image_volume_gib'] == 1
        assert flow['server_max_s'] >= 0 and flow['upload_server_s'] >= 0
    assert bulk['flow'] == 'bulk-boot' and bulk['returncode'] == 0
    assert bulk['results_dir'] == out
    assert bulk['runs'] == 2 and bulk['unverified_nodes'] == 0
