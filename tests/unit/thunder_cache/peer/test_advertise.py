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

"""Peer advertisements in the image-volume's Cinder metadata."""

import logging
import random
import threading
import time
from unittest import mock

from cinderclient import api_versions
from cinderclient import exceptions as cinder_exceptions
from keystoneauth1 import exceptions as ks_exceptions
from oslo_config import cfg
import pytest

from thunder_cache.peer.advertise import advertiser as advertiser_mod
from thunder_cache.peer.advertise import cinder as cinder_records
from thunder_cache.peer.advertise import options as advertise_opts
from thunder_cache.peer.advertise import records as peer_records
from thunder_cache.peer import protocol

VOL = '0b6f3c1e-2f0d-4d43-9a4e-3b1f0e9d7a21'
VOL2 = '5d1c2b3a-4e5f-4a6b-8c7d-9e0f1a2b3c4d'
NOW = 1_700_000_000
URL_A = 'http://compute-1:7485'
URL_B = 'http://compute-2:7485'
URL_C = 'http://10.0.0.3:7485'


def item(url, since, expires):
    return '%s %d %d' % (url, since, expires)


# -- keys and values -------------------------------------------------------

def test_peer_key_is_prefix_and_node_id():
    assert peer_records.peer_key('compute-1') == 'thunder_peer_compute-1'


def test_peer_key_of_longest_node_id_fits_cinder():
    node_id = 'n' * 64
    key = peer_records.peer_key(node_id)
    assert key == peer_records.PEER_PREFIX + node_id
    assert len(key) <= peer_records.MAX_METADATA_LENGTH


@pytest.mark.parametrize('node_id', ['', 'n' * 65, 'a/b', '-x', 'a b',
                                     None, 'é'])
def test_peer_key_refuses_invalid_node_ids(node_id):
    with pytest.raises(ValueError):
        peer_records.peer_key(node_id)


def test_peer_value_format_and_round_trip():
    value = peer_records.peer_value(URL_A + '/', NOW, NOW + 300)
    assert value == 'http://compute-1:7485 %d %d' % (NOW, NOW + 300)
    assert peer_records.parse_peer_value(value) == (URL_A, NOW, NOW + 300)


def test_peer_value_of_longest_url_fits_cinder():
    host = '.'.join(['h' * 63] * 2) + '.' + 'h' * (
        protocol.MAX_URL_LENGTH - len('http://:65535') - 2 * 64)
    url = 'http://%s:65535' % host
    assert len(url) == protocol.MAX_URL_LENGTH
    value = peer_records.peer_value(url, 10 ** 12 - 2, 10 ** 12 - 1)
    assert len(value) <= peer_records.MAX_METADATA_LENGTH
    assert peer_records.parse_peer_value(value)[0] == url


@pytest.mark.parametrize('url', [
    'https://compute-1:7485', 'ftp://compute-1:7485', 'http://compute-1',
    'http://compute-1:0', 'http://compute-1:70000', 'file:///etc/passwd',
    'http://a b:1', 'http://' + 'a' * 300 + ':1', None, 7485])
def test_peer_value_refuses_bad_urls(url):
    with pytest.raises(ValueError):
        peer_records.peer_value(url, NOW, NOW + 1)


@pytest.mark.parametrize('since, expires', [
    (-1, NOW), (NOW, -1), (1.5, NOW), (NOW, '1'), (True, NOW),
    (NOW, 10 ** 12), (NOW, NOW - 1)])
def test_peer_value_refuses_bad_times(since, expires):
    with pytest.raises(ValueError):
        peer_records.peer_value(URL_A, since, expires)


# -- reading advertisements --------------------------------------------------

def test_peers_oldest_first_and_expired_dropped():
    metadata = {
        'thunder_peer_c': item(URL_C, NOW - 10, NOW + 100),
        'thunder_peer_a': item(URL_A, NOW - 500, NOW + 100),
        'thunder_peer_b': item(URL_B, NOW - 50, NOW + 100),
        'thunder_peer_old': item('http://old:1', NOW - 900, NOW),
        'image_owner': 'someone',
    }
    assert peer_records.peers_from_metadata(metadata, now=NOW) == [
        URL_A, URL_B, URL_C]


def test_peers_expiry_boundary():
    metadata = {'thunder_peer_a': item(URL_A, NOW - 5, NOW + 1)}
    assert peer_records.peers_from_metadata(metadata, now=NOW) == [URL_A]
    assert peer_records.peers_from_metadata(metadata, now=NOW + 1) == []


def test_peers_ties_broken_by_key():
    metadata = {
        'thunder_peer_z': item(URL_A, NOW, NOW + 10),
        'thunder_peer_m': item(URL_B, NOW, NOW + 10),
        'thunder_peer_b': item(URL_C, NOW, NOW + 10),
    }
    assert peer_records.peers_from_metadata(metadata, now=NOW) == [
        URL_C, URL_B, URL_A]


def test_peers_normalized_deduplicated_and_excluded():
    metadata = {
        'thunder_peer_a': item(URL_A + '/', NOW - 9, NOW + 10),
        'thunder_peer_a2': item(URL_A, NOW - 1, NOW + 10),
        'thunder_peer_b': item(URL_B, NOW - 5, NOW + 10),
        'thunder_peer_me': item(URL_C, NOW - 20, NOW + 10),
    }
    assert peer_records.peers_from_metadata(
        metadata, now=NOW, exclude=(URL_C + '/', 'not a url')) == [
            URL_A, URL_B]


def test_since_in_the_future_is_ignored(caplog):
    skew = protocol.CLOCK_SKEW
    metadata = {
        'thunder_peer_a': item(URL_A, NOW + skew, NOW + skew + 300),
        'thunder_peer_b': item(URL_B, NOW + skew + 1, NOW + skew + 300),
        'thunder_peer_c': item(URL_C, NOW - 10, NOW + 300),
    }
    found = peer_records.peers_from_metadata(metadata, now=NOW)
    assert found == [URL_C, URL_A]
    assert 'in the future' in caplog.text


def test_since_before_the_image_volume_is_ignored(caplog):
    """A claim to be the oldest holder must be possible."""
    created = NOW - 1000
    skew = protocol.CLOCK_SKEW
    metadata = {
        'thunder_peer_zero': item('http://10.0.0.66:1', 0, NOW + 300),
        'thunder_peer_early': item('http://10.0.0.77:1', created - skew - 1,
                                   NOW + 300),
        'thunder_peer_a': item(URL_A, created - skew, NOW + 300),
        'thunder_peer_b': item(URL_B, NOW - 5, NOW + 300),
    }
    assert peer_records.peers_from_metadata(metadata, now=NOW,
                                            created_at=created) == [URL_A,
                                                                    URL_B]
    assert 'before its image-volume was created' in caplog.text
    # Unknown creation time: only the order counts.
    assert peer_records.peers_from_metadata(metadata, now=NOW)[:2] == [
        'http://10.0.0.66:1', 'http://10.0.0.77:1']


@pytest.mark.parametrize('value, expected', [
    ('2023-11-14T22:13:20.000000', NOW), ('2023-11-14T22:13:20', NOW),
    ('2023-11-14T22:13:20Z', NOW), ('2023-11-14T23:13:20+01:00', NOW),
    ('yesterday', None), ('', None), (NOW, None), (None, None),
    ('2023-11-14T22:13:20' + ' ' * 100, None)])
def test_unix_time(value, expected):
    assert peer_records.unix_time(value) == expected


def test_peers_default_now_is_the_clock():
    now = int(time.time())
    metadata = {'thunder_peer_a': item(URL_A, now - 5, now + 60),
                'thunder_peer_b': item(URL_B, now - 100, now - 1)}
    assert peer_records.peers_from_metadata(metadata) == [URL_A]


HOSTILE = [
    'https://evil:443 %d %d' % (NOW, NOW + 10),
    'file:///etc/passwd %d %d' % (NOW, NOW + 10),
    'javascript:alert(1) %d %d' % (NOW, NOW + 10),
    'gopher://evil:70 %d %d' % (NOW, NOW + 10),
    'http://evil %d %d' % (NOW, NOW + 10),
    'http://user@evil:80 %d %d' % (NOW, NOW + 10),
    'http://evil:80/path %d %d' % (NOW, NOW + 10),
    'http://evil:80?q=1 %d %d' % (NOW, NOW + 10),
    'http://evil:99999 %d %d' % (NOW, NOW + 10),
    'garbage',
    '',
    ' ',
    URL_A,
    '%s %d' % (URL_A, NOW + 10),
    '%s %d %d extra' % (URL_A, NOW, NOW + 10),
    '%s  %d %d' % (URL_A, NOW, NOW + 10),
    '%s\t%d\t%d' % (URL_A, NOW, NOW + 10),
    '%s %d %s' % (URL_A, NOW, '9' * 400),
    '%s %s %d' % (URL_A, '1' * 13, NOW + 10),
    '%s -1 %d' % (URL_A, NOW + 10),
    '%s %d +%d' % (URL_A, NOW, NOW + 10),
    '%s 0%d %d' % (URL_A, NOW, NOW + 10),
    '%s %d 1e10' % (URL_A, NOW),
    '%s %d %d.5' % (URL_A, NOW, NOW + 10),
    '%s %s %s' % (URL_A, '\uff11' * 3, '\uff12' * 3),
    '%s %d %d' % (URL_A, NOW + 10, NOW + 5),
    # Valid for longer than any node writes: would never go away.
    '%s %d %d' % (URL_A, NOW, 10 ** 12 - 1),
    '%s %d %d' % (URL_A, NOW, NOW + peer_records.MAX_TTL + 3600),
    'http://%s:1 %d %d' % ('a' * 300, NOW, NOW + 10),
    None,
    12345,
    ['http://x:1', NOW, NOW + 10],
]


@pytest.mark.parametrize('value', HOSTILE)
def test_hostile_values_are_skipped_with_a_warning(value, caplog):
    metadata = {'thunder_peer_bad': value,
                'thunder_peer_good': item(URL_B, NOW, NOW + 10)}
    with caplog.at_level(logging.WARNING, logger=peer_records.__name__):
        assert peer_records.peers_from_metadata(metadata, now=NOW) == [URL_B]
    assert 'thunder_peer_bad' in caplog.text


@pytest.mark.parametrize('key', ['thunder_peer_', 'thunder_peer_a/b',
                                 'thunder_peer_' + 'n' * 65,
                                 'thunder_peer_-a', 'thunder_peer_a b'])
def test_invalid_node_ids_in_keys_are_skipped(key, caplog):
    metadata = {key: item(URL_A, NOW, NOW + 10)}
    with caplog.at_level(logging.WARNING, logger=peer_records.__name__):
        assert peer_records.peers_from_metadata(metadata, now=NOW) == []
    assert 'invalid node id' in caplog.text


def test_other_metadata_is_ignored_silently(caplog):
    metadata = {'image_owner': 'x', 'thunder_peerless': 'junk', 7: 'x',
                'readonly': 'True'}
    with caplog.at_level(logging.WARNING, logger=peer_records.__name__):
        assert peer_records.peers_from_metadata(metadata, now=NOW) == []
    assert caplog.text == ''


@pytest.mark.parametrize('metadata', [None, [], 'thunder_peer_a', 42])
def test_metadata_that_is_not_a_dict(metadata):
    assert peer_records.peers_from_metadata(metadata, now=NOW) == []


def test_fuzzed_values_never_raise_nor_yield_non_http_urls():
    rng = random.Random(1234)
    alphabet = 'htp:/0123456789 .-[]aZ\t\x00é%s' % URL_A
    for _ in range(3000):
        length = rng.randint(0, 300)
        value = ''.join(rng.choice(alphabet) for _ in range(length))
        if rng.random() < 0.3:
            value = '%s %s %s' % (value[:40], rng.choice(
                [str(NOW), '0', value[40:60]]), str(NOW + rng.randint(
                    -10, 10 ** 6)))
        metadata = {'thunder_peer_x': value}
        for url in peer_records.peers_from_metadata(metadata, now=NOW):
            assert url == protocol.normalize_url(url)
            assert url.startswith('http://')


# -- the advertiser ----------------------------------------------------------

class FakeRecords:
    """Volume metadata in memory; fails while ``fail`` is set."""

    def __init__(self):
        self.metadata = {}
        self.created_at = {}
        self.fail = False
        self.calls = []

    def _check(self, call):
        self.calls.append(call)
        if self.fail:
            raise cinder_records.RecordsError('Cinder is down')

    def get_metadata(self, volume_id):
        self._check(('get', volume_id))
        return dict(self.metadata.get(volume_id, {}))

    def get_volume(self, volume_id):
        return self.get_metadata(volume_id), self.created_at.get(volume_id)

    def set_metadata(self, volume_id, metadata):
        self._check(('set', volume_id, dict(metadata)))
        self.metadata.setdefault(volume_id, {}).update(metadata)

    def delete_metadata(self, volume_id, keys):
        self._check(('delete', volume_id, list(keys)))
        for key in keys:
            self.metadata.get(volume_id, {}).pop(key, None)


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def records():
    return FakeRecords()


@pytest.fixture
def clock():
    return Clock()


def make(records, clock, node='n1', url=URL_A, ttl=300, refresh=100):
    return advertiser_mod.Advertiser(records, node, url, ttl=ttl,
                                     refresh_interval=refresh, clock=clock)


def test_advertise_writes_at_once(records, clock):
    adv = make(records, clock)
    adv.advertise(VOL)
    assert records.metadata[VOL] == {
        'thunder_peer_n1': item(URL_A, NOW, NOW + 300)}
    assert adv.volumes == [VOL]


def test_advertise_canonicalises_the_volume_id(records, clock):
    adv = make(records, clock)
    adv.advertise(VOL.upper())
    assert list(records.metadata) == [VOL]
    adv.withdraw(VOL.upper())
    assert records.metadata[VOL] == {}


@pytest.mark.parametrize('volume_id', ['', 'x', '../../etc', None,
                                       VOL + '/metadata'])
def test_advertise_refuses_invalid_volume_ids(records, clock, volume_id):
    adv = make(records, clock)
    with pytest.raises(ValueError):
        adv.advertise(volume_id)
    assert records.calls == []


def test_advertise_keeps_other_items(records, clock):
    records.metadata[VOL] = {'image_owner': 'p1',
                             'thunder_peer_n2': item(URL_B, 1, NOW + 9)}
    make(records, clock).advertise(VOL)
    assert records.metadata[VOL]['image_owner'] == 'p1'
    assert records.metadata[VOL]['thunder_peer_n2'] == item(URL_B, 1,
                                                            NOW + 9)


def test_refresh_extends_expiry_and_keeps_since(records, clock):
    adv = make(records, clock)
    adv.advertise(VOL)
    clock.now += 100
    adv.refresh()
    assert records.metadata[VOL]['thunder_peer_n1'] == item(
        URL_A, NOW, NOW + 400)
    clock.now += 1000
    adv.refresh()
    assert records.metadata[VOL]['thunder_peer_n1'] == item(
        URL_A, NOW, NOW + 1400)


def test_advertise_again_is_a_no_op_while_it_holds(records, clock):
    adv = make(records, clock)
    adv.advertise(VOL)
    clock.now += 50
    calls = len(records.calls)
    adv.advertise(VOL)
    assert len(records.calls) == calls
    assert records.metadata[VOL]['thunder_peer_n1'] == item(
        URL_A, NOW, NOW + 300)


def test_since_adopted_from_our_unexpired_record(records, clock):
    records.metadata[VOL] = {'thunder_peer_n1': item(URL_A + '/', NOW - 3600,
                                                     NOW + 20)}
    adv = make(records, clock)
    adv.advertise(VOL)
    assert records.metadata[VOL]['thunder_peer_n1'] == item(
        URL_A, NOW - 3600, NOW + 300)


@pytest.mark.parametrize('existing', [
    item(URL_A, NOW - 3600, NOW),               # expired
    item(URL_B, NOW - 3600, NOW + 20),          # another URL under our key
    item(URL_A, NOW - 3600, NOW + 10 ** 6),     # claims too long a life
    'garbage',
])
def test_since_not_adopted_from_other_records(records, clock, existing):
    records.metadata[VOL] = {'thunder_peer_n1': existing}
    adv = make(records, clock)
    adv.advertise(VOL)
    assert records.metadata[VOL]['thunder_peer_n1'] == item(
        URL_A, NOW, NOW + 300)


def test_order_of_holders_is_stable_across_refreshes(records, clock):
    first = make(records, clock, node='zz', url=URL_B)
    first.advertise(VOL)
    clock.now += 10
    second = make(records, clock, node='aa', url=URL_A)
    second.advertise(VOL)
    clock.now += 10
    third = make(records, clock, node='mm', url=URL_C)
    third.advertise(VOL)
    for _ in range(5):
        clock.now += 100
        for adv in (third, second, first):
            adv.refresh()
        assert third.peers(VOL) == [URL_B, URL_A]
        assert second.peers(VOL) == [URL_B, URL_C]
        assert third.peers(VOL, include_self=True) == [URL_B, URL_A, URL_C]


def test_a_node_that_stops_refreshing_expires(records, clock):
    alive = make(records, clock, node='a', url=URL_A)
    dead = make(records, clock, node='b', url=URL_B)
    dead.advertise(VOL)
    alive.advertise(VOL)
    assert alive.peers(VOL) == [URL_B]
    clock.now += 299
    alive.refresh()
    assert alive.peers(VOL) == [URL_B]
    clock.now += 1
    alive.refresh()
    assert alive.peers(VOL) == []
    assert dead.peers(VOL) == [URL_A]


def test_peers_of_a_deleted_image_volume_raise(records, clock):
    adv = make(records, clock)
    records.get_volume = mock.Mock(
        side_effect=cinder_records.VolumeGone('404'))
    with pytest.raises(cinder_records.VolumeGone):
        adv.peers(VOL)


def test_cinder_errors_never_raise_and_are_retried(records, clock, caplog):
    adv = make(records, clock)
    records.fail = True
    with caplog.at_level(logging.WARNING, logger=peer_records.__name__):
        adv.advertise(VOL)
        adv.refresh()
        assert adv.withdraw(VOL2) is False
        assert adv.peers(VOL) == []
    assert 'Cinder is down' in caplog.text
    assert VOL not in records.metadata
    records.fail = False
    clock.now += 100
    adv.refresh()
    # The first successful write still reads the record once, and since is
    # when this process first advertised the volume.
    assert ('get', VOL) in records.calls
    assert records.metadata[VOL]['thunder_peer_n1'] == item(
        URL_A, NOW, NOW + 400)


def test_repeated_failures_warn_once(records, clock, caplog):
    adv = make(records, clock)
    records.fail = True
    with caplog.at_level(logging.WARNING, logger=peer_records.__name__):
        adv.advertise(VOL)
        for _ in range(5):
            adv.refresh()
    assert caplog.text.count('Could not advertise') == 1


def test_advertise_after_a_failure_writes_again(records, clock):
    adv = make(records, clock)
    records.fail = True
    adv.advertise(VOL)
    records.fail = False
    adv.advertise(VOL)
    assert records.metadata[VOL]['thunder_peer_n1'] == item(
        URL_A, NOW, NOW + 300)


def test_unexpected_records_errors_propagate(records, clock):
    # Only Cinder's errors are swallowed; a bug must not be hidden.
    adv = make(records, clock)
    records.set_metadata = mock.Mock(side_effect=TypeError('bug'))
    with pytest.raises(TypeError):
        adv.advertise(VOL)


def test_withdraw_deletes_our_key_only(records, clock):
    records.metadata[VOL] = {'thunder_peer_n2': item(URL_B, 1, NOW + 9)}
    adv = make(records, clock)
    adv.advertise(VOL)
    assert adv.withdraw(VOL) is True
    assert records.metadata[VOL] == {
        'thunder_peer_n2': item(URL_B, 1, NOW + 9)}
    assert adv.volumes == []
    adv.refresh()
    assert 'thunder_peer_n1' not in records.metadata[VOL]


def test_withdraw_of_a_volume_never_advertised(records, clock):
    adv = make(records, clock)
    assert adv.withdraw(VOL) is True
    assert records.calls == [('delete', VOL, ['thunder_peer_n1'])]


def test_readvertise_after_withdraw_gets_a_new_since(records, clock):
    adv = make(records, clock)
    adv.advertise(VOL)
    adv.withdraw(VOL)
    clock.now += 60
    adv.advertise(VOL)
    assert records.metadata[VOL]['thunder_peer_n1'] == item(
        URL_A, NOW + 60, NOW + 360)


def test_peers_skip_items_older_than_the_volume(records, clock):
    records.metadata[VOL] = {
        'thunder_peer_x': item('http://10.0.0.66:1', 5, NOW + 10),
        'thunder_peer_y': item(URL_B, NOW - 50, NOW + 10)}
    records.created_at[VOL] = NOW - 100
    assert make(records, clock).peers(VOL) == [URL_B]


def test_an_ignored_item_is_warned_about_once(records, clock, caplog):
    """The peers are read every few seconds: no warning flood."""
    records.metadata[VOL] = {'thunder_peer_x': 'garbage',
                             'thunder_peer_y': item(URL_B, NOW, NOW + 10)}
    adv = make(records, clock)
    with caplog.at_level(logging.WARNING, logger=peer_records.__name__):
        for _ in range(5):
            assert adv.peers(VOL) == [URL_B]
        assert caplog.text.count('thunder_peer_x') == 1
        records.metadata[VOL]['thunder_peer_x'] = 'other garbage'
        assert adv.peers(VOL) == [URL_B]
        assert caplog.text.count('thunder_peer_x') == 2


def test_peers_excludes_self(records, clock):
    records.metadata[VOL] = {'thunder_peer_x': item(URL_A, 1, NOW + 10),
                             'thunder_peer_y': item(URL_B, 2, NOW + 10)}
    adv = make(records, clock, url=URL_A + '/')
    assert adv.peers(VOL) == [URL_B]


def test_invalid_settings():
    with pytest.raises(ValueError):
        make(FakeRecords(), Clock(), ttl=100, refresh=100)
    with pytest.raises(ValueError):
        make(FakeRecords(), Clock(), refresh=0)
    with pytest.raises(ValueError):
        make(FakeRecords(), Clock(), ttl=peer_records.MAX_TTL + 1,
             refresh=100)
    with pytest.raises(ValueError):
        make(FakeRecords(), Clock(), url='https://x:1')
    with pytest.raises(ValueError):
        make(FakeRecords(), Clock(), node='bad/node')


def test_stop_withdraws_everything(records, clock):
    adv = make(records, clock)
    adv.advertise(VOL)
    adv.advertise(VOL2)
    records.metadata[VOL]['thunder_peer_n2'] = item(URL_B, 1, NOW + 9)
    adv.stop()
    assert records.metadata == {
        VOL: {'thunder_peer_n2': item(URL_B, 1, NOW + 9)}, VOL2: {}}
    assert adv.volumes == []


def test_stop_without_withdraw_keeps_the_records(records, clock):
    adv = make(records, clock)
    adv.advertise(VOL)
    adv.stop(withdraw=False)
    assert 'thunder_peer_n1' in records.metadata[VOL]


def test_stop_when_cinder_fails_does_not_raise(records, clock, caplog):
    adv = make(records, clock)
    adv.advertise(VOL)
    records.fail = True
    with caplog.at_level(logging.WARNING, logger=peer_records.__name__):
        adv.stop()
    assert 'Could not withdraw' in caplog.text


def test_thread_refreshes_until_stopped(records):
    adv = advertiser_mod.Advertiser(records, 'n1', URL_A, ttl=3,
                                    refresh_interval=0.02)
    adv.advertise(VOL)
    first = records.metadata[VOL]['thunder_peer_n1']
    adv.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sets = [c for c in records.calls if c[0] == 'set']
            if len(sets) >= 3:
                break
            time.sleep(0.01)
        assert len(sets) >= 3
    finally:
        adv.stop()
    _url, since, _expires = peer_records.parse_peer_value(first)
    assert all(c[2]['thunder_peer_n1'].split()[1] == str(since)
               for c in sets)
    assert records.metadata[VOL] == {}
    assert not any(t.name == 'thunder-advertise' and t.is_alive()
                   for t in threading.enumerate())
    calls = len(records.calls)
    time.sleep(0.1)
    assert len(records.calls) == calls


def test_refresh_errors_do_not_kill_the_thread(records):
    adv = advertiser_mod.Advertiser(records, 'n1', URL_A, ttl=3,
                                    refresh_interval=0.02)
    adv.advertise(VOL)
    records.fail = True
    adv.start()
    try:
        time.sleep(0.15)
        records.fail = False
        records.calls.clear()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                c[0] == 'set' for c in records.calls):
            time.sleep(0.01)
        assert any(c[0] == 'set' for c in records.calls)
    finally:
        adv.stop()


class BlockingRecords(FakeRecords):
    """Writes hang until released, like an unreachable Cinder."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.writing = threading.Event()

    def set_metadata(self, volume_id, metadata):
        self.writing.set()
        self.release.wait(30)
        super().set_metadata(volume_id, metadata)


def test_stop_is_bounded_when_cinder_hangs(clock):
    records = BlockingRecords()
    adv = make(records, clock)
    writer = threading.Thread(target=adv.advertise, args=(VOL,))
    writer.start()
    try:
        assert records.writing.wait(10)
        started = time.monotonic()
        adv.stop(timeout=0.3)
        assert time.monotonic() - started < 5
        assert adv.volumes == []
    finally:
        records.release.set()
        writer.join(10)


def test_withdraw_waits_for_a_write_in_progress(clock):
    records = BlockingRecords()
    adv = make(records, clock)
    writer = threading.Thread(target=adv.advertise, args=(VOL,))
    writer.start()
    assert records.writing.wait(10)
    withdrawer = threading.Thread(target=adv.withdraw, args=(VOL,))
    withdrawer.start()
    time.sleep(0.05)
    records.release.set()
    writer.join(10)
    withdrawer.join(10)
    # The delete came after the write: nothing is left advertised.
    assert records.metadata[VOL] == {}


# -- Cinder ------------------------------------------------------------------

class FakeVolumes:
    def __init__(self, cinder):
        self.cinder = cinder

    def get(self, volume_id):
        self.cinder.maybe_fail()
        if volume_id not in self.cinder.metadata:
            raise cinder_exceptions.NotFound(404, 'Volume not found')
        return mock.Mock(id=volume_id,
                         metadata=dict(self.cinder.metadata[volume_id]),
                         created_at=self.cinder.created_at)

    def set_metadata(self, volume, metadata):
        self.cinder.maybe_fail()
        self.cinder.metadata[volume].update(metadata)
        return metadata


class FakeHttp:
    def __init__(self, cinder):
        self.cinder = cinder
        self.deleted = []

    def delete(self, url):
        self.cinder.maybe_fail()
        self.deleted.append(url)
        parts = url.split('/')
        assert parts[:2] == ['', 'volumes'] and parts[3] == 'metadata'
        try:
            del self.cinder.metadata[parts[2]][parts[4]]
        except KeyError:
            raise cinder_exceptions.NotFound(404, 'not found')
        return None, None


class FakeCinderClient:
    """The part of cinderclient.v3.Client that CinderRecords uses."""

    def __init__(self):
        self.metadata = {VOL: {'image_owner': 'p'}}
        self.created_at = '2023-11-14T22:13:20.000000'
        self.error = None
        self.volumes = FakeVolumes(self)
        self.client = FakeHttp(self)

    def maybe_fail(self):
        if self.error is not None:
            raise self.error


@pytest.fixture
def cinder():
    return FakeCinderClient()


def test_records_get_set_delete(cinder):
    records = cinder_records.CinderRecords(cinder)
    records.set_metadata(VOL, {'thunder_peer_a': 'v'})
    assert records.get_metadata(VOL) == {'image_owner': 'p',
                                         'thunder_peer_a': 'v'}
    records.delete_metadata(VOL, ['thunder_peer_a', 'absent'])
    assert records.get_metadata(VOL) == {'image_owner': 'p'}
    assert cinder.client.deleted == [
        '/volumes/%s/metadata/thunder_peer_a' % VOL,
        '/volumes/%s/metadata/absent' % VOL]


def test_records_get_volume_with_its_creation_time(cinder):
    records = cinder_records.CinderRecords(cinder)
    assert records.get_volume(VOL) == ({'image_owner': 'p'}, NOW)
    cinder.created_at = 'not a time'
    assert records.get_volume(VOL) == ({'image_owner': 'p'}, None)


def test_records_quote_keys_in_paths(cinder):
    cinder_records.CinderRecords(cinder).delete_metadata(VOL, ['a/b c'])
    assert cinder.client.deleted == ['/volumes/%s/metadata/a%%2Fb%%20c'
                                     % VOL]


@pytest.mark.parametrize('error', [
    cinder_exceptions.ClientException(500, 'boom'),
    cinder_exceptions.Forbidden(403, 'policy'),
    ks_exceptions.ConnectFailure('no route'),
    ks_exceptions.Unauthorized('bad password'),
    ks_exceptions.EndpointNotFound('no volumev3'),
])
def test_records_wrap_client_errors(cinder, error):
    records = cinder_records.CinderRecords(cinder)
    cinder.error = error
    for call in (lambda: records.get_metadata(VOL),
                 lambda: records.set_metadata(VOL, {'k': 'v'}),
                 lambda: records.delete_metadata(VOL, ['k'])):
        with pytest.raises(cinder_records.RecordsError) as info:
            call()
        assert info.value.cause is error
        assert VOL in str(info.value)
        assert type(error).__name__ in str(info.value)


def test_records_missing_volume_is_an_error_on_read(cinder):
    with pytest.raises(cinder_records.VolumeGone) as info:
        cinder_records.CinderRecords(cinder).get_metadata(VOL2)
    assert isinstance(info.value, cinder_records.RecordsError)
    assert isinstance(info.value.cause, cinder_exceptions.NotFound)


@pytest.mark.parametrize('volume_id', ['x', '../volumes', None])
def test_records_refuse_invalid_volume_ids(cinder, volume_id):
    records = cinder_records.CinderRecords(cinder)
    with pytest.raises(ValueError):
        records.get_metadata(volume_id)
    with pytest.raises(ValueError):
        records.delete_metadata(volume_id, ['k'])
    assert cinder.client.deleted == []


def test_advertiser_over_cinder_records(cinder, clock):
    adv = make(cinder_records.CinderRecords(cinder), clock)
    other = make(cinder_records.CinderRecords(cinder), clock, node='n0',
                 url=URL_B)
    other.advertise(VOL)
    clock.now += 1
    adv.advertise(VOL)
    assert adv.peers(VOL) == [URL_B]
    assert other.peers(VOL) == [URL_A]
    cinder.error = ks_exceptions.ConnectFailure('down')
    adv.refresh()
    assert adv.peers(VOL) == []
    cinder.error = None
    adv.stop()
    assert set(cinder.metadata[VOL]) == {'image_owner', 'thunder_peer_n0'}


# -- configuration -----------------------------------------------------------

def _conf(**overrides):
    conf = cfg.ConfigOpts()
    advertise_opts.register_opts(conf)
    conf([], project='thunder-test', default_config_files=[])
    for name, value in overrides.items():
        conf.set_override(name, value, group='advertise')
    return conf


def test_defaults():
    conf = _conf()
    group = conf.advertise
    assert group.enabled is False
    assert group.ttl == 300
    assert group.refresh_interval == 100
    assert group.region_name is None
    assert group.interface == 'internal'
    assert group.cinder_endpoint_override is None
    assert group.api_version == '3.0'
    assert group.timeout == advertise_opts.DEFAULT_TIMEOUT
    assert group.auth_type is None


def test_list_opts_has_ours_session_and_password_auth():
    [(group, opts)] = advertise_opts.list_opts()
    assert group == 'advertise'
    names = [o.dest for o in opts]
    assert len(names) == len(set(names))
    assert {'enabled', 'ttl', 'refresh_interval', 'region_name',
            'interface', 'cinder_endpoint_override', 'api_version',
            'timeout', 'cafile', 'insecure', 'auth_type', 'auth_url',
            'username', 'password', 'project_name', 'user_domain_name',
            'project_domain_name'} <= set(names)
    timeout = [o for o in opts if o.dest == 'timeout'][0]
    assert timeout.default == advertise_opts.DEFAULT_TIMEOUT
    assert [o for o in opts if o.dest == 'password'][0].secret


def test_list_opts_do_not_change_keystoneauth_defaults():
    advertise_opts.list_opts()
    from keystoneauth1 import loading
    [timeout] = [o for o in loading.get_session_conf_options()
                 if o.dest == 'timeout']
    assert timeout.default is None


@pytest.mark.parametrize('name, value', [
    ('interface', 'private'), ('api_version', '2.0'),
    ('api_version', '3.x'), ('ttl', 5), ('ttl', peer_records.MAX_TTL + 1),
    ('cinder_endpoint_override', 'ftp://x')])
def test_invalid_option_values(name, value):
    with pytest.raises(ValueError):
        _conf(**{name: value})


def test_from_conf_without_auth_type():
    with pytest.raises(cinder_records.RecordsError) as info:
        cinder_records.CinderRecords.from_conf(_conf())
    assert 'auth_type' in str(info.value)


def test_from_conf_with_incomplete_auth():
    conf = _conf(auth_type='password')
    with pytest.raises(cinder_records.RecordsError) as info:
        cinder_records.CinderRecords.from_conf(conf)
    assert 'auth_url' in str(info.value)


def test_from_conf_passes_interface_region_endpoint_version():
    conf = _conf(region_name='RegionTwo', interface='admin',
                 cinder_endpoint_override='http://cinder:8776/v3',
                 api_version='3.15')
    auth, session = object(), mock.Mock(name='session')
    with mock.patch.object(cinder_records.ks_loading,
                           'load_auth_from_conf_options',
                           return_value=auth) as load_auth, \
            mock.patch.object(cinder_records.ks_loading,
                              'load_session_from_conf_options',
                              return_value=session) as load_session:
        records = cinder_records.CinderRecords.from_conf(conf)
    load_auth.assert_called_once_with(conf, 'advertise')
    load_session.assert_called_once_with(conf, 'advertise', auth=auth)
    http = records.client.client
    assert http.session is session
    assert http.interface == 'admin'
    assert http.region_name == 'RegionTwo'
    assert http.endpoint_override == 'http://cinder:8776/v3'
    assert records.client.api_version == api_versions.APIVersion('3.15')


def test_from_conf_reads_a_config_file(tmp_path):
    path = tmp_path / 'thunder-cache.conf'
    path.write_text('[advertise]\n'
                    'enabled = true\n'
                    'auth_type = password\n'
                    'auth_url = http://keystone:5000/v3\n'
                    'username = thunder\n'
                    'password = secret\n'
                    'project_name = service\n'
                    'user_domain_name = Default\n'
                    'project_domain_name = Default\n')
    conf = cfg.ConfigOpts()
    advertise_opts.register_opts(conf)
    conf([], project='thunder-test', default_config_files=[str(path)])
    assert conf.advertise.enabled is True
    records = cinder_records.CinderRecords.from_conf(conf)
    http = records.client.client
    assert http.interface == 'internal'
    assert http.region_name is None
    assert http.session.timeout == advertise_opts.DEFAULT_TIMEOUT
    assert http.session.auth.auth_url == 'http://keystone:5000/v3'
    assert http.session.auth._username == 'thunder'
