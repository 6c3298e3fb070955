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

"""The demo's flows: rounds, medians, server-side times and goal lines."""

import argparse
from unittest import mock

import pytest

from thunder_stack import clients
from thunder_stack import demo
from thunder_stack import flows
from thunder_stack import services as svc


def test_timestamps_of_glance_and_cinder():
    assert flows.parse_time('2026-12-03T11:20:05Z') - flows.parse_time(
        '2026-12-03T11:20:01.000000') == 4
    assert flows.server_seconds({'created_at': '2026-12-03T11:59:58Z',
                                 'updated_at': '2026-12-03T12:00:09Z'}) == 11
    with pytest.raises(svc.StackError, match='unreadable timestamp'):
        flows.parse_time('yesterday')


def test_rounds_interleave_and_rotate_the_flows():
    ran = []

    def run_flow(stack, api, name, image, args, count):
        ran.append((name, count))
        return {'flow': name, 'volumes': count, 'error': None}

    args = argparse.Namespace(rounds=3, volumes=[10, 100],
                              image_size_mib=64)
    with mock.patch.object(flows, 'run_flow', side_effect=run_flow):
        runs = flows.run_all(None, None, ['thunder', 'upstream'], 'img',
                             args, log=lambda message: None)
    assert ran == [('thunder', 10), ('upstream', 10),
                   ('thunder', 100), ('upstream', 100),
                   ('upstream', 10), ('thunder', 10),
                   ('upstream', 100), ('thunder', 100),
                   ('thunder', 10), ('upstream', 10),
                   ('thunder', 100), ('upstream', 100)]
    assert [r['round'] for r in runs] == [1] * 4 + [2] * 4 + [3] * 4


def _run(flow, count, total, upload, round_=1, error=None, **extra):
    run = {'flow': flow, 'volumes': count, 'store': flow, 'type': flow,
           'round': round_, 'error': error}
    if error is None:
        run.update(total_s=total, upload_s=upload,
                   upload_mib_s=1024 / upload, mean_s=total / 2,
                   max_s=total, upload_server_s=upload,
                   server_max_s=total - 1, clones=count, bytes_copied=0,
                   admin_calls=0, image_volume_gib=1)
    run.update(extra)
    return run


def test_summary_is_median_and_spread_and_skips_failed_rounds():
    runs = [_run('thunder', 10, 10.0, 8.0, 1),
            _run('thunder', 10, 30.0, 9.0, 2),
            _run('thunder', 10, 12.0, 7.0, 3),
            _run('thunder', 10, 0, 0, 4, error='volume went to error')]
    [entry] = flows.summarize(runs)
    assert entry['total_s'] == 12.0
    assert entry['total_s_range'] == (10.0, 30.0)
    assert entry['upload_s'] == 8.0
    assert (entry['rounds'], entry['failed']) == (4, 1)
    assert (entry['clones'], entry['volumes_made']) == (30, 30)


def test_goal_lines_compare_thunder_with_upstream_per_count():
    runs = [_run('thunder', 10, 10.0, 7.0), _run('upstream', 10, 11.0, 9.0),
            _run('thunder', 100, 60.0, 9.5),
            _run('upstream', 100, 50.0, 9.0),
            _run('upstream-cinder', 100, 1.0, 1.0)]
    lines = flows.goals(flows.summarize(runs))
    assert [(text, met) for text, met, _how in lines] == [
        ('thunder total for 10 volumes <= upstream (medians)', True),
        ('thunder upload MiB/s >= upstream (medians, 10-volume runs)', True),
        ('thunder total for 100 volumes <= upstream (medians)', False),
        ('thunder upload MiB/s >= upstream (medians, 100-volume runs)',
         False)]
    assert lines[2][2] == '60.00 s vs 50.00 s'


def test_qcow2_import_is_held_to_its_bound_of_the_raw_upload():
    runs = [_run('thunder', 10, 5.0, 6.0),
            _run('thunder-import', 10, 5.0, 9.0),
            _run('thunder', 100, 5.0, 6.0),
            _run('thunder-import', 100, 5.0, 9.1)]
    lines = flows.goals(flows.summarize(runs))
    # No upstream flow: only the import's lines, one per count.
    assert [(text, met) for text, met, _how in lines] == [
        ('thunder qcow2 import <= 1.5x the raw upload (medians, '
         '10-volume runs)', True),
        ('thunder qcow2 import <= 1.5x the raw upload (medians, '
         '100-volume runs)', False)]
    assert lines[1][2] == '9.1 s vs 6.0 s: 1.52x'


def test_the_import_flow_imports_qcow2_and_waits_until_active(tmp_path):
    raw = tmp_path / 'image.raw'
    raw.write_bytes(b'x' * 4096)
    calls = []

    def cli(stack, *args, stdin=None):
        calls.append((args, stdin.name if stdin else None))
        return '| id | %s |' % IMAGE

    api = mock.Mock()
    api.wait_image_active.return_value = {'status': 'active'}
    with mock.patch.object(clients, 'cli', side_effect=cli), \
            mock.patch.object(flows.guest_common, 'run') as run:
        run.side_effect = lambda cmd, **kw: open(cmd[-1], 'wb').close()
        image_id, image = flows._upload(
            'stack', api, 'tag', flows.FLOWS['thunder-import'], str(raw))
    assert image_id == IMAGE and image == {'status': 'active'}
    [(args, stdin)] = calls
    assert args[:2] == ('glance', 'image-create-via-import')
    assert args[args.index('--disk-format') + 1] == 'qcow2'
    assert args[args.index('--stores') + 1] == 'thunder'
    assert stdin == str(tmp_path / 'image.qcow2')
    api.wait_image_active.assert_called_once_with(IMAGE)
    # The qcow2 is made once, then reused while newer than the raw image.
    assert run.call_args[0][0][:5] == ['qemu-img', 'convert', '-f', 'raw',
                                       '-O']
    flows.make_qcow2(str(raw))
    assert run.call_count == 1


def test_a_raw_upload_must_end_active():
    api = mock.Mock()
    api.image.return_value = {'status': 'saving'}
    with mock.patch.object(clients, 'cli', return_value='| id | img |'):
        with pytest.raises(svc.StackError, match='img is saving after'):
            flows._upload('stack', api, 'tag', flows.FLOWS['thunder'], 'f')
    api.wait_image_active.assert_not_called()


def test_no_goal_without_both_flows():
    assert flows.goals(flows.summarize([_run('thunder', 10, 1.0, 1.0)])) == []


def test_table_prints_medians_spreads_errors_and_goals(capsys):
    runs = [_run('thunder', 10, 10.0, 8.0, 1),
            _run('thunder', 10, 12.0, 7.0, 2),
            _run('upstream', 10, 11.0, 9.0, 1),
            _run('upstream', 10, 0, 0, 2, error='boom')]
    args = argparse.Namespace(image_size_mib=1024, rounds=2)
    flows.print_table(runs, args, demo.goal_line)
    out = capsys.readouterr().out
    assert '2 round(s), flows interleaved; median (min-max)' in out
    thunder_row = [line for line in out.splitlines()
                   if line.startswith('10  thunder')][0]
    assert '11.00 (10.00-12.00)' in thunder_row
    assert '20/20' in thunder_row and '0/2' in thunder_row
    upstream_row = [line for line in out.splitlines()
                    if line.startswith('10  upstream')][0]
    assert '1/2' in upstream_row
    assert 'error (round 2, upstream, 10 volumes): boom' in out
    assert ('goal: thunder total for 10 volumes <= upstream (medians)'
            in out)
    assert 'met' in out
    assert thunder_row.split()[-5:] == ['0', '2/2', 'runs', '1', '0/2']


FSID = '7b2b2c3e-1111-4222-8333-944455556666'
VOLUME = '0c6f5fb7-9a4d-4a3e-8d3b-1f2e3d4c5b6a'
IMAGE = 'a1c4d3f2-5b6e-4f70-8a91-b2c3d4e5f607'
RBD_OWN = 'rbd://%s/thunder/volume-%s/thunder-clone-1' % (FSID, VOLUME)
RBD_UPSTREAM = 'rbd://%s/images/%s/snap' % (FSID, IMAGE)
THUNDER = 'thunder://%s?image_id=%s' % (VOLUME, IMAGE)


def test_the_volume_a_location_names():
    assert clients.location_volume_id(RBD_OWN) == VOLUME
    assert clients.location_volume_id(THUNDER) == VOLUME
    assert clients.location_volume_id('cinder://%s' % VOLUME) == VOLUME
    assert clients.location_volume_id(RBD_UPSTREAM) is None
    assert clients.location_volume_id('file:///x') is None


class SizeApi:
    def volumes(self, ids):
        return {vid: {'id': vid, 'size': 2} for vid in ids}


def test_image_volume_size_and_admin_calls_of_an_rbd_located_image():
    locs = [{'url': RBD_OWN, 'metadata': {'store': 'thunder'}}]
    assert flows.image_volume_gib(SizeApi(), locs) == 2
    assert flows.image_volume_gib(SizeApi(), [{'url': RBD_UPSTREAM}]) == 0
    with mock.patch.object(clients, 'register_aliases') as register:
        assert flows._register_aliases(None, IMAGE, locs) == {
            'admin_calls': 0}
    register.assert_not_called()


def test_a_thunder_uri_image_counts_its_alias_calls():
    locs = [{'url': THUNDER, 'metadata': {'store': 'thunder_uri'}}]
    added = ['cinder://%s' % VOLUME, RBD_OWN]
    with mock.patch.object(clients, 'register_aliases',
                           return_value=added) as register:
        result = flows._register_aliases('stack', IMAGE, locs)
    register.assert_called_once_with('stack', IMAGE, locs)
    assert result['admin_calls'] == 2 and result['aliases'] == added


def test_zero_copy_needs_no_admin_call_and_all_clones():
    assert flows.zero_copy_without_admin(_run('thunder', 10, 1.0, 1.0))
    for extra in ({'admin_calls': 2}, {'clones': 9}, {'bytes_copied': 1},
                  {'error': 'boom'}):
        assert not flows.zero_copy_without_admin(
            _run('thunder', 10, 1.0, 1.0, **extra))


def test_table_says_when_aliases_were_added(capsys):
    runs = [_run('thunder', 10, 1.0, 1.0, admin_calls=2,
                 aliases=['cinder://%s' % VOLUME, RBD_OWN], aliases_s=3.5)]
    flows.print_table(runs, argparse.Namespace(image_size_mib=64, rounds=1),
                      demo.goal_line)
    out = capsys.readouterr().out
    assert ('thunder: thunder:// image, aliases (cinder://, rbd://) added '
            'by 2 admin calls in 3.5 s median') in out
    row = [line for line in out.splitlines()
           if line.startswith('10  thunder')][0]
    assert '0/1 runs' in row


class FakeApi:
    def __init__(self, fail_every=0):
        self.made = []
        self.fail_every = fail_every

    def create_volume(self, name, size, image_id, volume_type):
        if self.fail_every and len(self.made) % self.fail_every == 1:
            self.made.append(None)
            raise OSError('HTTP Error 413: quota exceeded')
        vid = 'vol-%d' % len(self.made)
        self.made.append(vid)
        return vid


def test_volumes_are_asked_for_at_once():
    api = FakeApi()
    ids = []
    requested = flows._create_volumes(api, 'img', 'thunder', 'tag', 25, 1,
                                      ids)
    assert sorted(ids) == sorted(requested) == sorted(
        'vol-%d' % i for i in range(25))


def test_failed_requests_fail_the_run_but_keep_the_volumes_made():
    api = FakeApi(fail_every=2)
    ids = []
    with pytest.raises(svc.StackError, match='quota exceeded'):
        flows._create_volumes(api, 'img', 'thunder', 'tag', 6, 1, ids)
    # The volumes made are known, so that the run deletes them.
    assert ids and set(ids) == {v for v in api.made if v}


def _api_answering(*records):
    api = object.__new__(clients.Api)
    api.image = mock.Mock(side_effect=list(records))
    return api


def test_waiting_for_an_import_returns_the_active_record():
    api = _api_answering({'status': 'queued'}, {'status': 'importing'},
                         {'status': 'active', 'size': 3})
    record = api.wait_image_active('img', poll=0)
    assert record == {'status': 'active', 'size': 3}


@pytest.mark.parametrize('record, message', [
    ({'status': 'importing', 'os_glance_failed_import': 'thunder'},
     'import failed in store'),
    ({'status': 'killed'}, 'img is killed'),
    ({'status': 'deleted'}, 'img is deleted')])
def test_a_failed_import_is_an_error_not_a_wait(record, message):
    with pytest.raises(svc.StackError, match=message):
        _api_answering(record).wait_image_active('img', poll=0)


def test_waiting_for_an_import_has_a_deadline():
    api = _api_answering(*[{'status': 'importing'}] * 3)
    with pytest.raises(svc.StackError, match='img is importing after 0s'):
        api.wait_image_active('img', timeout=0, poll=0)


@pytest.mark.parametrize('name', ['thunder', 'thunder-import'])
def test_without_the_thunder_store_its_flows_use_the_rbd_store(name):
    stack = mock.Mock(state={'thunder_store': False})
    stores = []

    def upload(stack, api, tag, flow, image_path):
        stores.append(flow['store'])
        raise svc.StackError('stop here')

    args = argparse.Namespace(image_size_mib=64, keep=True)
    with mock.patch.object(flows, '_upload', side_effect=upload):
        result = flows.run_flow(stack, None, name, 'img', args, 2)
    assert stores == ['rbd'] and result['store'] == 'rbd'
    assert result['note'] == 'thunder store not available: rbd store'
    assert result['error'] == 'stop here'
