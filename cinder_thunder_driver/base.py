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

"""What both modes of ThunderDriver share: identity, options, stats."""

from cinder import exception
from oslo_log import log as logging
from oslo_utils import units

from cinder_thunder_driver import image_clones
from cinder_thunder_driver import options

LOG = logging.getLogger(__name__)


def backend_error(message):
    """Cinder's error for a backend failure, logged at ERROR.

    ``message`` is translated and formatted by the caller:
    ``raise base.backend_error(_('Pool %(pool)s ...') % {'pool': name})``.
    """
    LOG.error(message)
    return exception.VolumeBackendAPIException(data=message)


def gib(size_bytes):
    """Bytes as whole GiB, rounded up (Cinder's sizes)."""
    return -(-size_bytes // units.Gi)


class ThunderBase:
    """A mixin placed before Cinder's driver base classes."""

    VERSION = '1.0.0'
    # The name of the third-party CI in OpenStack's wiki.
    CI_WIKI_NAME = 'VMThunder_CI'

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_clones = image_clones.ImageClones()

    @classmethod
    def get_driver_options(cls):
        return options.thunder_opts

    @property
    def _backend_name(self):
        return (self.configuration.safe_get('volume_backend_name') or
                'ThunderDriver')

    def get_volume_stats(self, refresh=False):
        if refresh or not self._stats:
            self._update_volume_stats()
        return self._stats

    def _base_stats(self, protocol, multiattach, qos):
        """Stats of a backend not yet known to be up."""
        conf = self.configuration
        stats = self.image_clones.stats()
        stats.update({
            'volume_backend_name': self._backend_name,
            'vendor_name': 'VMThunder',
            'driver_version': self.VERSION,
            'storage_protocol': protocol,
            'total_capacity_gb': 'unknown',
            'free_capacity_gb': 'unknown',
            'reserved_percentage': conf.safe_get('reserved_percentage'),
            'max_over_subscription_ratio':
                conf.safe_get('max_over_subscription_ratio'),
            'thin_provisioning_support': True,
            'thick_provisioning_support': False,
            'multiattach': multiattach,
            'QoS_support': qos,
            'sparse_copy_volume': True,
            'online_extend_support': True,
            'replication_enabled': False,
            'backend_state': 'down',
        })
        return stats

    def _decline_image(self, volume, image_meta, reason, detail):
        """Let Cinder's generic path create the volume; say why."""
        self.image_clones.declined(volume, image_meta, reason, detail)
        return {}, False

    # Nothing to export: shared-mode volumes are read through librbd,
    # peer-mode ones through a loop device made at attach time.

    def create_export(self, context, volume, connector):
        pass

    def ensure_export(self, context, volume):
        pass

    def remove_export(self, context, volume):
        pass
