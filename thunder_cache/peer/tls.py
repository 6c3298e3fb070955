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

"""TLS for the peer protocol (``[peer] tls_enabled``).

Every node has a certificate and key signed by the deployment's CA
(``[peer] tls_ca_file``) and uses them both ways: its server presents the
certificate and requires one from every client (mutual TLS: a client
without a certificate of the CA never gets past the handshake, before any
request is read), and its client presents it to the peers it asks and
checks theirs against the CA and the host of the peer's URL (a DNS name or
an IP address in the certificate's subjectAltName). TLS 1.3 only: both
ends are thunder-cache nodes, and 1.3 has neither renegotiation nor weak
cipher suites to configure away.
"""

import ssl
import typing


class TLSConfigError(ValueError):
    """The TLS options name files that cannot be used."""


def _context(purpose_protocol: int, certificate: str, key: str,
             ca_file: str) -> ssl.SSLContext:
    for option, path in (('tls_certificate', certificate), ('tls_key', key),
                         ('tls_ca_file', ca_file)):
        if not path:
            raise TLSConfigError('[peer] tls_enabled needs [peer] %s'
                                 % option)
    context = ssl.SSLContext(purpose_protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as e:
        raise TLSConfigError('cannot use [peer] tls_certificate %s with '
                             'tls_key %s: %s' % (certificate, key, e))
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise TLSConfigError('cannot use [peer] tls_ca_file %s: %s'
                             % (ca_file, e))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(certificate: str, key: str,
                   ca_file: str) -> ssl.SSLContext:
    """The context of the peer server: requires a client certificate."""
    return _context(ssl.PROTOCOL_TLS_SERVER, certificate, key, ca_file)


def client_context(certificate: str, key: str,
                   ca_file: str) -> ssl.SSLContext:
    """The context of the peer client: checks the peer's host name."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT, certificate, key, ca_file)
    context.check_hostname = True
    return context


def contexts(peer_conf: typing.Any
             ) -> typing.Tuple[typing.Optional[ssl.SSLContext],
                               typing.Optional[ssl.SSLContext]]:
    """(server context, client context) from ``[peer]``; (None, None) off.

    :raises TLSConfigError: if a file is missing, unreadable or does not
        match (a key that is not the certificate's).
    """
    if not peer_conf.tls_enabled:
        return None, None
    files = (peer_conf.tls_certificate, peer_conf.tls_key,
             peer_conf.tls_ca_file)
    return server_context(*files), client_context(*files)
