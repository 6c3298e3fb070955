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

"""ThunderDriver outside cinder-volume, for functional tests and benchmarks.

cinder-volume hands the driver a backend ``Configuration`` and volume and
snapshot objects from its database. Here the configuration is built the
same way from ``cfg.CONF`` overrides, and the objects are stand-ins with
exactly the attributes the driver reads.
"""

import os
import sys
import uuid

from cinder.volume import configuration
from cinder.volume import driver as volume_driver
from oslo_config import cfg

from cinder_thunder_driver import driver
from cinder_thunder_driver import options


def use_local_privsep_helper():
    """Start Cinder's and os-brick's privileged helpers from this Python.

    cinder-volume starts it as ``sudo privsep-helper``, which looks the
    helper up in sudo's secure PATH, outside a virtualenv. Tests and
    benchmarks run as root, so the virtualenv's helper is started directly.
    """
    import cinder.privsep  # noqa: F401 (registers [cinder_sys_admin])
    import os_brick.privileged  # noqa: F401 (registers [privsep_osbrick])
    helper = os.path.join(os.path.dirname(sys.executable), 'privsep-helper')
    for group in ('cinder_sys_admin', 'privsep_osbrick'):
        cfg.CONF.set_override('helper_command', helper, group=group)


def make_configuration(backend, **overrides):
    """The ``[backend]`` section, with ``overrides`` set in cfg.CONF."""
    conf = configuration.Configuration(volume_driver.volume_opts,
                                       config_group=backend)
    conf.append_config_values(options.thunder_opts)
    for name, value in overrides.items():
        cfg.CONF.set_override(name, value, group=backend)
    return conf


def clear_configuration(backend):
    """Drop every override ``make_configuration`` may have set."""
    for opt in list(options.thunder_opts) + list(volume_driver.volume_opts):
        try:
            cfg.CONF.clear_override(opt.name, group=backend)
        except cfg.NoSuchOptError:
            pass


def make_driver(backend, driver_class=None, **overrides):
    """A set-up, checked driver for ``backend`` (ThunderDriver's default)."""
    drv = (driver_class or driver.ThunderDriver)(
        configuration=make_configuration(backend, **overrides))
    try:
        drv.do_setup(None)
        drv.check_for_setup_error()
    except Exception:
        drv.stop_background_work(timeout=60)
        raise
    return drv


class Volume:
    """The attributes of a Cinder volume the driver reads."""

    def __init__(self, size=1, multiattach=False, volume_type=None,
                 encryption_key_id=None, volume_id=None):
        self.id = volume_id or str(uuid.uuid4())
        self.name = 'volume-%s' % self.id
        self.size = size
        self.multiattach = multiattach
        self.volume_type = volume_type
        self.encryption_key_id = encryption_key_id


class Snapshot:
    """The attributes of a Cinder snapshot the driver reads."""

    def __init__(self, volume):
        self.id = str(uuid.uuid4())
        self.name = 'snapshot-%s' % self.id
        self.volume_name = volume.name
        self.volume_size = volume.size
