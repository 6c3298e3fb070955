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

"""Configuration options of the ``thunder-cache`` daemon.

They live in ``/etc/thunder/thunder-cache.conf`` (or the files given with
``--config-file``), in these sections: ``[node]`` (identity, address,
directories), ``[peer]`` (the peer protocol: secret, fan-out, rates,
timeouts), ``[cache]``, ``[origin]`` (how to reach image-volumes in
RBD), ``[blockdev]`` (the peer-mode volume files and the control socket
of the Cinder driver), ``[prefetch]`` (boot traces and hydration) and
``[advertise]`` (peer-cache locations in Cinder, with the credentials to
write them).
"""

import socket

from oslo_config import cfg

from thunder_cache.boot import prefetch
from thunder_cache.cache import eviction
from thunder_cache.peer.advertise import options as advertise_opts

DEFAULT_PORT = 7485

node_opts = [
    cfg.StrOpt('node_id',
               default=socket.gethostname().split('.')[0] or 'node',
               sample_default='<short host name>',
               regex=r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$',
               help='Identity of this node in the peer protocol. Peers '
                    'count fan-out children by node id, so every node of '
                    'a deployment needs a distinct one.'),
    cfg.HostAddressOpt('listen_address',
                       default='0.0.0.0',
                       help='Address the peer server listens on.'),
    cfg.PortOpt('listen_port',
                default=DEFAULT_PORT,
                help='TCP port of the peer server. 0 picks a free port '
                     '(tests only: peers must know the port).'),
    cfg.StrOpt('advertise_url',
               help='URL other nodes reach this node at, '
                    'http://HOST:PORT (https:// with [peer] tls_enabled). '
                    'It is signed into every request this node makes, is '
                    'where full nodes redirect new peers to, and tokens '
                    'are accepted only if made for it, so it must be the '
                    'URL peers list this node under. Defaults to '
                    'http(s)://<listen_address or host name>:'
                    '<listen_port>.'),
    cfg.StrOpt('cache_dir',
               default='/var/lib/thunder-cache',
               help='Directory of the image caches: one sub-directory per '
                    'image with its sparse data file, its chunk map and '
                    'its verified manifest.'),
    cfg.StrOpt('descriptors_dir',
               help='Directory of image descriptors (<image id>.json: the '
                    'manifest digest from the Glance image record, the '
                    'origin and the peer URLs). Read at start and on '
                    'SIGHUP. Defaults to <cache_dir>/images.d.'),
    cfg.StrOpt('local_socket',
               default='/run/thunder-cache/local.sock',
               help='Unix socket on which the node\'s own readers (the '
                    'block-device layer, the Cinder driver) read images: '
                    'the chunk and manifest requests of the peer '
                    'protocol, without tokens, fan-out or upload limit. '
                    'Created with mode 0660: its group decides who may '
                    'read cached images. Empty to disable.'),
    cfg.StrOpt('pid_file',
               default='/run/thunder-cache/thunder-cache.pid',
               help='File holding the daemon\'s process id while it runs. '
                    'The daemon refuses to start while the file names a '
                    'running thunder-cache.'),
]

peer_opts = [
    cfg.StrOpt('shared_secret_file',
               default='/etc/thunder/peer-secret',
               help='File holding the secret shared by all nodes of the '
                    'deployment (at least 16 bytes; surrounding '
                    'whitespace is ignored). Every peer request carries an '
                    'HMAC-SHA256 token keyed with it; requests without a '
                    'valid token are refused with 401. Keep it readable '
                    'by the daemon only.'),
    cfg.IntOpt('token_lifetime',
               default=60, min=1, max=300,
               help='Seconds the tokens this node signs stay valid. Nodes '
                    'refuse tokens claiming more than 300 s (plus 30 s of '
                    'clock skew), so clocks must be roughly in sync.'),
    cfg.IntOpt('max_children',
               default=2, min=1, max=64,
               help='Child nodes this node serves per image; more are '
                    'redirected to a child, so the nodes of an image form '
                    'a tree of this degree. Larger values make the tree '
                    'shallower at the cost of more upload per node.'),
    cfg.IntOpt('stripes',
               default=1, min=1, max=16,
               help='Stripes the chunks of an image are dealt into (chunk '
                    'i in stripe i modulo this). A node that finds itself '
                    'in the image\'s list of holders fetches each stripe '
                    'from its own parent, planned from that list so that '
                    'every node forwards one stripe to max_children '
                    'children and receives the others from as many '
                    'parents: every node uploads, and receives from '
                    'several at once. Fan-out is counted per stripe. 1: '
                    'one parent per node, a tree whose leaves upload '
                    'nothing (the default). With a boot trace, 2 made the '
                    'last of 8-16 emulated nodes ready 1.3-1.8 times '
                    'sooner; without one, 4-23% later, and it is not '
                    'measured beyond 16 nodes (doc: bulk-boot, '
                    '"Stripes"). Every node of a deployment should use '
                    'the same value, best equal to max_children.'),
    cfg.IntOpt('child_ttl',
               default=10, min=1,
               help='Seconds after its last request a child gives up its '
                    'place in the fan-out table of an image. A node that '
                    'tried this one only while its own parent failed, or '
                    'that holds what it needs, frees the slot after this '
                    'long; a child that comes back after it is redirected '
                    'again at the cost of one round trip.'),
    cfg.IntOpt('upload_rate_limit',
               default=0, min=0,
               help='Total rate, in MiB/s, at which this node sends chunk '
                    'data to peers, over all images and connections. 0 '
                    'means no limit. Set it below the node\'s link speed '
                    'to leave bandwidth to the guests.'),
    cfg.IntOpt('upload_burst',
               default=4, min=1,
               help='Burst, in MiB, allowed above upload_rate_limit.'),
    cfg.FloatOpt('fetch_timeout',
                 default=10.0, min=0.1,
                 help='Seconds a request to a peer may stay silent '
                      '(connect or read), and the fixed part of the '
                      'deadline of its whole answer (see '
                      'min_transfer_rate). A peer that misses either is '
                      'dropped for the chunk and backed off, and the next '
                      'source is tried.'),
    cfg.FloatOpt('min_transfer_rate',
                 default=1.0, min=0.001,
                 help='Slowest average rate, in MiB/s, at which a peer '
                      'must deliver an answer: it has fetch_timeout plus '
                      'the answer\'s size at this rate. Keep it well below '
                      'one transfer\'s share of a busy link.'),
    cfg.FloatOpt('relay_timeout',
                 default=8.0, min=0.1,
                 help='Seconds a peer request for a chunk this node does '
                      'not hold waits while this node fetches it; then the '
                      'peer gets 503 and asks elsewhere. Keep it below '
                      'fetch_timeout. With cut_through, the wait for the '
                      'first bytes of the chunk.'),
    cfg.BoolOpt('cut_through',
                default=False,
                help='Send a chunk this node is still fetching to the peers '
                     'that ask for it as its bytes arrive (cut-through), '
                     'rather than once it is verified and stored. The last '
                     'byte goes only once this node verified the chunk, and '
                     'an answer whose fetch fails is closed short, so a '
                     'peer never completes a chunk this node did not '
                     'verify (and verifies it again itself). Takes a hop\'s '
                     'store-and-forward delay off every cold chunk in a '
                     'tree of nodes. Turn it on with stripes = 2: bulk '
                     'boots of 8 and 16 nodes were ready 1.16 to 1.46 '
                     'times sooner. With one tree (stripes = 1) it slowed '
                     'boots with a boot trace (prefetch) by 8 to 22% in '
                     'the same benchmark, hence off by default.'),
    cfg.IntOpt('max_redirects',
               default=16, min=0, max=64,
               help='Redirects from full nodes followed for one chunk '
                    'before the peer is given up; this bounds the depth of '
                    'the tree a node can join at (16: 65535 nodes with '
                    'max_children = 2).'),
    cfg.IntOpt('peer_retry_interval',
               default=5, min=1,
               help='Seconds a peer that failed (error, timeout, a chunk '
                    'that did not verify, a refused redirect) is left out '
                    'before it is asked again. Each further failure in a '
                    'row doubles the time, up to '
                    'peer_retry_max_interval; a chunk it serves ends the '
                    'series. Busy (503) and loop (508) answers only skip '
                    'the peer for the chunk, unless they took more than '
                    'half of fetch_timeout.'),
    cfg.IntOpt('peer_retry_max_interval',
               default=300, min=1,
               help='Longest time, in seconds, a peer that keeps failing '
                    'is left out (see peer_retry_interval).'),
    cfg.ListOpt('allowed_networks',
                default=[],
                sample_default='<the network of this node\'s peer '
                               'address>',
                help='Networks (CIDR, e.g. 10.0.0.0/24, fd00:1::/64) '
                     'other nodes may be reached in. Peer URLs from '
                     'descriptors, from the image-volumes\' metadata and '
                     'from redirects outside them are never contacted; '
                     'host names are resolved once and every address '
                     'they resolve to must be inside. Empty: the network '
                     'of the interface carrying this node\'s own peer '
                     'address (advertise_url, or listen_address). '
                     'Loopback, link-local, cloud metadata, unspecified, '
                     'multicast, broadcast and reserved addresses are '
                     'refused unless a network listed here lies inside '
                     'their range (e.g. 127.0.0.0/8 for nodes on one '
                     'host).'),
    cfg.IntOpt('max_peers_per_image',
               default=16, min=1, max=1024,
               help='Peers of an image a node asks at most: the first ones '
                    'of its descriptor\'s list, then of the image\'s '
                    'advertisements, oldest first. Redirects from these '
                    'peers reach the rest of the image\'s tree.'),
    cfg.IntOpt('max_connections',
               default=256, min=1,
               help='Concurrent authenticated peer connections, each '
                    'served by a thread of its own; more are answered '
                    '503. A connection counts once its first request '
                    'carried a valid token.'),
    cfg.IntOpt('max_unauthenticated_connections',
               default=256, min=1,
               help='Concurrent connections that have not yet sent a '
                    'request with a valid token. They hold no thread; '
                    'when all are taken, the oldest is closed for a new '
                    'one.'),
    cfg.IntOpt('max_connections_per_address',
               default=64, min=1,
               help='Concurrent connections, authenticated or not, from '
                    'one source address. Beyond, a new connection closes '
                    'the oldest unauthenticated one of its address, or is '
                    'closed at once if they are all authenticated. A peer '
                    'node opens at most one connection per thread reading '
                    'from this node.'),
    cfg.FloatOpt('head_timeout',
                 default=5.0, min=0.1, max=60.0,
                 help='Seconds a request head may take from its first '
                      'byte. A new connection must complete its TLS '
                      'handshake and its first request head within this '
                      'time of being accepted, or it is closed.'),
    cfg.IntOpt('idle_timeout',
               default=60, min=1,
               help='Seconds an idle keep-alive peer connection stays '
                    'open between two requests.'),
    cfg.IntOpt('replay_cache_size',
               default=100000, min=1000,
               help='Token nonces remembered to refuse replayed requests, '
                    'each until its token expires. '
                    'When full, the nonces expiring first are forgotten '
                    'and tokens expiring no later than them are refused '
                    'with 503 (the requester signs a new one): replays '
                    'stay refused.'),
    cfg.BoolOpt('accept_v1_tokens',
                default=False,
                help='Also accept version 1 tokens, which are neither bound '
                     'to this node nor protected against replay, from '
                     'nodes not yet upgraded. For the time of a rolling '
                     'upgrade only.'),
    cfg.BoolOpt('tls_enabled',
                default=False,
                help='Speak TLS to peers: serve https://, require a client '
                     'certificate signed by tls_ca_file, and check every '
                     'peer\'s certificate against tls_ca_file and the host '
                     'of its URL. Every node of a deployment must have the '
                     'same setting; peer URLs are then https://.'),
    cfg.StrOpt('tls_certificate',
               help='PEM certificate of this node (with its intermediate '
                    'CAs), signed by tls_ca_file, naming the host of '
                    'advertise_url in its subjectAltName (DNS name or IP '
                    'address). Presented as server and as client.'),
    cfg.StrOpt('tls_key',
               help='PEM private key of tls_certificate. Keep it readable '
                    'by the daemon only.'),
    cfg.StrOpt('tls_ca_file',
               help='PEM certificate(s) of the CA that signs the '
                    'certificates of the deployment\'s nodes.'),
    cfg.BoolOpt('metrics_require_auth',
                default=False,
                help='Require a peer token on GET /metrics. Off by '
                     'default so that Prometheus can scrape it; turn it '
                     'on when the port is reachable from untrusted '
                     'networks (the page names the cached images).'),
]

cache_opts = [
    cfg.FloatOpt('commit_interval',
                 default=0.05, min=0.0, max=10.0,
                 help='Seconds over which fetched chunks are made durable '
                      'together; a crash loses at most this interval\'s '
                      'chunks, which are fetched again. 0 syncs every '
                      'chunk before it is served, which is slower.'),
    cfg.FloatOpt('read_retry',
                 default=60.0, min=0.0,
                 help='Seconds a local read (a guest\'s, through its '
                      'volume) keeps retrying, with back-off from 0.25 s '
                      'to 4 s, a chunk that no source could provide, '
                      'before the read fails with an I/O error. Every '
                      'peer busy or timing out at once, or the origin '
                      'away for a moment, then costs the guest a wait '
                      'rather than an error. Peers dropped for an error '
                      'are asked again on each retry. 0 fails at once.'),
    cfg.BoolOpt('verify_persisted',
                default=True,
                help='Verify again, before its first use after a restart, '
                     'each chunk the cache already held (one sha256 per '
                     'chunk per start), so that a chunk damaged on disk is '
                     'fetched again instead of being served.'),
]

origin_opts = [
    cfg.ListOpt('rbd_pools',
                default=['volumes'],
                help='RADOS pools this node reads image-volumes from; the '
                     'first is where an image descriptor without a pool '
                     'points. A registration naming another pool is '
                     'refused. Match the Cinder backends\' '
                     'thunder_rbd_pool.'),
    cfg.StrOpt('rbd_volume_name_template',
               default='volume-%s',
               help='RBD image name of an image-volume, from its Cinder '
                    'volume id: Cinder\'s volume_name_template. The '
                    'daemon reads only the image-volume a descriptor\'s '
                    'origin_volume_id names this way.'),
    cfg.ListOpt('file_origin_dirs',
                default=[],
                help='Directories under which image descriptors may name '
                     'a file (or block device) as the origin, e.g. where '
                     'image-volumes are attached locally. Empty: file '
                     'origins are refused. Paths are opened without '
                     'following symbolic links.'),
    cfg.StrOpt('rbd_ceph_conf',
               default='/etc/ceph/ceph.conf',
               help='Ceph configuration file used to read RBD '
                    'image-volumes. Descriptors cannot name another.'),
    cfg.StrOpt('rbd_cluster_name',
               default='ceph',
               help='Name of the Ceph cluster.'),
    cfg.StrOpt('rbd_user',
               help='Ceph user (without "client.") reading image-volumes; '
                    'read access to rbd_pools is enough (profile '
                    'rbd-read-only).'),
    cfg.StrOpt('rbd_keyring',
               help='Keyring of rbd_user; defaults to what the Ceph '
                    'configuration names.'),
    cfg.IntOpt('rbd_connect_timeout',
               default=10, min=1,
               help='Seconds to wait for the Ceph monitors and OSDs.'),
]

blockdev_opts = [
    cfg.BoolOpt('enabled',
                default=False,
                help='Serve peer-mode volumes: mount the volume files at '
                     'mount_dir and answer the Cinder driver on '
                     'control_socket. Needs /dev/fuse and libfuse 3 '
                     '(Debian: fuse3). Off, the daemon only caches and '
                     'serves images to peers.'),
    cfg.StrOpt('mount_dir',
               default='/var/lib/thunder-cache/volumes',
               help='Where the FUSE filesystem of volume files is mounted: '
                    'one raw file per volume, named after the Cinder '
                    'volume, which the driver attaches with a loop '
                    'device.'),
    cfg.StrOpt('layers_dir',
               default='/var/lib/thunder-cache/layers',
               help='Where each volume\'s own writes live: a directory '
                    'per volume with a sparse data file and a bitmap of '
                    'written 4 KiB blocks. Size it for the guests\' '
                    'writes; the images stay in [node] cache_dir.'),
    cfg.StrOpt('control_socket',
               default='/run/thunder-cache/control.sock',
               help='Unix socket on which the node\'s cinder-volume '
                    'registers images and creates, resizes and deletes '
                    'volumes (mode 0660).'),
    cfg.StrOpt('control_group',
               help='Group owning control_socket and the volume files '
                    '(e.g. cinder), so that cinder-volume can manage, '
                    'fill and upload volumes without root. Unset: the '
                    'daemon\'s own group.'),
    cfg.IntOpt('max_volume_size',
               default=64 * 1024, min=1, max=(1 << 33) - 1,
               help='Largest volume, in GiB, that the control socket '
                    'creates or grows a volume to. A volume\'s layer is a '
                    'sparse file of its size, so the layers_dir '
                    'filesystem must allow such files (ext4: 16 TiB).'),
    cfg.BoolOpt('allow_other',
                default=True,
                help='Mount with allow_other (and default_permissions), '
                     'so that root (losetup) and control_group can open '
                     'the volume files when the daemon is not root. A '
                     'non-root daemon needs user_allow_other in '
                     '/etc/fuse.conf.'),
    cfg.StrOpt('volume_server',
               default='native', choices=['python', 'native'],
               help='What serves the volume files. "native" (the '
                    'default): thunder-volume-server (C, libfuse 3), a '
                    'process of its own that reads the cache and layer '
                    'files directly, several times faster than the Python '
                    'server at a fraction of its CPU, and keeps attached '
                    'volumes served while the daemon (or itself) restarts '
                    'or is upgraded. It must be built and installed first '
                    '(native_server_binary); the daemon refuses to start '
                    'without it. "python": the daemon serves the files '
                    'itself (mfusepy); no binary to build, but every '
                    'attached volume fails its I/O while the daemon is '
                    'down. Detach the node\'s volumes (or stop the daemon '
                    'with none attached) before switching.'),
    cfg.StrOpt('native_server_binary',
               default='thunder-volume-server',
               help='The native volume server (volume_server = native): a '
                    'path, or a name looked up in the daemon\'s PATH. '
                    'Build and install it from the source shipped in the '
                    'package (thunder_cache/volumes/native; Debian: gcc, '
                    'make, pkg-config, libfuse3-dev, zlib1g-dev) with '
                    '"make -C <that directory> install PREFIX=/usr/local" '
                    '(devstack does it). Not needed while a server '
                    'started otherwise (systemd) answers on '
                    'native_server_socket.'),
    cfg.StrOpt('native_server_socket',
               default='/run/thunder-cache/volume-server.sock',
               help='Unix socket (mode 0600) on which the native volume '
                    'server takes the daemon\'s requests to pause a '
                    'volume\'s I/O while its layer is grown, copied or '
                    'deleted; its PID file is this path with ".pid".'),
    cfg.FloatOpt('native_fetch_wait',
                 default=60.0, min=0,
                 help='Seconds a read of the native volume server waits '
                      'for an unreachable daemon (restarting) to provide '
                      'a missing chunk before it fails with EIO.'),
]

GROUPS = (('node', node_opts), ('peer', peer_opts),
          ('cache', cache_opts + eviction.opts),
          ('origin', origin_opts), ('blockdev', blockdev_opts),
          ('prefetch', prefetch.opts))


def register(conf):
    for group, opts in GROUPS:
        conf.register_opts(opts, group=group)
    advertise_opts.register_opts(conf)


def list_opts():
    """Options for oslo-config-generator."""
    return ([(group, opts) for group, opts in GROUPS] +
            advertise_opts.list_opts())
