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

"""Peer advertisements in a real image-volume's metadata, end to end.

An image goes into the thunder store through Glance; nodes (advertisers
with made-up URLs) write their items into its image-volume's metadata
through the real Cinder API, with credentials read from a configuration
file as the daemon reads them; what Cinder holds is checked with the
``cinder`` CLI.
"""

import json
import time

from oslo_config import cfg
import pytest

from thunder_cache.peer.advertise import advertiser as advertiser_mod
from thunder_cache.peer.advertise import cinder as cinder_records
from thunder_cache.peer.advertise import options as advertise_opts
from thunder_cache.peer.advertise import records as peer_records
from thunder_stack import clients
from thunder_stack import flows

URL_1 = 'http://e2e-node-1:7485'
URL_2 = 'http://e2e-node-2:7485'
TTL = 300


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def _records(stack, tmp_path, user, project, password=None):
    path = tmp_path / ('thunder-cache-%s.conf' % user)
    path.write_text('\n'.join([
        '[advertise]',
        'enabled = true',
        'interface = internal',
        'region_name = RegionOne',
        'auth_type = password',
        'auth_url = %s' % stack.auth_url,
        'username = %s' % user,
        'password = %s' % (password or stack.password),
        'user_domain_name = Default',
        'project_name = %s' % project,
        'project_domain_name = Default',
        '']))
    conf = cfg.ConfigOpts()
    advertise_opts.register_opts(conf)
    conf([], project='thunder-cache', default_config_files=[str(path)])
    return cinder_records.CinderRecords.from_conf(conf)


def _cli_metadata(client, volume_id):
    """The volume's metadata as the openstack CLI shows it."""
    out = client.run('openstack', 'volume', 'show', '-f', 'json', '-c',
                     'properties', volume_id).stdout
    return json.loads(out)['properties']


@pytest.fixture
def image_volume(stack, client, thunder_store, tmp_path):
    path = tmp_path / 'advertise.raw'
    flows.make_image(str(path), 4, seed=11)
    image_id = client.upload(str(path), thunder_store,
                             name='e2e-advertise')
    return clients.image_volume_id(stack, image_id)


@pytest.mark.parametrize('user, project', [('admin', 'admin'),
                                           ('glance', 'service')])
def test_advertise_order_expiry_withdraw(stack, client, tmp_path,
                                         image_volume, user, project):
    vol = image_volume
    records = _records(stack, tmp_path, user, project)
    before = records.get_metadata(vol)
    assert not [k for k in before if k.startswith(peer_records.PEER_PREFIX)]

    now = int(time.time())
    clock_1, clock_2 = Clock(now), Clock(now + 5)
    node_1 = advertiser_mod.Advertiser(records, 'e2e-n1', URL_1, ttl=TTL,
                                       refresh_interval=100, clock=clock_1)
    node_2 = advertiser_mod.Advertiser(records, 'e2e-n2', URL_2, ttl=TTL,
                                       refresh_interval=100, clock=clock_2)
    reader_clock = Clock(now + 10)
    reader = advertiser_mod.Advertiser(
        records, 'e2e-reader', 'http://e2e-reader:7485', ttl=TTL,
        refresh_interval=100, clock=reader_clock)
    try:
        node_1.advertise(vol)
        node_2.advertise(vol)
        # A hostile item, written by anyone allowed to update the volume.
        records.set_metadata(vol, {
            'thunder_peer_evil': 'https://evil:443 0 %d' % (now + 100),
            'thunder_peer_junk': 'garbage'})

        shown = _cli_metadata(client, vol)
        assert shown['thunder_peer_e2e-n1'] == '%s %d %d' % (
            URL_1, now, now + TTL)
        assert shown['thunder_peer_e2e-n2'] == '%s %d %d' % (
            URL_2, now + 5, now + 5 + TTL)
        for key, value in before.items():
            assert shown[key] == value

        # Oldest first, read back through Cinder by another node.
        assert reader.peers(vol) == [URL_1, URL_2]
        assert node_2.peers(vol) == [URL_1]
        assert node_2.peers(vol, include_self=True) == [URL_1, URL_2]

        # Node 1 expires first unless it refreshes.
        reader_clock.now = now + TTL
        assert reader.peers(vol) == [URL_2]
        reader_clock.now = now + TTL + 5
        assert reader.peers(vol) == []

        # A refresh extends the expiry and keeps since (and the order).
        clock_1.now = now + 200
        node_1.refresh()
        assert records.get_metadata(vol)['thunder_peer_e2e-n1'] == (
            '%s %d %d' % (URL_1, now, now + 200 + TTL))
        assert reader.peers(vol) == [URL_1]

        # Withdraw deletes our own items only.
        assert node_1.withdraw(vol) is True
        node_2.stop()
        after = records.get_metadata(vol)
        assert 'thunder_peer_e2e-n1' not in after
        assert 'thunder_peer_e2e-n2' not in after
        assert after['thunder_peer_evil'].startswith('https://evil')
        reader_clock.now = now + 10
        assert reader.peers(vol) == []
        shown = _cli_metadata(client, vol)
        assert not [k for k in shown if k.startswith('thunder_peer_e2e')]
    finally:
        records.delete_metadata(vol, ['thunder_peer_e2e-n1',
                                      'thunder_peer_e2e-n2',
                                      'thunder_peer_evil',
                                      'thunder_peer_junk'])
    assert records.get_metadata(vol) == before


def test_restarted_node_keeps_its_place(stack, client, tmp_path,
                                        image_volume):
    """A node that comes back within ttl adopts its recorded since."""
    vol = image_volume
    records = _records(stack, tmp_path, 'glance', 'service')
    now = int(time.time())
    first = advertiser_mod.Advertiser(records, 'e2e-n1', URL_1, ttl=TTL,
                                      refresh_interval=100, clock=Clock(now))
    other = advertiser_mod.Advertiser(records, 'e2e-n2', URL_2, ttl=TTL,
                                      refresh_interval=100,
                                      clock=Clock(now + 30))
    try:
        first.advertise(vol)
        other.advertise(vol)
        first.stop(withdraw=False)          # a crash: the item stays
        again = advertiser_mod.Advertiser(records, 'e2e-n1', URL_1, ttl=TTL,
                                          refresh_interval=100,
                                          clock=Clock(now + 60))
        again.advertise(vol)
        assert records.get_metadata(vol)['thunder_peer_e2e-n1'] == (
            '%s %d %d' % (URL_1, now, now + 60 + TTL))
        assert other.peers(vol, include_self=True) == [URL_1, URL_2]
    finally:
        records.delete_metadata(vol, ['thunder_peer_e2e-n1',
                                      'thunder_peer_e2e-n2'])


def test_wrong_credentials_never_raise(stack, tmp_path, image_volume,
                                       caplog):
    records = _records(stack, tmp_path, 'glance', 'service',
                       password='not-the-password')
    with pytest.raises(cinder_records.RecordsError) as info:
        records.get_metadata(image_volume)
    assert 'Unauthorized' in str(info.value)
    node = advertiser_mod.Advertiser(records, 'e2e-n1', URL_1)
    node.advertise(image_volume)
    assert node.peers(image_volume) == []
    assert node.withdraw(image_volume) is False
    assert 'Could not advertise' in caplog.text


def test_cinder_unreachable_is_bounded(tmp_path):
    conf = cfg.ConfigOpts()
    advertise_opts.register_opts(conf)
    path = tmp_path / 'unreachable.conf'
    path.write_text('\n'.join([
        '[advertise]', 'auth_type = password',
        'auth_url = http://127.0.0.1:9/v3', 'username = x',
        'password = y', 'project_name = p', 'timeout = 2', '']))
    conf([], project='thunder-cache', default_config_files=[str(path)])
    records = cinder_records.CinderRecords.from_conf(conf)
    node = advertiser_mod.Advertiser(records, 'e2e-n1', URL_1)
    started = time.monotonic()
    node.advertise('0b6f3c1e-2f0d-4d43-9a4e-3b1f0e9d7a21')
    node.stop()
    assert time.monotonic() - started < 30
