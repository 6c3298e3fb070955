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

"""Which addresses a node may send peer requests to.

Peer URLs come from image descriptors, from the image-volume's Cinder
metadata (which whoever may update the volume can write) and from other
nodes' 307 redirects; none of them may steer a node's signed requests to an
arbitrary place. :class:`AddressPolicy` allows an address only when

* it lies in one of the allowed networks (``[peer] allowed_networks``; by
  default the network of the node's own peer address, see
  :func:`own_networks`), and
* it is not of a special kind (:data:`SPECIAL`: unspecified, loopback,
  link-local, a cloud metadata address, multicast, broadcast, reserved,
  IPv4-compatible IPv6), unless an allowed network lies wholly inside that
  kind's range: the operator listed it on purpose (``127.0.0.0/8`` for
  tests on one machine). ``0.0.0.0/0`` allows no special address;
* it is not the network or broadcast address of the allowed IPv4 network
  it falls in.

IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are checked as the IPv4
address the kernel would connect to; NAT64 (``64:ff9b::/96``) and 6to4
(``2002::/16``) addresses are refused when the IPv4 address they embed is
special.

Host names are resolved once (the answer is kept for
:data:`RESOLVE_INTERVAL` seconds, refusals too), every address they resolve
to must be allowed, and the connection goes to the checked address, never
to a second resolution of the name: a name cannot resolve to an allowed
address when checked and to another one when connected (DNS rebinding).
Host names whose last label is numeric (``0x7f.1``, ``2130706433``), which
the resolver would read as IPv4 numbers, are refused.
"""

import ipaddress
import logging
import re
import socket
import threading
import time
import typing

import psutil

LOG = logging.getLogger(__name__)

#: Seconds the answer for a host name (its checked address, or why it was
#: refused) is kept before the name is resolved again.
RESOLVE_INTERVAL = 60.0
# Host names whose answers are kept at most; a flood of distinct names in
# metadata cannot grow the cache further (the oldest answers go first).
MAX_NAMES = 1024

_net = ipaddress.ip_network

#: (kind, range), most specific first: addresses never allowed unless an
#: allowed network lies inside the range.
SPECIAL = (
    ('a cloud metadata address', _net('169.254.169.254/32')),
    ('a cloud metadata address', _net('100.100.100.200/32')),
    ('a cloud metadata address', _net('fd00:ec2::254/128')),
    ('unspecified', _net('0.0.0.0/32')),
    ('"this network"', _net('0.0.0.0/8')),
    ('loopback', _net('127.0.0.0/8')),
    ('link-local', _net('169.254.0.0/16')),
    ('multicast', _net('224.0.0.0/4')),
    ('broadcast', _net('255.255.255.255/32')),
    ('reserved', _net('240.0.0.0/4')),
    ('unspecified', _net('::/128')),
    ('loopback', _net('::1/128')),
    ('IPv4-compatible IPv6', _net('::/96')),
    ('link-local', _net('fe80::/10')),
    ('multicast', _net('ff00::/8')),
)
_NAT64 = _net('64:ff9b::/96')
_NUMERIC_LABEL = re.compile(r'^(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z')
_DOTTED_QUAD = re.compile(r'^[0-9]{1,3}(?:\.[0-9]{1,3}){3}\Z')


class PeerRefused(OSError):
    """A peer address outside the policy; nothing was sent to it."""


#: An IPv4 or IPv6 network (``ipaddress.ip_network``).
Network = typing.Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(values: typing.Iterable[typing.Any]
                   ) -> typing.List[Network]:
    """ip_network objects of CIDR strings (host bits are not allowed).

    :raises ValueError: naming the first value that is not a network.
    """
    networks: typing.List[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip()))
        except ValueError as e:
            raise ValueError('%r is not a network in CIDR notation, such as '
                             '10.0.0.0/24 or fd00::/64: %s' % (value, e))
    return networks


def special_kind(address: typing.Any
                 ) -> typing.Optional[typing.Tuple[str, typing.Any]]:
    """(kind, range) of a special address, or None."""
    for kind, network in SPECIAL:
        if address.version == network.version and address in network:
            return kind, network
    return None


def _embedded_ipv4(address: typing.Any) -> typing.Any:
    """The IPv4 address a NAT64 or 6to4 IPv6 address leads to, or None."""
    if address.version != 6:
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xffffffff)
    return address.sixtofour


class AddressPolicy:
    """The addresses peer requests may go to.

    :param networks: the allowed networks (CIDR strings or ip_network
        objects); none allows nothing.
    :param resolver: ``socket.getaddrinfo``'s signature (tests).
    """

    def __init__(self, networks: typing.Iterable[typing.Any],
                 resolve_interval: float = RESOLVE_INTERVAL,
                 resolver: typing.Callable[..., typing.Any] = (
                     socket.getaddrinfo),
                 clock: typing.Callable[[], float] = time.monotonic) -> None:
        self.networks = tuple(
            n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            else parse_networks([n])[0] for n in networks)
        self.resolve_interval = resolve_interval
        self._resolver = resolver
        self._clock = clock
        self._lock = threading.Lock()
        self._names: typing.Dict[str, typing.Tuple[float, typing.Any]] = {}
        self._warned: typing.Set[str] = set()

    def __repr__(self) -> str:
        return '<AddressPolicy %s>' % self.describe()

    def describe(self) -> str:
        """The allowed networks, for messages."""
        return ', '.join(str(n) for n in self.networks) or 'nowhere'

    # -- addresses ---------------------------------------------------------

    def check_address(self, address: typing.Any) -> typing.Any:
        """Raise :class:`PeerRefused` unless ``address`` is allowed.

        :param address: an ip_address or its text.
        :returns: the address to connect to (IPv4 for a mapped address).
        """
        if not isinstance(address, (ipaddress.IPv4Address,
                                    ipaddress.IPv6Address)):
            address = ipaddress.ip_address(address)
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        embedded = _embedded_ipv4(address)
        embedded_kind = (special_kind(embedded) if embedded is not None
                         else None)
        if embedded_kind is not None:
            raise PeerRefused('%s embeds %s, %s' % (
                address, embedded, embedded_kind[0]))
        inside = [n for n in self.networks
                  if n.version == address.version and address in n]
        special = special_kind(address)
        if special is not None:
            kind, network = special
            if not any(n.subnet_of(network) for n in inside):
                raise PeerRefused('%s is %s' % (address, kind))
        if not inside:
            raise PeerRefused('%s is not in the allowed peer networks (%s)'
                              % (address, self.describe()))
        closest = max(inside, key=lambda n: n.prefixlen)
        if closest.version == 4 and closest.prefixlen <= 30 and address in (
                closest.network_address, closest.broadcast_address):
            raise PeerRefused('%s is the network or broadcast address of %s'
                              % (address, closest))
        return address

    # -- host names --------------------------------------------------------

    def address(self, host: str) -> str:
        """The checked address to connect to for ``host``.

        :param host: an IP address (without brackets) or a host name.
        :raises PeerRefused: if it is not allowed, or does not resolve.
        """
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            return str(self.check_address(literal))
        if _DOTTED_QUAD.match(host):
            raise PeerRefused('%s is not a valid IPv4 address' % host)
        if _NUMERIC_LABEL.match(host.rstrip('.').rpartition('.')[2]):
            raise PeerRefused('%s is not a host name (numeric last label)'
                              % host)
        now = self._clock()
        with self._lock:
            known = self._names.get(host)
        if known is None or known[0] <= now:
            known = (now + self.resolve_interval, self._resolve(host))
            with self._lock:
                if len(self._names) >= MAX_NAMES:
                    self._names.pop(next(iter(self._names)))
                self._names[host] = known
        if isinstance(known[1], PeerRefused):
            raise known[1]
        return known[1]

    def _resolve(self, host: str) -> typing.Union[str, PeerRefused]:
        """The checked address of a host name, or the PeerRefused."""
        try:
            infos = self._resolver(host, None, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            return PeerRefused('%s does not resolve: %s' % (host, e))
        addresses: typing.List[typing.Any] = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                address = ipaddress.ip_address(sockaddr[0].split('%')[0])
            except ValueError:
                return PeerRefused('%s resolves to %r' % (host, sockaddr[0]))
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            return PeerRefused('%s has no IP address' % host)
        checked = []
        for address in addresses:
            try:
                checked.append(self.check_address(address))
            except PeerRefused as e:
                # One bad address taints the name: it could be the one a
                # later resolution returns first.
                return PeerRefused('%s: %s' % (host, e))
        return str(checked[0])

    def permits(self, host: str, what: str) -> bool:
        """True if ``host`` is allowed; a refusal is logged once per host.

        :param what: what names the host, for the log (a URL).
        """
        try:
            self.address(host)
            return True
        except PeerRefused as e:
            with self._lock:
                first = what not in self._warned
                if first:
                    if len(self._warned) >= MAX_NAMES:
                        self._warned.clear()
                    self._warned.add(what)
            if first:
                LOG.warning('Refusing peer %s: %s. Peers must be in [peer] '
                            'allowed_networks.', what, e)
            return False


# -- the node's own network ------------------------------------------------

def _prefix(netmask: str) -> int:
    return bin(int(ipaddress.ip_address(netmask))).count('1')


def interface_networks() -> typing.List[typing.Tuple[str, typing.Any]]:
    """[(interface, ip_interface)] of this host's IP addresses."""
    result = []
    for name, addresses in psutil.net_if_addrs().items():
        for entry in addresses:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if not entry.netmask:
                continue
            try:
                address = ipaddress.ip_address(entry.address.split('%')[0])
                result.append((name, ipaddress.ip_interface(
                    '%s/%d' % (address, _prefix(entry.netmask)))))
            except ValueError:
                continue
    return result


def own_networks(host: str,
                 resolver: typing.Callable[..., typing.Any] = (
                     socket.getaddrinfo),
                 interfaces: typing.Optional[
                     typing.List[typing.Tuple[str, typing.Any]]] = None
                 ) -> typing.Tuple[typing.List[typing.Any],
                                   typing.Optional[str]]:
    """The networks of the interfaces carrying this node's peer address.

    :param host: the host of the node's own peer URL (address or name).
    :returns: (networks, reason): the networks, or [] and why there are
        none (a sentence for the log).
    """
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = sorted({ipaddress.ip_address(i[4][0].split('%')[0])
                                for i in resolver(host, None, 0,
                                                  socket.SOCK_STREAM)},
                               key=str)
        except (OSError, ValueError, UnicodeError) as e:
            return [], '%s does not resolve (%s)' % (host, e)
    addresses = [a.ipv4_mapped or a if a.version == 6 else a
                 for a in addresses]
    kinds = [(a, special_kind(a)) for a in addresses]
    special = [(a, kind[0]) for a, kind in kinds if kind is not None]
    if special:
        return [], '%s is %s' % special[0]
    if interfaces is None:
        interfaces = interface_networks()
    networks = []
    for address in addresses:
        for name, interface in interfaces:
            if interface.ip == address and interface.network not in networks:
                networks.append(interface.network)
    if not networks:
        return [], 'no interface of this host has the address %s' % ', '.join(
            str(a) for a in addresses)
    return networks, None
