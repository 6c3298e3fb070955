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

"""Emulated networks on one machine: network namespaces behind shaped links.

Used by the bulk boot benchmarks (``benchmarks/bulk_boot.py``,
``benchmarks/boot_guests.py``) and by the local stack's emulated compute
nodes (:mod:`thunder_stack.nodes`).
"""

import json
import subprocess

KiB = 1024
SUBNET = '10.213'


def run(cmd, check=True):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True,
                          text=True)
    if check and proc.returncode:
        raise RuntimeError('%s failed (%d): %s' % (
            ' '.join(str(c) for c in cmd), proc.returncode,
            (proc.stderr or proc.stdout).strip()[-2000:]))
    return proc


def sh(*cmd):
    return run(cmd).stdout


class Testbed:
    """The switch, the origin's namespace and the nodes' namespaces.

    Addresses are in ``subnet``.0.0/16, inside namespaces this object
    creates; nothing is added to the initial namespace. Host 0 is the
    origin (namespace ``<prefix>o``), host k the node k-1 (``<prefix>nK-1``).
    """

    def __init__(self, prefix, nodes, subnet=SUBNET):
        self.prefix = prefix
        self.subnet = subnet
        self.switch = prefix + 'sw'
        self.names = []
        self.hosts = []     # (namespace, address, switch port)
        for k in range(nodes + 1):
            ns = prefix + ('o' if k == 0 else 'n%d' % (k - 1))
            address = '%s.%d.%d' % (subnet, k // 250, k % 250 + 1)
            self.hosts.append((ns, address, 'p%d' % k))
        self.rate = None

    @property
    def namespaces(self):
        return [self.switch] + [h[0] for h in self.hosts]

    @property
    def network(self):
        return '%s.0.0/16' % self.subnet

    def create(self):
        self._add(self.switch)
        sh('ip', '-n', self.switch, 'link', 'add', 'br0', 'type', 'bridge')
        sh('ip', '-n', self.switch, 'link', 'set', 'br0', 'up')
        for ns, address, port in self.hosts:
            self._add(ns)
            sh('ip', '-n', self.switch, 'link', 'add', port, 'type', 'veth',
               'peer', 'name', 'e0', 'netns', ns)
            sh('ip', '-n', self.switch, 'link', 'set', port, 'master', 'br0',
               'up')
            sh('ip', '-n', ns, 'addr', 'add', address + '/16', 'dev', 'e0')
            sh('ip', '-n', ns, 'link', 'set', 'e0', 'up')
            sh('ip', '-n', ns, 'link', 'set', 'lo', 'up')

    def _add(self, ns):
        self.names.append(ns)
        sh('ip', 'netns', 'add', ns)

    def _qdiscs(self):
        for ns, _address, port in self.hosts:
            yield ns, 'e0'                  # the host's upload
            yield self.switch, port         # its download

    def shape(self, rate_bps):
        """tbf at ``rate_bps`` bits/s both ways on every link; None: off."""
        self.rate = rate_bps
        for ns, dev in self._qdiscs():
            if rate_bps is None:
                run(['tc', '-n', ns, 'qdisc', 'del', 'dev', dev, 'root'],
                    check=False)
                continue
            burst = max(64 * KiB, int(rate_bps / 8 / 100))
            sh('tc', '-n', ns, 'qdisc', 'replace', 'dev', dev, 'root', 'tbf',
               'rate', '%dbit' % rate_bps, 'burst', burst, 'latency', '100ms')

    def sent_bytes(self, k):
        """Bytes host ``k`` (0: the origin) sent through its qdisc."""
        ns, _address, _port = self.hosts[k]
        out = json.loads(sh('tc', '-n', ns, '-s', '-j', 'qdisc', 'show',
                            'dev', 'e0'))
        return sum(q.get('bytes', 0) for q in out)

    def close(self):
        """Delete the namespaces (those of ``prefix`` left by others too)."""
        for ns in reversed(self.names or leftover_namespaces(self.prefix)):
            run(['ip', 'netns', 'del', ns], check=False)
        self.names = []


def leftover_namespaces(prefix):
    out = run(['ip', 'netns', 'list'], check=False).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.startswith(prefix)]
