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

"""Configuration options of ThunderDriver.

They are set in the backend's section of cinder.conf, next to
``volume_driver = cinder_thunder_driver.driver.ThunderDriver``. The names
carry a ``thunder_`` prefix so that the driver can run in the same
cinder-volume as Cinder's own RBD driver without option clashes.
"""

from oslo_config import cfg

thunder_opts = [
    cfg.StrOpt('thunder_mode',
               default='shared',
               choices=[('shared', 'Volumes are RBD clones of the image-'
                                   'volume on the shared Ceph cluster.'),
                        ('peer', 'Volumes live on this node as thin '
                                 'copy-on-write layers over the node\'s '
                                 'cache of the image (thunder-cache), '
                                 'filled on demand from peers and the '
                                 'origin.')],
               deprecated_for_removal=True,
               deprecated_reason='The volume driver names the mode: '
                                 'cinder_thunder_driver.driver.ThunderDriver '
                                 'is the shared mode, '
                                 'cinder_thunder_driver.peer.PeerDriver the '
                                 'peer mode.',
               help='Where the volumes of this backend live. ThunderDriver '
                    'refuses to start with "peer": set volume_driver = '
                    'cinder_thunder_driver.peer.PeerDriver instead.'),
    cfg.StrOpt('thunder_cache_control_socket',
               default='/run/thunder-cache/control.sock',
               help='Peer mode: the control socket of the node\'s '
                    'thunder-cache daemon ([blockdev] control_socket in '
                    'thunder-cache.conf). cinder-volume must be in the '
                    'group that owns it.'),
    cfg.IntOpt('thunder_cache_timeout',
               default=120,
               min=1,
               help='Peer mode: seconds to wait for an answer of the '
                    'thunder-cache daemon (creating a volume registers its '
                    'image, which reads the image\'s manifest from a peer '
                    'or the origin).'),
    cfg.BoolOpt('thunder_loop_direct_io',
                default=True,
                help='Peer mode: attach volume files with loop devices in '
                     'direct I/O mode, which is faster and keeps a single '
                     'copy of the image in memory (see the peer-mode block '
                     'device page of the docs).'),
    cfg.StrOpt('thunder_rbd_pool',
               default='volumes',
               help='RADOS pool holding the volumes, their snapshots and '
                    'the image-volumes written by the thunder Glance '
                    'store. In peer mode, the pool of the image-volumes '
                    'when their Glance locations do not name it.'),
    cfg.StrOpt('thunder_rbd_ceph_conf',
               default='/etc/ceph/ceph.conf',
               help='Path to the Ceph configuration file of the cluster.'),
    cfg.StrOpt('thunder_rbd_cluster_name',
               default='ceph',
               help='Name of the Ceph cluster (the prefix of its '
                    'configuration and keyring files).'),
    cfg.StrOpt('thunder_rbd_user',
               help='Ceph user (without the "client." prefix) to connect '
                    'as. Leave unset only on clusters with cephx '
                    'authentication disabled.'),
    cfg.StrOpt('thunder_rbd_keyring_conf',
               help='Path to the keyring of thunder_rbd_user. Defaults to '
                    'the keyring the Ceph configuration file names. When '
                    'set, the file must exist and its contents are passed '
                    'to os-brick in the connection info.'),
    cfg.StrOpt('thunder_rbd_secret_uuid',
               help='UUID of the libvirt secret holding the key of '
                    'thunder_rbd_user; handed to Nova in the connection '
                    'info.'),
    cfg.IntOpt('thunder_rados_connect_timeout',
               default=10,
               min=1,
               help='Seconds to wait for the Ceph monitors and OSDs before '
                    'an operation fails with a clear error.'),
    cfg.IntOpt('thunder_max_clone_depth',
               default=4,
               min=1,
               help='Longest chain of clones a volume may sit at the end '
                    'of. A volume cloned deeper than this is usable at '
                    'once and flattened in the background.'),
    cfg.IntOpt('thunder_flatten_workers',
               default=2,
               min=1,
               help='How many background flattens may run at the same '
                    'time; the rest wait in a queue.'),
    cfg.IntOpt('thunder_deferred_purge_interval',
               default=300,
               min=10,
               help='Seconds between sweeps that remove deleted volumes '
                    'kept only because clones depended on them (normally '
                    'they are removed as soon as their last clone goes; '
                    'the sweep catches what an interrupted deletion left).'),
]

CONF = cfg.CONF
CONF.register_opts(thunder_opts, group='backend_defaults')


def list_opts():
    """Options for oslo-config-generator, under the backend's section."""
    return [('backend_defaults', thunder_opts)]
