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

"""The ``thunder-cache`` daemon: the node cache and its peer server.

Usage::

    thunder-cache --config-file /etc/thunder/thunder-cache.conf

Runs in the foreground (systemd ``Type=simple``). SIGTERM and SIGINT stop
it gracefully: no new connections, responses in progress finish, caches
are closed, the PID file is removed. SIGHUP re-reads the image
descriptors.
"""

import errno
import grp
import os
import signal
import sys
import threading

from oslo_config import cfg
from oslo_log import log as logging

from thunder_cache.boot import lifecycle
from thunder_cache.cache import eviction
from thunder_cache.cache import node as node_mod
from thunder_cache.cache import origins
from thunder_cache.control import server as control_server
from thunder_cache.control import service as service_mod
from thunder_cache import options
from thunder_cache.peer.advertise import advertiser as advertiser_mod
from thunder_cache.peer.advertise import cinder as cinder_records
from thunder_cache.peer import peerpolicy
from thunder_cache.peer import protocol
from thunder_cache.peer import server as server_mod
from thunder_cache.peer import sources
from thunder_cache.peer import tls
from thunder_cache.volumes import nativevol
from thunder_common import procs

LOG = logging.getLogger(__name__)
MiB = 1024 * 1024


class PidFileError(RuntimeError):
    pass


class StartError(RuntimeError):
    """A part of the daemon could not start (said without a traceback)."""


def write_pid_file(path):
    """Write our PID to ``path``; refuse if a live daemon holds it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        with open(path) as f:
            old = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        old = 0
    if old and old != os.getpid() and procs.alive(old) and \
            'thunder' in procs.command_line(old):
        raise PidFileError('%s names running process %d' % (path, old))
    tmp = '%s.%d.tmp' % (path, os.getpid())
    with open(tmp, 'w') as f:
        f.write('%d\n' % os.getpid())
    os.rename(tmp, path)


def remove_pid_file(path):
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def origin_factory(conf):
    """Builds the origins descriptors may name, from [origin] options.

    :raises ValueError: if the options are malformed.
    """
    return origins.OriginPolicy.from_conf(conf)


class Daemon:
    """The node, its server and its signal handling."""

    def __init__(self, conf):
        self.conf = conf
        secret = protocol.load_secret(conf.peer.shared_secret_file)
        # Before any URL is read: the scheme of every peer URL.
        protocol.use_tls(conf.peer.tls_enabled)
        self._tls_server, self._tls_client = tls.contexts(conf.peer)
        if conf.node.advertise_url:
            try:
                protocol.normalize_url(conf.node.advertise_url)
            except ValueError as e:
                raise ValueError('[node] advertise_url: %s' % e)
        self.server = None
        self.local_server = None
        host = conf.node.listen_address
        # Bind first so that a port of 0 is known before the URL is.
        self._bind_address = (host, conf.node.listen_port)
        self._secret = secret
        self._wake = threading.Event()
        self._terminate = False
        self._reload = False
        self.node = None
        self.lifecycle = None
        self.evictor = None
        self._thread = None
        self.mount = None
        self.store = None
        self.control_server = None
        self.origins = origin_factory(conf)

    def start(self):
        conf = self.conf
        if conf.blockdev.enabled and conf.blockdev.volume_server == 'native':
            self._reverify_native(conf.blockdev.native_server_socket)
            self._check_native(conf.blockdev)
        placeholder = None
        self.server = server_mod.PeerServer(
            self._bind_address, placeholder, self._secret,
            idle_timeout=conf.peer.idle_timeout,
            max_connections=conf.peer.max_connections,
            metrics_auth=conf.peer.metrics_require_auth,
            head_timeout=conf.peer.head_timeout,
            max_unauthenticated=conf.peer.max_unauthenticated_connections,
            max_per_address=conf.peer.max_connections_per_address,
            tls_context=self._tls_server,
            replay_cache_size=conf.peer.replay_cache_size,
            accept_v1_tokens=conf.peer.accept_v1_tokens)
        port = self.server.port
        url = conf.node.advertise_url or '%s://%s:%d' % (
            protocol.url_scheme(), self._advertised_host(), port)
        signer = protocol.Signer(self._secret, conf.node.node_id, url,
                                 lifetime=conf.peer.token_lifetime)
        client = sources.PeerClient(signer, timeout=conf.peer.fetch_timeout,
                                    tls_context=self._tls_client)
        client.min_rate = conf.peer.min_transfer_rate * MiB
        client.policy = self._peer_policy(url)
        self.node = node_mod.Node(
            conf.node.node_id, url, conf.node.cache_dir, client,
            max_children=conf.peer.max_children,
            child_ttl=conf.peer.child_ttl,
            upload_rate=conf.peer.upload_rate_limit * MiB,
            upload_burst=conf.peer.upload_burst * MiB,
            relay_timeout=conf.peer.relay_timeout,
            cut_through=conf.peer.cut_through,
            max_redirects=conf.peer.max_redirects,
            retry_interval=conf.peer.peer_retry_interval,
            retry_max_interval=conf.peer.peer_retry_max_interval,
            max_peers=conf.peer.max_peers_per_image,
            verify_persisted=conf.cache.verify_persisted,
            commit_interval=conf.cache.commit_interval,
            read_retry=conf.cache.read_retry,
            stripes=conf.peer.stripes)
        self.server.node = self.node
        self.lifecycle = lifecycle.ImageLifecycle(
            self.node, conf.prefetch, self._advertiser(url))
        self.node.on_activate = self.lifecycle.activated
        self.evictor = eviction.Evictor(
            self.node, conf.cache, forget=self.lifecycle.forget,
            volume_gone=self.lifecycle.volume_gone,
            descriptors_dir=self.descriptors_dir,
            exclude=(self.descriptors_dir, conf.blockdev.layers_dir,
                     conf.blockdev.mount_dir))
        self.node.on_full = self.evictor.cache_full
        self.node.metrics_hooks.append(self.evictor.add_metrics)
        self.lifecycle.start()
        self.load_descriptors()
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        args=(0.2,), name='peer-server',
                                        daemon=True)
        self._thread.start()
        if conf.node.local_socket:
            self.local_server = server_mod.LocalServer(conf.node.local_socket,
                                                       self.node)
            threading.Thread(target=self.local_server.serve_forever,
                             args=(0.2,), name='local-server',
                             daemon=True).start()
        if conf.blockdev.enabled:
            self._start_blockdev()
        self.evictor.start()
        LOG.info('thunder-cache %s serving %s on %s:%d (%s, %d images)',
                 conf.node.node_id, url, self._bind_address[0], port,
                 'TLS' if self._tls_server else 'plain HTTP',
                 len(self.node.image_ids()))

    def _peer_policy(self, url):
        """Where peer requests may go.

        [peer] allowed_networks, or else the network of this node's own
        peer address.
        """
        listed = self.conf.peer.allowed_networks
        if listed:
            try:
                networks = peerpolicy.parse_networks(listed)
            except ValueError as e:
                raise StartError('[peer] allowed_networks: %s' % e)
            where = '[peer] allowed_networks'
        else:
            host = sources.split_url(url)[0]
            networks, reason = peerpolicy.own_networks(host)
            if not networks:
                LOG.warning('Cannot tell this node\'s peer network: %s. '
                            'No peer is contacted (chunks come from the '
                            'origin) until [peer] allowed_networks lists '
                            'the peers\' networks or [node] advertise_url '
                            'names this node\'s address on the peer '
                            'network.', reason)
            where = 'the network of %s' % host
        policy = peerpolicy.AddressPolicy(networks)
        LOG.info('Peers may be contacted in %s (%s)', policy.describe(),
                 where)
        return policy

    def _advertiser(self, url):
        conf = self.conf
        if not conf.advertise.enabled:
            return None
        try:
            records = cinder_records.CinderRecords.from_conf(conf)
        except cinder_records.RecordsError as e:
            raise StartError(str(e))
        advertiser = advertiser_mod.Advertiser(
            records, conf.node.node_id, url, ttl=conf.advertise.ttl,
            refresh_interval=conf.advertise.refresh_interval)
        advertiser.start()
        return advertiser

    def _start_blockdev(self):
        """Mount the volume files and answer the Cinder driver."""
        from thunder_cache.volumes import volumes

        conf = self.conf.blockdev
        native = None
        if conf.volume_server == 'native':
            native = nativevol.NativeServer(conf.native_server_socket)
        self.store = volumes.VolumeStore(
            conf.layers_dir, self.node,
            max_size=conf.max_volume_size * volumes.GiB, native=native)
        if native is None:
            self._mount_python(conf)
        service = service_mod.VolumeService(
            self.node, self.store, conf.mount_dir, self.descriptors_dir,
            self.origins)
        service.evictor = self.evictor
        service.trace_state = self.lifecycle.trace_state
        self.evictor.in_use = service.image_in_use
        if native is not None:
            # Before the control socket answers: whoever it answers (the
            # Cinder driver, a test) may attach a volume at once, and its
            # file must be served by then.
            self._start_native(conf, native)
        self.control_server = control_server.ControlServer(
            conf.control_socket, service.handlers(),
            expected=service_mod.EXPECTED_ERRORS, group=conf.control_group)
        self.control_server.start()
        LOG.info('Volume files in %s (layers in %s, served by %s); '
                 'control socket %s', conf.mount_dir, conf.layers_dir,
                 conf.volume_server, conf.control_socket)

    def _mount_python(self, conf):
        # Imported here: only nodes serving volumes need libfuse 3.
        from thunder_cache.volumes import fusefs

        try:
            self.mount = fusefs.Mount(self.store, conf.mount_dir,
                                      allow_other=conf.allow_other,
                                      group=conf.control_group)
            self.mount.start()
        except (fusefs.MountError, KeyError) as e:
            # KeyError: control_group names no group.
            self.mount = None
            raise StartError('cannot serve the volume files at %s: %s'
                             % (conf.mount_dir, e))

    @staticmethod
    def _reverify_native(socket_path):
        """A server that outlived the last daemon: it forgets its maps.

        Before any cache is opened, so that it serves no chunk this run
        has not verified (or, on a reset cache, not written).
        """
        native = nativevol.NativeServer(socket_path)
        try:
            try:
                images = native.reverify()
            except nativevol.NativeError as e:
                if e.code != 'EINVAL':
                    raise
                # A server older than REVERIFY: a new server knows no
                # chunk (the holder starts the binary installed now).
                LOG.warning('thunder-volume-server at %s does not know '
                            'REVERIFY (%s): restarting it', socket_path, e)
                native.restart()
                return
        except nativevol.NativeError as e:
            raise StartError('thunder-volume-server at %s must forget which '
                             'chunks it may read but does not answer: %s'
                             % (socket_path, e))
        if images:
            LOG.info('thunder-volume-server reads the chunks of %d images '
                     'again only once this run has verified them', images)

    @staticmethod
    def _check_native(conf):
        """The server answers, or its binary is there: else StartError.

        Before anything starts: no silent fallback to the Python server.
        """
        try:
            nativevol.NativeServer(conf.native_server_socket).ping()
            return
        except nativevol.NativeError:
            pass
        try:
            nativevol.find_binary(conf.native_server_binary)
        except nativevol.NativeError as e:
            raise StartError('cannot serve the volume files at %s with the '
                             'native server: %s' % (conf.mount_dir, e))

    def _start_native(self, conf, native):
        """Start thunder-volume-server unless it runs (it outlives us)."""
        try:
            gid = grp.getgrnam(conf.control_group).gr_gid \
                if conf.control_group else 0
            native.start(conf.native_server_binary, conf,
                         conf.control_socket, self.conf.node.cache_dir,
                         gid=gid, log_file=native.socket_path + '.log')
        except (nativevol.NativeError, KeyError, OSError) as e:
            raise StartError('cannot serve the volume files at %s with '
                             'the native server ([blockdev] '
                             'native_server_binary = %s): %s'
                             % (conf.mount_dir, conf.native_server_binary,
                                e))

    def _advertised_host(self):
        host = self.conf.node.listen_address
        if host in ('0.0.0.0', '::', ''):
            return self.conf.node.node_id
        if ':' in host:
            return '[%s]' % host
        return host

    @property
    def descriptors_dir(self):
        return self.conf.node.descriptors_dir or os.path.join(
            self.conf.node.cache_dir, 'images.d')

    def load_descriptors(self):
        count = self.node.load_descriptors(self.descriptors_dir,
                                           self.origins)
        LOG.info('Loaded %d image descriptors from %s', count,
                 self.descriptors_dir)

    def request_stop(self, *_args):
        self._terminate = True
        self._wake.set()

    def request_reload(self, *_args):
        self._reload = True
        self._wake.set()

    def wait(self):
        """Serve until asked to stop; re-read descriptors on request."""
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._terminate:
                return
            if self._reload:
                self._reload = False
                self.load_descriptors()

    def stop(self):
        LOG.info('thunder-cache %s stopping', self.conf.node.node_id)
        if self.evictor is not None:
            # First: the volumes it must not evict for are closed below.
            self.evictor.stop()
        if self.control_server is not None:
            self.control_server.stop()
        if self.mount is not None:
            busy = [v for v in self.store.list()
                    if self.store.info(v)['open_count']]
            if busy:
                LOG.error('Stopping with volumes in use (%s): their loop '
                          'devices return I/O errors until the daemon is '
                          'back and they are attached again.',
                          ', '.join(busy))
            self.mount.stop()
        elif self.store is not None and self.store.native is not None:
            LOG.info('The volume files stay served by thunder-volume-server '
                     '(%s)', self.conf.blockdev.native_server_socket)
        if self.store is not None:
            self.store.close()
        if self.lifecycle is not None:
            self.lifecycle.stop()
        if self.local_server is not None:
            self.local_server.stop()
        if self.server is not None:
            if self._thread is not None:
                self.server.stop()
            else:
                # Never served: shutdown() would wait for serve_forever.
                self.server.server_close()
        if self.node is not None:
            self.node.close()


def main(argv=None):
    conf = cfg.ConfigOpts()
    options.register(conf)
    logging.register_options(conf)
    conf(sys.argv[1:] if argv is None else argv, project='thunder',
         prog='thunder-cache')
    logging.setup(conf, 'thunder-cache')
    try:
        daemon = Daemon(conf)
    except (OSError, ValueError) as e:
        LOG.error('Cannot start: %s', e)
        return 1
    try:
        write_pid_file(conf.node.pid_file)
    except (OSError, PidFileError) as e:
        LOG.error('Cannot start: %s', e)
        return 1

    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGHUP, daemon.request_reload)
    try:
        try:
            daemon.start()
        except StartError as e:
            LOG.error('Cannot start: %s', e)
            daemon.stop()
            return 1
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                LOG.error('Cannot start: %s:%d is in use',
                          *daemon._bind_address)
                return 1
            raise
        daemon.wait()
        daemon.stop()
    finally:
        remove_pid_file(conf.node.pid_file)
    return 0


if __name__ == '__main__':
    sys.exit(main())
