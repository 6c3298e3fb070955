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


"""The local stack: real OpenStack services and Ceph on 127.0.0.1.

``tools/thunder-stack up|demo|status|down`` (:mod:`thunder_stack.cli`)
drives a :class:`Stack`. ``up`` installs what is missing
(:mod:`~thunder_stack.install`) and starts, each as a process of its own
stopped by PID (:mod:`~thunder_stack.supervise`): MariaDB, RabbitMQ
(:mod:`~thunder_stack.infra`), a single-node Ceph (BlueStore, so data
survives a restart), Keystone and Glance under uWSGI, the node cache
daemon ``thunder-cache`` (its peer server on 127.0.0.1, its volume files
mounted under ``data/``), Cinder's API, scheduler and volume services,
then Nova, Placement and Neutron (:mod:`~thunder_stack.nova`), each
configured by its own module. Cinder has three backends, ``thunder``
(ThunderDriver), ``thunder-peer`` (PeerDriver, over thunder-cache) and
``rbd`` (Cinder's RBDDriver, on another pool) with a volume type each;
Glance has the upstream ``rbd`` store and, once the thunder store exists,
the ``thunder`` store. The VMThunder parts of cinder.conf and
glance-api.conf are written by ``devstack/lib/thunder``
(:mod:`~thunder_stack.devstack`).

Everything (virtualenv, configuration, data, logs, PID files) lives in one
directory (:mod:`~thunder_stack.layout`): ``.stack/`` in the checkout, or
``$THUNDER_STACK_DIR``.
"""

import json
import os
import time

from thunder_stack import cache
from thunder_stack import ceph as ceph_mod
from thunder_stack import cinder
from thunder_stack import glance
from thunder_stack import infra
from thunder_stack import install
from thunder_stack import keystone
from thunder_stack import layout
from thunder_stack import nova as nova_mod
from thunder_stack import services as svc
from thunder_stack import supervise

CEPH_SIZE_GIB = int(os.environ.get('THUNDER_STACK_CEPH_GIB', '40'))


class Stack(layout.Layout):
    """A stack directory and what runs from it."""

    def up(self):
        """Install what is missing, start everything (idempotent)."""
        started = time.monotonic()
        for sub in ('etc', 'log', 'run', 'data'):
            os.makedirs(self.path(sub), exist_ok=True)
        install.install(self)
        self.init_state()
        infra.mysql(self)
        infra.rabbitmq(self)
        svc.log('starting Ceph (BlueStore in %s)'
                % self.path('data', 'ceph'))
        self.ceph().start(timeout=300)
        keystone.configure_and_start(self)
        cache.configure_and_start(self)
        cinder.write_conf(self)
        glance.write_conf(self)
        # Cinder first: Glance's cinder store looks its volume type up in
        # Cinder when it starts.
        cinder.start(self)
        glance.start(self)
        nova_mod.up(self)
        self.write_openrc()
        svc.log('stack up in %.0f s; credentials in %s'
                % (time.monotonic() - started, self.path('openrc')))

    def down(self):
        supervise.down(self)

    def status(self):
        return supervise.status(self)

    def is_up(self):
        return supervise.is_up(self.status())

    # -- what the jobs call -----------------------------------------------

    def services(self):
        return supervise.services(self)

    def service(self, name):
        return supervise.service(self, name)

    def start(self, name, timeout=120):
        return supervise.start(self, name, timeout)

    def restart_if_config_changed(self, name, files):
        supervise.restart_if_config_changed(self, name, files)

    def ceph(self):
        return ceph_mod.LocalCeph(
            self.path('data', 'ceph'), pools=tuple(layout.POOLS.values()),
            port=self.ports['ceph'], objectstore='bluestore',
            size_gib=CEPH_SIZE_GIB)

    def volume_services(self):
        return cinder.volume_services(self)

    def bootstrap(self, what, *args, **kwargs):
        """``python -m thunder_stack.bootstrap WHAT`` in the virtualenv."""
        return svc.run([self.python, '-m', 'thunder_stack.bootstrap', what,
                        self._settings_file()] + list(args),
                       env={'PYTHONPATH': layout.CHECKOUT}, **kwargs).stdout

    def _settings_file(self):
        path = self.path('etc', 'bootstrap.json')
        settings = {
            'auth_url': self.auth_url, 'password': self.password,
            'glance_url': self.url('glance'),
            'cinder_url': self.url('cinder'),
            'volume_types': {name: name for name in layout.BACKENDS},
        }
        settings.update(nova_mod.settings(self))
        with open(path, 'w') as f:
            json.dump(settings, f)
        os.chmod(path, 0o600)
        return path
