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

"""Configuration options of the thunder Glance store.

They are read from ``[glance_store]`` when Glance runs with ``stores =
thunder``, or from the section of each backend with ``enabled_backends =
NAME:thunder`` (falling back to ``[backend_defaults]``), as for glance_store's
own drivers. All names carry a ``thunder_store_`` prefix.
"""

from oslo_config import cfg

from thunder_common import manifest

_AUTH_RELATED = """
Related options:
    * thunder_store_auth_address
    * thunder_store_user_name
    * thunder_store_password
    * thunder_store_project_name
    * thunder_store_user_domain_name
    * thunder_store_project_domain_name
"""

thunder_store_opts = [
    # -- how to reach Cinder ----------------------------------------------
    cfg.StrOpt('thunder_store_auth_address',
               help="""
Keystone URL the store's service user authenticates against.

When this option, ``thunder_store_user_name``, ``thunder_store_password``
and ``thunder_store_project_name`` are all set, the store talks to Cinder as
that service user, and every image-volume belongs to its project: an
internal project that ordinary users cannot see, so they cannot modify or
delete image-volumes. Otherwise the store uses the token and the service
catalog of the user who makes the request, and image-volumes belong to the
user's project.

Possible values:
    * A Keystone URL, e.g. ``http://controller/identity/v3``
""" + _AUTH_RELATED),
    cfg.StrOpt('thunder_store_user_name',
               help='Service user the store authenticates to Cinder as. '
                    'See thunder_store_auth_address.'),
    cfg.StrOpt('thunder_store_password', secret=True,
               help='Password of thunder_store_user_name.'),
    cfg.StrOpt('thunder_store_project_name',
               help="""
Internal (service) project that owns the image-volumes.

Used with the service user (see ``thunder_store_auth_address``). Cinder's
clone of an image-volume (the ``cinder://`` fast path) accepts volumes of
another project when their ``image_owner`` metadata names the image's owner,
which the store records.
""" + _AUTH_RELATED),
    cfg.StrOpt('thunder_store_user_domain_name', default='Default',
               help='Domain of thunder_store_user_name.'),
    cfg.StrOpt('thunder_store_project_domain_name', default='Default',
               help='Domain of thunder_store_project_name.'),
    cfg.StrOpt('thunder_store_catalog_info',
               default='volumev3::publicURL',
               help="""
How to find Cinder in the service catalog of the request's user.

Used when no service user is configured and
``thunder_store_endpoint_template`` is not set.

Possible values:
    * ``<service_type>:<service_name>:<interface>``; the service name may
      be empty.
"""),
    cfg.StrOpt('thunder_store_endpoint_template',
               help="""
Cinder endpoint to use instead of looking it up in the service catalog.

``%(tenant)s`` (and the other keys of the request context) are replaced,
e.g. ``http://controller/volume/v3/%(tenant)s``. Ignored when a service
user is configured.
"""),
    cfg.StrOpt('thunder_store_os_region_name',
               help='Region to look Cinder up in, in the service catalog.'),
    cfg.BoolOpt('thunder_store_api_insecure', default=False,
                help='Do not verify the TLS certificate of Cinder and '
                     'Keystone.'),
    cfg.StrOpt('thunder_store_ca_certificates_file',
               help='CA certificates to verify Cinder and Keystone with.'),
    cfg.IntOpt('thunder_store_http_retries', default=3, min=0,
               help='How many times a failed Cinder API call is retried.'),
    cfg.IntOpt('thunder_store_state_transition_timeout', default=300,
               min=1,
               help="""
Seconds to wait for an image-volume to become available after it is created
or extended. An upload whose volume is still not available then fails, and
the volume is deleted.
"""),
    # -- the image-volumes -------------------------------------------------
    cfg.StrOpt('thunder_store_volume_type',
               help="""
Cinder volume type of the image-volumes: one whose backend is
ThunderDriver, so that volumes from the image are copy-on-write clones.
Unset: Cinder's default volume type.
"""),
    cfg.IntOpt('thunder_store_write_chunk_size', default=4, min=1, max=64,
               help="""
Size, in MiB, of the pieces the store reads from the upload and writes to
the image-volume.
"""),
    cfg.IntOpt('thunder_store_writes_in_flight', default=4, min=1, max=32,
               help="""
Pieces an upload writes to the image-volume at once, while the next one is
read and hashed. An upload holds about this many pieces plus two in memory;
1 writes one piece at a time.
"""),
    cfg.IntOpt('thunder_store_manifest_chunk_size',
               default=manifest.DEFAULT_CHUNK_SIZE // 1024,
               min=manifest.MIN_CHUNK_SIZE // 1024,
               max=manifest.MAX_CHUNK_SIZE // 1024,
               help="""
Size, in KiB, of the chunks of the per-chunk digest manifest written with
every image (a power of two). The peer mode fetches, verifies and caches
whole chunks, one request each. Smaller chunks fetch less that a boot does
not read and wait less per first read: with 64 KiB a Debian boot's nodes
receive 1.21x the bytes it reads instead of 1.49x, and 8 or 16 nodes were
ready 1.15-1.35x sooner over 40 Mbit/s links (with stripes = 2). Larger
chunks make fewer requests: at 64 KiB a node's peer server and its cold
reads move a quarter to a half of what they move at 256 KiB. Choose 64 KiB
where links are the bottleneck of a boot storm (per node, well under 1
Gbit/s). A manifest has at most 4 Mi chunks (1 TiB
at 256 KiB, 256 GiB at 64 KiB): a larger image gets the smallest
power-of-two multiple of this size that describes it; one uploaded without
its size that outgrows the limit is read back once for its manifest.
Images already stored keep their chunk size.
"""),
    cfg.BoolOpt('thunder_store_verify_after_write', default=False,
                help="""
Read every image back after writing it and check each chunk against the
manifest before the upload succeeds. Doubles the I/O of an upload.
"""),
    cfg.IntOpt('thunder_store_rbd_connect_timeout', default=30, min=1,
               help="""
Seconds that connecting to Ceph, and each Ceph operation, may take when the
store reads or writes an image-volume through librbd.
"""),
    # -- locations ---------------------------------------------------------
    cfg.BoolOpt('thunder_store_alias_locations', default=True,
                help="""
Let this store also serve the ``cinder://`` and ``rbd://`` locations of its
image-volumes, so that Glance accepts them as additional locations of an
image (the fast paths of Cinder and Nova use them). Disable in a
single-store Glance that also enables glance_store's own ``cinder`` or
``rbd`` store, which would otherwise compete for those schemes.
"""),
    cfg.StrOpt('thunder_store_location_scheme', default='rbd',
               choices=[
                   ('thunder', 'thunder://[STORE/]VOLUME_ID?image_id=ID: '
                               'the location names its image, and only '
                               'VMThunder reads it'),
                   ('rbd', 'rbd://FSID/POOL/IMAGE/SNAPSHOT for an '
                           'image-volume sealed in RBD: Nova and Cinder\'s '
                           'RBD driver clone it too, with no location '
                           'added afterwards')],
               help="""
The form of the location the store gives Glance for a new image. With
``rbd`` (the default), an image-volume sealed in RBD is located by its
sealed snapshot, the form Nova's RBD image backend (``images_type = rbd``)
and Cinder's RBD driver clone with no location added afterwards; Glance
needs only ``show_image_direct_url = True`` (``show_multiple_locations``
can stay off). Image-volumes on other backends get a thunder:// location,
as do all images with ``thunder``. Images already stored keep their
locations.
"""),
    cfg.StrOpt('thunder_store_volume_name_template', default='volume-%s',
               help="""
Cinder's ``volume_name_template``: how the RBD image of a volume is named,
used to tell which image-volume an ``rbd://`` location names.
"""),
    # -- non-RBD volumes through os-brick ----------------------------------
    cfg.StrOpt('thunder_store_rootwrap_config',
               default='/etc/glance/rootwrap.conf',
               help="""
Rootwrap configuration for os-brick, used only to attach image-volumes that
are not on Ceph RBD (RBD volumes are read and written through librbd and
need no privileges).
"""),
    cfg.BoolOpt('thunder_store_use_multipath', default=False,
                help='Attach non-RBD image-volumes through multipath.'),
    cfg.BoolOpt('thunder_store_enforce_multipath', default=False,
                help='Fail attaching a non-RBD image-volume when multipathd '
                     'is not running.'),
]


def list_opts():
    """The store's options, for oslo-config-generator."""
    return [('glance_store', thunder_store_opts)]
