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

"""The peer address policy: which addresses peer requests may go to."""

import ipaddress
import socket

from oslo_config import cfg
import pytest

from thunder_cache import daemon
from thunder_cache import options
from thunder_cache.peer import peerpolicy

# Addresses refused even when every network is allowed.
SPECIAL = [
    '127.0.0.1', '127.1.2.3', '0.0.0.0', '0.1.2.3', '169.254.169.254',
    '169.254.1.1', '100.100.100.200', '224.0.0.1', '239.255.255.250',
    '255.255.255.255', '240.0.0.1', '::', '::1', 'fe80::1', 'ff02::1',
    'fd00:ec2::254',
    # IPv4-mapped IPv6: the kernel connects to the IPv4 address.
    '::ffff:127.0.0.1', '::ffff:169.254.169.254', '::ffff:0.0.0.0',
    # IPv4-compatible (deprecated), NAT64 and 6to4 of special addresses.
    '::127.0.0.1', '::a9fe:a9fe', '64:ff9b::a9fe:a9fe', '64:ff9b::7f00:1',
    '2002:7f00:1::1', '2002:a9fe:a9fe::1',
]
EVERYWHERE = ['0.0.0.0/0', '::/0']


class Resolver:
    """getaddrinfo over a table; counts its calls."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, host, port, family=0, type=0):
        self.calls.append(host)
        answer = self.table.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, 'Name unknown')
        return [(socket.AF_INET6 if ':' in a else socket.AF_INET,
                 socket.SOCK_STREAM, 6, '', (a, 0)) for a in answer]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize('address', SPECIAL)
def test_special_addresses_refused_even_when_everything_is_allowed(
        address):
    policy = peerpolicy.AddressPolicy(EVERYWHERE)
    with pytest.raises(peerpolicy.PeerRefused):
        policy.check_address(address)
    with pytest.raises(peerpolicy.PeerRefused):
        policy.address(address)


@pytest.mark.parametrize('address', ['10.1.2.3', '192.0.2.7', 'fd00::7',
                                     '::ffff:10.1.2.3', '2002:a01:203::1'])
def test_ordinary_addresses_allowed_by_a_wide_network(address):
    policy = peerpolicy.AddressPolicy(EVERYWHERE)
    policy.check_address(address)


def test_no_network_allows_nothing():
    policy = peerpolicy.AddressPolicy([])
    for address in ('10.0.0.5', '192.0.2.1', 'fd00::1'):
        with pytest.raises(peerpolicy.PeerRefused, match='not in the '
                           'allowed'):
            policy.check_address(address)


def test_only_the_listed_networks():
    policy = peerpolicy.AddressPolicy(['10.0.0.0/24', 'fd00:1::/64'])
    assert str(policy.check_address('10.0.0.5')) == '10.0.0.5'
    assert str(policy.check_address('fd00:1::9')) == 'fd00:1::9'
    for address in ('10.0.1.5', '10.1.0.5', '192.168.0.5', 'fd00:2::9'):
        with pytest.raises(peerpolicy.PeerRefused):
            policy.check_address(address)


def test_network_and_broadcast_addresses_refused():
    policy = peerpolicy.AddressPolicy(['10.0.0.0/24'])
    for address in ('10.0.0.0', '10.0.0.255'):
        with pytest.raises(peerpolicy.PeerRefused, match='broadcast'):
            policy.check_address(address)
    # A /31 or /32 has no such addresses.
    policy = peerpolicy.AddressPolicy(['10.0.0.0/31', '10.0.0.9/32'])
    for address in ('10.0.0.0', '10.0.0.1', '10.0.0.9'):
        policy.check_address(address)


def test_mapped_ipv6_checked_as_its_ipv4_address():
    policy = peerpolicy.AddressPolicy(['10.0.0.0/24'])
    assert policy.check_address('::ffff:10.0.0.5') == \
        ipaddress.IPv4Address('10.0.0.5')
    assert policy.address('::ffff:10.0.0.5') == '10.0.0.5'
    with pytest.raises(peerpolicy.PeerRefused):
        policy.check_address('::ffff:10.0.1.5')


def test_special_ranges_allowed_only_when_listed_inside_them():
    loopback = peerpolicy.AddressPolicy(['127.0.0.0/8'])
    loopback.check_address('127.0.0.1')
    loopback.check_address('::ffff:127.0.0.2')
    with pytest.raises(peerpolicy.PeerRefused):
        loopback.check_address('169.254.169.254')
    # The metadata address is a range of its own: link-local allows the
    # rest of 169.254/16, not it.
    link_local = peerpolicy.AddressPolicy(['169.254.0.0/16'])
    link_local.check_address('169.254.3.4')
    with pytest.raises(peerpolicy.PeerRefused, match='metadata'):
        link_local.check_address('169.254.169.254')
    peerpolicy.AddressPolicy(['169.254.169.254/32']).check_address(
        '169.254.169.254')
    # A wide network does not list a special range explicitly.
    wide = peerpolicy.AddressPolicy(['0.0.0.0/1'])
    with pytest.raises(peerpolicy.PeerRefused, match='loopback'):
        wide.check_address('127.0.0.1')


def test_host_names_resolved_and_every_address_checked():
    resolver = Resolver({
        'peer-a': ['10.0.0.5'],
        'peer-b': ['10.0.0.6', 'fd00:1::6'],
        'mixed': ['10.0.0.7', '127.0.0.1'],
        'metadata.internal': ['169.254.169.254'],
        'outside': ['10.9.9.9'],
        'mapped': ['::ffff:127.0.0.1'],
    })
    policy = peerpolicy.AddressPolicy(['10.0.0.0/24', 'fd00:1::/64'],
                                      resolver=resolver)
    assert policy.address('peer-a') == '10.0.0.5'
    assert policy.address('peer-b') == '10.0.0.6'
    for host, reason in (('mixed', 'loopback'),
                         ('metadata.internal', 'metadata'),
                         ('outside', 'not in the allowed'),
                         ('mapped', 'loopback'),
                         ('unknown', 'does not resolve')):
        with pytest.raises(peerpolicy.PeerRefused, match=reason):
            policy.address(host)


@pytest.mark.parametrize('host', ['0x7f.1', '2130706433', '127.1',
                                  'peer.0x7f000001', '0177.0.0.1',
                                  '256.1.1.1', '10.0.0.010'])
def test_numeric_host_names_refused_without_resolving(host):
    resolver = Resolver({})
    policy = peerpolicy.AddressPolicy(EVERYWHERE, resolver=resolver)
    with pytest.raises(peerpolicy.PeerRefused):
        policy.address(host)
    assert resolver.calls == []


def test_a_name_is_resolved_once_and_pinned():
    """No DNS rebinding: the checked address is used until re-checked."""
    resolver = Resolver({'peer': ['10.0.0.5']})
    clock = Clock()
    policy = peerpolicy.AddressPolicy(['10.0.0.0/24'], resolve_interval=60,
                                      resolver=resolver, clock=clock)
    assert policy.address('peer') == '10.0.0.5'
    resolver.table['peer'] = ['127.0.0.1']
    clock.now += 59
    assert policy.address('peer') == '10.0.0.5'
    assert resolver.calls == ['peer']
    clock.now += 2
    with pytest.raises(peerpolicy.PeerRefused, match='loopback'):
        policy.address('peer')
    # Refusals are kept too: a bogus name costs one lookup a minute.
    with pytest.raises(peerpolicy.PeerRefused):
        policy.address('peer')
    assert resolver.calls == ['peer', 'peer']


def test_names_kept_are_bounded():
    resolver = Resolver({})
    policy = peerpolicy.AddressPolicy(EVERYWHERE, resolver=resolver)
    for i in range(peerpolicy.MAX_NAMES + 50):
        with pytest.raises(peerpolicy.PeerRefused):
            policy.address('bogus-%d' % i)
    assert len(policy._names) <= peerpolicy.MAX_NAMES


def test_permits_logs_a_refusal_once(caplog):
    policy = peerpolicy.AddressPolicy(['10.0.0.0/24'])
    for _ in range(3):
        assert not policy.permits('169.254.169.254', 'http://x:1')
    assert policy.permits('10.0.0.5', 'http://10.0.0.5:1')
    refusals = [r for r in caplog.records if 'Refusing peer' in r.message]
    assert len(refusals) == 1
    assert 'allowed_networks' in refusals[0].message


@pytest.mark.parametrize('value', ['10.0.0.1/24', 'bogus', '10.0.0.0/33',
                                   '', 'fd00::1/64'])
def test_parse_networks_refuses_what_is_not_a_network(value):
    with pytest.raises(ValueError, match='CIDR'):
        peerpolicy.parse_networks([value])


def test_parse_networks():
    assert peerpolicy.parse_networks([' 10.0.0.0/8', 'fd00::/8']) == [
        ipaddress.ip_network('10.0.0.0/8'), ipaddress.ip_network('fd00::/8')]


# -- the node's own network ------------------------------------------------

INTERFACES = [('lo', ipaddress.ip_interface('127.0.0.1/8')),
              ('eth0', ipaddress.ip_interface('10.0.0.17/24')),
              ('eth0', ipaddress.ip_interface('fd00:1::17/64')),
              ('eth1', ipaddress.ip_interface('192.168.5.3/16'))]


def test_own_network_is_the_interface_s():
    assert peerpolicy.own_networks('10.0.0.17', interfaces=INTERFACES) == (
        [ipaddress.ip_network('10.0.0.0/24')], None)
    assert peerpolicy.own_networks('fd00:1::17', interfaces=INTERFACES) == (
        [ipaddress.ip_network('fd00:1::/64')], None)
    resolver = Resolver({'compute-1': ['10.0.0.17', 'fd00:1::17']})
    networks, _ = peerpolicy.own_networks('compute-1', resolver=resolver,
                                          interfaces=INTERFACES)
    assert sorted(map(str, networks)) == ['10.0.0.0/24', 'fd00:1::/64']


@pytest.mark.parametrize('host, reason', [
    ('127.0.0.1', 'loopback'), ('0.0.0.0', 'unspecified'),
    ('10.9.9.9', 'no interface'), ('nowhere', 'does not resolve'),
    ('loopy', 'loopback')])
def test_no_own_network(host, reason):
    resolver = Resolver({'loopy': ['127.0.1.1']})
    networks, why = peerpolicy.own_networks(host, resolver=resolver,
                                            interfaces=INTERFACES)
    assert networks == []
    assert reason in why


def test_interface_networks_of_this_host():
    found = peerpolicy.interface_networks()
    assert ipaddress.ip_interface('127.0.0.1/8') in [i for _n, i in found]


# -- the daemon's policy ------------------------------------------------------

def _daemon(tmp_path, **peer):
    secret = tmp_path / 'secret'
    secret.write_text('s' * 32)
    conf = cfg.ConfigOpts()
    options.register(conf)
    conf([], project='thunder-cache-test', default_config_files=[])
    conf.set_override('shared_secret_file', str(secret), group='peer')
    for name, value in peer.items():
        conf.set_override(name, value, group='peer')
    return daemon.Daemon(conf)


def test_daemon_policy_from_allowed_networks(tmp_path):
    d = _daemon(tmp_path, allowed_networks=['10.0.0.0/24', 'fd00::/64'])
    policy = d._peer_policy('http://10.0.0.17:7485')
    assert [str(n) for n in policy.networks] == ['10.0.0.0/24', 'fd00::/64']


def test_daemon_policy_defaults_to_its_own_network(tmp_path, monkeypatch,
                                                   caplog):
    monkeypatch.setattr(peerpolicy, 'interface_networks', lambda: INTERFACES)
    d = _daemon(tmp_path)
    policy = d._peer_policy('http://10.0.0.17:7485')
    assert [str(n) for n in policy.networks] == ['10.0.0.0/24']
    # On loopback: no peer at all, and the log says what to set.
    policy = d._peer_policy('http://127.0.0.1:7485')
    assert policy.networks == ()
    with pytest.raises(peerpolicy.PeerRefused):
        policy.address('127.0.0.1')
    assert 'allowed_networks' in caplog.text
    assert 'loopback' in caplog.text


def test_daemon_policy_refuses_what_is_not_a_network(tmp_path):
    d = _daemon(tmp_path, allowed_networks=['10.0.0.0/24', '10.1.0.1/16'])
    with pytest.raises(daemon.StartError,
                       match="allowed_networks: '10.1.0.1/16' is not a "
                             "network"):
        d._peer_policy('http://10.0.0.17:7485')
