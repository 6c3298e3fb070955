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

"""Emulated compute nodes of the local stack (peer mode through Nova).

``tools/thunder-stack nodes up --count N --link-mbit R`` adds N compute
nodes ``node-1`` .. ``node-N`` to the running stack; ``nodes down`` removes
them. Each node is a network namespace behind a veth link shaped by tc
(:class:`thunder_stack.netlab.Testbed`, the bulk boot's testbed) and a
mount namespace of its own, in which all of its processes run:

- ``virtlogd`` and ``libvirtd``: the node's directories are bind-mounted
  over ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and
  ``/etc/libvirt`` inside its mount namespace, so each node has its own
  libvirt beside the stack's;
- ``thunder-cache`` (its FUSE mount seen by the node's qemu only; its peer
  server on the node's address, advertised in the image-volumes' metadata);
- ``cinder-volume`` with the ``thunder-peer`` backend, ``host = node-K``,
  ``backend_availability_zone = node-K``;
- ``nova-compute`` with the libvirt driver, ``host = node-K``,
  ``[cinder] cross_az_attach = False``, its host in the aggregate (and
  availability zone) ``node-K``.

Control plane: the stack's services listen on the machine's 127.0.0.1.
In a node, 127.0.0.1 is the node's own loopback: a ``socat`` relay per
port listens there and forwards through a Unix socket (reachable from
every network namespace) to a relay of the host, which connects to the
service (MariaDB, RabbitMQ, Keystone, Cinder, Nova, Placement, Neutron).
Unshaped.

Data plane: peers talk over the shaped links (``10.214.0.0/16``). The
origins of image data, Ceph (the image-volumes) and Glance (Nova's image
downloads), are reached through the testbed's origin namespace
``<prefix>o``: the node's relay of Glance's port and of each Ceph port
(monitor, OSD, manager) connects to the origin namespace's relay over the
node's link, which forwards to the service on the host. So what a node
reads from an origin crosses its shaped link, and the origin's link counts
every node's reads.
"""

import json
import os
import re
import shutil
import time

from thunder_stack import cache
from thunder_stack import clients
from thunder_stack import devstack
from thunder_stack import ini
from thunder_stack import layout
from thunder_stack import netlab
from thunder_stack import nova as nova_mod
from thunder_stack import services as svc

PREFIX = 'thn-'
SUBNET = '10.214'
PEER_PORT = 7485
#: The stack's services a node reaches through its relays, unshaped.
CONTROL_PORTS = ('mysql', 'amqp', 'keystone', 'cinder', 'nova', 'placement',
                 'neutron')
#: ... and through the origin's namespace and the node's shaped link: the
#: origins of image data (Glance, and Ceph's ports, found at nodes up).
DATA_PORTS = ('glance',)
#: libvirt's system directories, each the node's own (under libvirt/):
#: the system's directory tree is copied (with files for etc).
LIBVIRT_DIRS = {'/run/libvirt': 'run', '/var/lib/libvirt': 'lib',
                '/var/log/libvirt': 'log', '/etc/libvirt': 'etc'}
NODE_SERVICES = ('virtlogd', 'libvirtd', 'thunder-cache', 'cinder-volume',
                 'nova-compute')
START_TIMEOUT = 120


def node_name(k):
    return 'node-%d' % k


def ceph_ports(mon_dump, osd_dump, mgr_dump):
    """TCP ports of Ceph's daemons on 127.0.0.1, from their JSON dumps."""
    vectors = [m['public_addrs'] for m in mon_dump.get('mons', [])]
    vectors += [o['public_addrs'] for o in osd_dump.get('osds', [])
                if o.get('up')]
    if mgr_dump.get('active_addrs'):
        vectors.append(mgr_dump['active_addrs'])
    ports = set()
    for vector in vectors:
        for addr in vector.get('addrvec', []):
            host, _sep, port = addr['addr'].rpartition(':')
            if host == '127.0.0.1' and int(port):
                ports.add(int(port))
    return sorted(ports)


def unix_relay(sock, port):
    """socat: a Unix socket to 127.0.0.1:port (runs on the host)."""
    return ['socat', 'UNIX-LISTEN:%s,fork,unlink-early,mode=600' % sock,
            'TCP:127.0.0.1:%d' % port]


def tcp_relay(listen, port, target):
    """socat: ``listen``:port to ``target`` (a Unix socket or host:port)."""
    dest = ('UNIX-CONNECT:%s' % target if target.startswith('/')
            else 'TCP:%s:%d' % (target, port))
    return ['socat', 'TCP-LISTEN:%d,bind=%s,fork,reuseaddr' % (port, listen),
            dest]


def node_nova_conf(base, name, address, state):
    """nova-compute.conf of a node from the stack's ``base`` sections."""
    conf = nova_mod.compute_conf(base)
    locks = os.path.join(state, 'locks')
    conf['DEFAULT'].update(host=name, my_ip=address, state_path=state)
    # Servers from images: Nova's own image cache (_base) on the node's
    # disk, what operators without shared storage have.
    conf['libvirt']['images_type'] = 'qcow2'
    conf['oslo_concurrency'] = {'lock_path': locks}
    conf['os_brick'] = {'lock_path': locks}
    return conf


def node_cinder_conf(parser, name, address, state):
    """The stack's cinder.conf ``parser`` made a node's (peer backend)."""
    for section in parser.sections():
        if section not in ('DEFAULT', 'database', 'keystone_authtoken',
                           'oslo_messaging_rabbit', 'nova',
                           'cinder_sys_admin', 'privsep_osbrick'):
            parser.remove_section(section)
    parser.set('DEFAULT', 'host', name)
    parser.set('DEFAULT', 'my_ip', address)
    parser.set('DEFAULT', 'state_path', state)
    parser.set('DEFAULT', 'enabled_backends', layout.PEER_BACKEND)
    parser.add_section('oslo_concurrency')
    parser.set('oslo_concurrency', 'lock_path', os.path.join(state, 'locks'))
    return parser


class Node:
    """One emulated compute node: its namespaces, files and processes."""

    def __init__(self, stack, k, host):
        self.stack = stack
        self.name = node_name(k)
        self.netns, self.address, _port = host
        self.dir = stack.path('nodes', self.name)
        self.mount_ns = stack.path('nodes', 'ns', self.name)
        self.uts_ns = stack.path('nodes', 'ns', self.name + '.uts')
        self.libvirt_socket = self.path('libvirt', 'run', 'libvirt-sock')
        self.cache_paths = {
            'state': self.path('data', 'thunder-cache'),
            'run': self.path('run', 'thunder-cache'),
            'mount': self.path('data', 'thunder-cache', 'volumes'),
            'control': self.path('run', 'thunder-cache', 'control.sock'),
            'native': self.path('run', 'thunder-cache', 'volume-server.sock')}

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def enter(self, argv):
        """``argv`` in the node's network and mount namespaces."""
        return ['nsenter', '--net=/run/netns/%s' % self.netns,
                '--mount=%s' % self.mount_ns, '--uts=%s' % self.uts_ns,
                '--'] + list(argv)

    def _service(self, name, argv, **kwargs):
        return svc.Service(name, self.enter(argv), self.dir,
                           marker=kwargs.pop('marker', self.dir), **kwargs)

    def services(self):
        bin_ = os.path.join(self.stack.venv, 'bin')
        libvirt = self.path('etc', 'libvirt-daemons')

        def console(name, conf):
            return self._service(name, [
                os.path.join(bin_, name), '--config-file', conf,
                '--log-file', self.path('log', '%s.log' % name)])

        return [
            self._service('virtlogd', [
                '/usr/sbin/virtlogd', '--config',
                os.path.join(libvirt, 'virtlogd.conf'),
                '--pid-file', self.path('run', 'virtlogd-own.pid')],
                health=lambda: nova_mod._socket_reason(self.path(
                    'libvirt', 'run', 'virtlogd-sock'))),
            self._service('libvirtd', [
                '/usr/sbin/libvirtd', '--config',
                os.path.join(libvirt, 'libvirtd.conf'),
                '--pid-file', self.path('run', 'libvirtd-own.pid')],
                health=lambda: nova_mod.libvirt_reason(self.libvirt_socket)),
            self._service('thunder-cache', [
                os.path.join(bin_, 'thunder-cache'), '--config-file',
                self.thunder_cache_conf, '--log-file',
                self.path('log', 'thunder-cache.log')],
                health=self._thunder_cache_reason),
            console('cinder-volume', self.path('etc', 'cinder.conf')),
            console('nova-compute', self.path('etc', 'nova-compute.conf')),
        ]

    def service(self, name):
        return {s.name: s for s in self.services()}[name]

    @property
    def thunder_cache_conf(self):
        return self.path('etc', 'thunder-cache.conf')

    def _thunder_cache_reason(self):
        pid = self.service('thunder-cache').pid()
        try:
            with open('/proc/%d/mounts' % pid) as f:
                mounted = any(line.split()[1] == self.cache_paths['mount']
                              for line in f)
        except (OSError, TypeError):
            return 'no process'
        if not mounted:
            return '%s is not mounted' % self.cache_paths['mount']
        return cache.ping(self.cache_paths['control'])

    # -- namespaces -------------------------------------------------------

    def create_namespaces(self):
        """Persistent mount and UTS namespaces of the node.

        The mount namespace has the node's libvirt directories and an
        /etc/hosts naming the node; the UTS namespace its host name. libvirt
        reports that name, which Nova gives the node's resource provider
        (unique in Placement: the machine's name is the stack's).
        """
        if mounted(self.mount_ns):
            return
        for path in (self.mount_ns, self.uts_ns):
            with open(path, 'w'):
                pass
        svc.run(['unshare', '--mount=%s' % self.mount_ns,
                 '--uts=%s' % self.uts_ns, '--propagation', 'private',
                 'hostname', self.name])
        hosts = self.path('etc', 'hosts')
        with open('/etc/hosts') as f, open(hosts, 'w') as out:
            out.write(f.read() + '%s %s\n' % (self.address, self.name))
        binds = [(hosts, '/etc/hosts')]
        for target, sub in sorted(LIBVIRT_DIRS.items()):
            source = self.path('libvirt', sub)
            _copy_dirs(target, source, files=sub == 'etc',
                       depth=0 if sub == 'run' else 2)
            binds.append((source, target))
        for source, target in binds:
            svc.run(['nsenter', '--mount=%s' % self.mount_ns, '--',
                     'mount', '--bind', source, target])

    def remove_namespaces(self):
        for path in (self.mount_ns, self.uts_ns):
            _unmount(path)
            if os.path.exists(path):
                os.unlink(path)

    # -- configuration ----------------------------------------------------

    def write_config(self):
        stack = self.stack
        for sub in ('etc', 'log', 'run', 'data/nova/locks',
                    'data/nova/instances', 'data/cinder/locks',
                    'etc/libvirt-daemons'):
            os.makedirs(self.path(sub), exist_ok=True)
        for daemon in ('virtlogd', 'libvirtd'):
            shutil.copy(nova_mod._libvirt_conf(stack, daemon),
                        self.path('etc', 'libvirt-daemons',
                                  '%s.conf' % daemon))
        nova_conf = self.path('etc', 'nova-compute.conf')
        ini.write(nova_conf, node_nova_conf(
            nova_mod.full_conf(stack), self.name, self.address,
            self.path('data', 'nova')))
        cinder_conf = self.path('etc', 'cinder.conf')
        ini.save(node_cinder_conf(
            ini.load(stack.path('etc', 'cinder', 'cinder.conf')), self.name,
            self.address, self.path('data', 'cinder')), cinder_conf)
        if os.path.exists(self.thunder_cache_conf):
            os.unlink(self.thunder_cache_conf)
        paths = self.cache_paths
        env = {'CINDER_CONF': cinder_conf, 'NOVA_CONF': nova_conf,
               'THUNDER_NODE_AVAILABILITY_ZONE': self.name,
               'THUNDER_CACHE_CONTROL_SOCKET': paths['control']}
        env.update(cache.env(
            stack, conf=self.thunder_cache_conf, paths=paths,
            node_id=self.name, listen=self.address, port=PEER_PORT,
            networks='%s.0.0/16' % SUBNET))
        devstack.run(stack, 'configure_thunder_peer_backend %s'
                     % layout.PEER_BACKEND, 'configure_thunder_nova',
                     'configure_thunder_cache', env=env)

    # -- stop -------------------------------------------------------------

    def stop(self):
        """Stop every process of the node; domains and loops removed."""
        for service in reversed(self.services()):
            if service.name == 'libvirtd' and service.pid() is not None:
                nova_mod.remove_domains(self.stack, self.libvirt_socket)
            if service.name == 'thunder-cache':
                cache.detach_loops(self.cache_paths['mount'])
            if service.pid() is not None:
                svc.log('%s: stopping %s (pid %d)' % (
                    self.name, service.name, service.pid()))
            service.stop()
            if service.name == 'thunder-cache':
                cache.stop_volume_server(self.cache_paths)


def image_counters(node, image_id):
    """The counters of ``node``'s thunder-cache for ``image_id``.

    ``{name: value}`` (``bytes_from_origin``, ``bytes_from_peers``, ...),
    read from its ``/metrics`` over its local socket (the stack's
    virtualenv's Python: thunder_cache needs oslo).
    """
    from thunder_cache.control import client as control_client

    client = control_client.LocalClient(
        os.path.join(node.cache_paths['run'], 'local.sock'), timeout=10)
    try:
        text = client._get('/metrics').decode()
    finally:
        client.close()
    totals = {}
    for match in _SAMPLE.finditer(text):
        name, labels, value = match.groups()
        if 'image="%s"' % image_id in labels.split(','):
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


_SAMPLE = re.compile(r'^thunder_cache_(\w+?)(?:_total)?\{([^}]*)\} (\S+)$',
                     re.M)


def _copy_dirs(source, target, files=False, depth=2):
    """``source``'s directories (owners, modes) down to ``depth``.

    Files too with ``files`` (configuration), but not libvirt's domain
    definitions of the host.
    """
    for root, dirs, names in os.walk(source):
        relative = os.path.relpath(root, source)
        level = 0 if relative == '.' else relative.count(os.sep) + 1
        if level >= depth:
            dirs[:] = []
        dirs[:] = [d for d in dirs if not d.startswith('domain-')]
        dest = os.path.join(target, relative)
        os.makedirs(dest, exist_ok=True)
        shutil.copystat(root, dest)
        st = os.stat(root)
        os.chown(dest, st.st_uid, st.st_gid)
        if not files:
            continue
        for name in names:
            path = os.path.join(root, name)
            if (relative == 'qemu' and name.endswith('.xml')) or \
                    not os.path.isfile(path):
                continue
            shutil.copy2(path, os.path.join(dest, name))


class Nodes:
    """The emulated compute nodes of ``stack`` (its state keeps them)."""

    def __init__(self, stack, count=None, link_mbit=None):
        self.stack = stack
        saved = stack.state.get('nodes') or {}
        self.count = count if count is not None else saved.get('count', 0)
        self.link_mbit = (link_mbit if link_mbit is not None
                          else saved.get('link_mbit'))
        self.testbed = netlab.Testbed(PREFIX, self.count, subnet=SUBNET)
        self.nodes = [Node(stack, k, self.testbed.hosts[k])
                      for k in range(1, self.count + 1)]
        self.root = stack.path('nodes')
        self.relay_dir = stack.path('nodes', 'relay')

    @property
    def gateway(self):
        return self.testbed.hosts[0]

    def _relay(self, name, argv, netns=None):
        if netns:
            argv = ['nsenter', '--net=/run/netns/%s' % netns, '--'] + argv
        return svc.Service(name, argv, self.root, marker=self.relay_dir)

    def relays(self, ceph):
        """Host, gateway and per-node relay services: {where: [Service]}.

        ``ceph``: Ceph's ports. A control port is relayed node -> Unix
        socket -> host; a data port node -> gateway (over the node's link)
        -> Unix socket -> host.
        """
        ports = {name: self.stack.ports[name]
                 for name in CONTROL_PORTS + DATA_PORTS}
        data = {name: ports[name] for name in DATA_PORTS}
        data.update(('ceph-%d' % port, port) for port in ceph)
        out = {'host': [], 'gateway': []}
        sock = {}
        for name, port in sorted(dict(ports, **data).items()):
            sock[name] = os.path.join(self.relay_dir, '%s.sock' % name)
            out['host'].append(self._relay('relay-%s' % name,
                                           unix_relay(sock[name], port)))
        gw_ns, gw_address, _port = self.gateway
        for name, port in sorted(data.items()):
            out['gateway'].append(self._relay(
                'gateway-%s' % name, tcp_relay(gw_address, port, sock[name]),
                netns=gw_ns))
        for node in self.nodes:
            out[node.name] = [
                node._service('relay-%s' % name, tcp_relay(
                    '127.0.0.1', port, gw_address if name in data
                    else sock[name]), marker='TCP-LISTEN:%d' % port)
                for name, port in sorted(dict(ports, **data).items())]
        return out

    def _ceph_ports(self):
        cluster = self.stack.ceph()
        return ceph_ports(cluster.ceph_json('mon', 'dump'),
                          cluster.ceph_json('osd', 'dump'),
                          cluster.ceph_json('mgr', 'dump'))

    # -- up ---------------------------------------------------------------

    def up(self):
        if not self.count:
            raise svc.StackError('nodes up: --count must be at least 1')
        saved = self.stack.state.get('nodes')
        if saved and saved.get('count') != self.count:
            raise svc.StackError('%d nodes are up already: "nodes down" '
                                 'first' % saved['count'])
        if self.stack.service('nova-compute').pid() is None:
            raise svc.StackError('the stack is not up: tools/thunder-stack '
                                 'up first')
        started = time.monotonic()
        self.stack.state['nodes'] = {'count': self.count,
                                     'link_mbit': self.link_mbit}
        self.stack.save_state()
        os.makedirs(os.path.join(self.root, 'ns'), exist_ok=True)
        os.makedirs(self.relay_dir, exist_ok=True)
        if not netlab.leftover_namespaces(PREFIX):
            svc.log('creating %d nodes behind %s links' % (
                self.count, '%s Mbit/s' % self.link_mbit
                if self.link_mbit else 'unshaped'))
            self.testbed.create()
        self.testbed.shape(self.link_mbit * 1e6 if self.link_mbit else None)
        _private_mount(os.path.join(self.root, 'ns'))
        ceph = self._ceph_ports()
        self.stack.state['nodes']['ceph_ports'] = ceph
        self.stack.save_state()
        relays = self.relays(ceph)
        for node in self.nodes:
            node.write_config()
            node.create_namespaces()
        for service in [s for group in relays.values() for s in group]:
            service.start()
        # libvirtd and thunder-cache answer before nova-compute and
        # cinder-volume start (they connect at their start).
        for first in (True, False):
            group = [s for n in self.nodes for s in n.services()
                     if (s.name in ('cinder-volume', 'nova-compute')) !=
                     first]
            for service in group:
                service.start()
            for service in group:
                service.wait_healthy(START_TIMEOUT)
        self._wait_volume_services()
        for node in self.nodes:
            compute = node.service('nova-compute')
            self.stack.bootstrap(
                'wait-compute', node.name, str(compute.pid()),
                str(nova_mod.COMPUTE_TIMEOUT),
                timeout=nova_mod.COMPUTE_TIMEOUT + 60)
            devstack.run(
                self.stack, 'join_thunder_availability_zone', env=dict(
                    self.stack.openrc_env(),
                    PATH=os.path.join(self.stack.venv, 'bin') + ':' +
                    os.environ['PATH'],
                    NOVA_CONF=node.path('etc', 'nova-compute.conf'),
                    THUNDER_NODE_AVAILABILITY_ZONE=node.name))
        svc.log('%d nodes up in %.0f s: %s' % (
            self.count, time.monotonic() - started,
            ', '.join('%s (%s)' % (n.name, n.address) for n in self.nodes)))

    def _wait_volume_services(self, timeout=START_TIMEOUT):
        wanted = {'%s@%s' % (n.name, layout.PEER_BACKEND) for n in self.nodes}
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                service = node.service('cinder-volume')
                if service.pid() is None:
                    raise svc.StackError('%s: cinder-volume exited; see %s:'
                                         '\n%s' % (node.name,
                                                   service.log_file,
                                                   svc.tail(
                                                       service.log_file)))
            up = {s['host'] for s in self.stack.volume_services()
                  if s['binary'] == 'cinder-volume' and s['state'] == 'up'}
            pools = {p.partition('#')[0] for p in json.loads(
                self.stack.bootstrap('pools'))}
            if wanted <= up and wanted <= pools:
                return
            if time.monotonic() > deadline:
                raise svc.StackError('cinder-volume of %s not up after %ds'
                                     % (sorted(wanted - up), timeout))
            time.sleep(2)

    # -- down -------------------------------------------------------------

    def down(self):
        if not self.stack.state.get('nodes'):
            svc.log('no nodes')
            return
        ceph = self.stack.state['nodes'].get('ceph_ports', [])
        api_up = self.stack.service('nova-api').pid() is not None
        for node in self.nodes:
            node.stop()
            if api_up:
                self._forget(node)
        for service in [s for group in self.relays(ceph).values()
                        for s in group]:
            service.stop()
        for node in self.nodes:
            node.remove_namespaces()
            # Caches, volumes' layers, instances: the next nodes start
            # empty (logs are kept).
            for sub in ('data', 'libvirt'):
                shutil.rmtree(node.path(sub), ignore_errors=True)
        _unmount(os.path.join(self.root, 'ns'))
        self.testbed.close()
        del self.stack.state['nodes']
        self.stack.save_state()
        svc.log('nodes removed')

    def _forget(self, node):
        """The node's aggregate, compute service (and provider), Cinder.

        A step that fails (a server left on the node, say) is reported and
        the others are still done.
        """
        def client(*args):
            try:
                return clients.cli(self.stack, 'openstack', *args, timeout=300)
            except svc.StackError as e:
                svc.log('%s: %s' % (node.name, e))
                return ''

        aggregates = client('aggregate', 'list', '-f', 'value', '-c', 'Name')
        if node.name in aggregates.split():
            client('aggregate', 'remove', 'host', node.name, node.name)
            client('aggregate', 'delete', node.name)
        ids = client('compute', 'service', 'list', '--service',
                     'nova-compute', '--host', node.name, '-f', 'value',
                     '-c', 'ID').split()
        for service_id in ids:
            client('compute', 'service', 'delete', service_id)
        svc.run([os.path.join(self.stack.venv, 'bin', 'cinder-manage'),
                 '--config-file', self.stack.path('etc', 'cinder',
                                                  'cinder.conf'),
                 'service', 'remove', 'cinder-volume',
                 '%s@%s' % (node.name, layout.PEER_BACKEND)], check=False)

    def status(self):
        rows = []
        for node in self.nodes:
            for service in node.services():
                row = service.status()
                row['name'] = '%s %s' % (node.name, service.name)
                rows.append(row)
        return rows


def _private_mount(path):
    """Make ``path`` a private mount: persistent namespaces live there."""
    if not mounted(path):
        svc.run(['mount', '--bind', path, path])
    svc.run(['mount', '--make-private', path])


def mounted(path):
    """Whether something is mounted on ``path`` (bind mounts too)."""
    with open('/proc/self/mounts') as f:
        return any(line.split()[1] == path for line in f)


def _unmount(path):
    """Unmount ``path``, every layer."""
    while mounted(path):
        svc.run(['umount', path])
