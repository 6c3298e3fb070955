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

"""A CA and node certificates for the peer protocol's TLS, with openssl.

The same ``openssl`` commands as the peer-mode documentation gives to
operators (:doc:`peer-mode-deploy`), for tests and benchmarks: a CA, then
one certificate per node naming its host (a DNS name or an IP address) in
its subjectAltName, usable as server and as client. EC P-256 keys.
"""

import ipaddress
import os
import subprocess


class Pki:
    """A CA in ``directory``; :meth:`node` signs node certificates."""

    def __init__(self, directory, name='thunder-cache peer CA'):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.ca_file = os.path.join(directory, 'ca.pem')
        self.ca_key = os.path.join(directory, 'ca.key')
        _openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt',
                 'ec_paramgen_curve:P-256', '-nodes', '-keyout', self.ca_key,
                 '-out', self.ca_file, '-days', '30', '-subj', '/CN=' + name,
                 '-addext', 'basicConstraints=critical,CA:TRUE',
                 '-addext', 'keyUsage=critical,keyCertSign,cRLSign')

    def node(self, name, hosts):
        """(certificate, key) paths of a node reachable at ``hosts``."""
        base = os.path.join(self.directory, name)
        names = []
        for host in hosts:
            try:
                ipaddress.ip_address(host)
                names.append('IP:' + host)
            except ValueError:
                names.append('DNS:' + host)
        extensions = base + '.ext'
        with open(extensions, 'w') as f:
            f.write('subjectAltName = %s\n'
                    'basicConstraints = critical,CA:FALSE\n'
                    'keyUsage = critical,digitalSignature\n'
                    'extendedKeyUsage = serverAuth,clientAuth\n'
                    % ','.join(names))
        _openssl('req', '-newkey', 'ec', '-pkeyopt',
                 'ec_paramgen_curve:P-256', '-nodes', '-keyout',
                 base + '.key', '-out', base + '.csr', '-subj', '/CN=' + name)
        _openssl('x509', '-req', '-in', base + '.csr', '-CA', self.ca_file,
                 '-CAkey', self.ca_key, '-CAcreateserial', '-CAserial',
                 os.path.join(self.directory, 'ca.srl'), '-days', '30',
                 '-extfile', extensions, '-out', base + '.pem')
        return base + '.pem', base + '.key'


def _openssl(*args):
    subprocess.run(('openssl',) + args, check=True, capture_output=True,
                   timeout=60)
