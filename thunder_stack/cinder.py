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


"""Cinder of the local stack: three backends, configured and started.

``thunder`` (ThunderDriver, shared mode on RBD), ``thunder-peer`` (peer
mode over thunder-cache), both written by the devstack plugin, and ``rbd``
(Cinder's own RBDDriver, on another pool), with a volume type each. Up
once every volume service has a heartbeat and the scheduler knows every
backend.
"""

import json
import os
import shutil
import time

from thunder_stack import devstack
from thunder_stack import ini
from thunder_stack import layout
from thunder_stack import nova as nova_mod
from thunder_stack import services as svc

BACKENDS = layout.BACKENDS
RBD_BACKEND = layout.RBD_BACKEND


def write_conf(stack):
    conf = stack.path('etc', 'cinder', 'cinder.conf')
    paste = stack.path('etc', 'cinder', 'api-paste.ini')
    os.makedirs(os.path.dirname(conf), exist_ok=True)
    shutil.copy(os.path.join(stack.venv, 'etc', 'cinder',
                             'api-paste.ini'), paste)
    # Which list filters the API accepts (by name, status, ...): without
    # this file Cinder ignores every filter.
    filters = stack.path('etc', 'cinder', 'resource_filters.json')
    shutil.copy(os.path.join(stack.venv, 'etc', 'cinder',
                             'resource_filters.json'), filters)
    state = stack.path('data', 'cinder')
    os.makedirs(os.path.join(state, 'conversion'), exist_ok=True)
    helper = os.path.join(stack.venv, 'bin', 'privsep-helper')
    ini.write(conf, {
        'DEFAULT': {
            'host': 'thunder-stack',
            'my_ip': '127.0.0.1',
            'state_path': state,
            'api_paste_config': paste,
            'resource_query_filters_file': filters,
            'osapi_volume_listen': '127.0.0.1',
            'osapi_volume_listen_port': stack.ports['cinder'],
            'osapi_volume_workers': 2,
            'transport_url': stack.transport_url,
            'auth_strategy': 'keystone',
            'enabled_backends': ','.join(BACKENDS),
            'default_volume_type': layout.THUNDER_BACKEND,
            'image_conversion_dir': os.path.join(state, 'conversion'),
            # The zones of emulated compute nodes (thunder_stack.nodes)
            # come and go: the API must not keep a list an hour old.
            'az_cache_duration': 5,
            'rootwrap_config': stack.path('etc', 'cinder', 'rootwrap.conf'),
            'debug': True,
        },
        'database': {'connection': stack.db_url('cinder'),
                     'max_pool_size': 20, 'max_overflow': 40},
        'keystone_authtoken': stack.authtoken('cinder'),
        'oslo_concurrency': {'lock_path': os.path.join(state, 'locks')},
        'oslo_messaging_rabbit': {'heartbeat_timeout_threshold': 0},
        # How Cinder calls Nova (volume events).
        'nova': nova_mod.cinder_nova_section(stack),
        'cinder_sys_admin': {'helper_command': helper},
        'privsep_osbrick': {'helper_command': helper},
        RBD_BACKEND: {
            'volume_backend_name': RBD_BACKEND,
            'volume_driver': 'cinder.volume.drivers.rbd.RBDDriver',
            'rbd_ceph_conf': stack.ceph_conf,
            'rbd_pool': layout.POOLS['rbd'],
            'rbd_flatten_volume_from_snapshot': False,
            'rbd_max_clone_depth': 5,
            'image_volume_cache_enabled': False,
        },
    })
    devstack.run(stack,
                 'configure_thunder_cinder_backend %s'
                 % layout.THUNDER_BACKEND,
                 'configure_thunder_peer_backend %s' % layout.PEER_BACKEND,
                 'configure_thunder_cinder_glance')


def start(stack):
    """The database once, the API, scheduler and volume services, types."""
    conf = stack.path('etc', 'cinder', 'cinder.conf')
    svc.once(stack.path('data', 'cinder-db-synced'),
             'creating the Cinder database',
             [os.path.join(stack.venv, 'bin', 'cinder-manage'),
              '--config-file', conf, 'db', 'sync'])
    for name in ('cinder-api', 'cinder-scheduler', 'cinder-volume'):
        stack.restart_if_config_changed(name, [conf])
    stack.start('cinder-api', timeout=120)
    stack.start('cinder-scheduler', timeout=30)
    stack.start('cinder-volume', timeout=30)
    stack.bootstrap('volume-types')
    _wait_volume_services(stack)


def volume_services(stack):
    """Cinder's services (``openstack volume service list``), as dicts."""
    return json.loads(stack.bootstrap('services'))


def _wait_volume_services(stack, timeout=300):
    wanted = {'cinder-scheduler@thunder-stack'}
    wanted.update('cinder-volume@thunder-stack@%s' % name
                  for name in BACKENDS)
    deadline = time.monotonic() + timeout
    up = set()
    while time.monotonic() < deadline:
        for name in ('cinder-scheduler', 'cinder-volume'):
            service = stack.service(name)
            if service.pid() is None:
                raise svc.StackError('%s exited; see %s:\n%s' % (
                    name, service.log_file, svc.tail(service.log_file)))
        up = {'%s@%s' % (s['binary'], s['host'])
              for s in volume_services(stack)
              if s['state'] == 'up' and s['status'] == 'enabled'}
        # A service is up once it has a heartbeat, but the scheduler
        # places volumes only on backends whose capabilities it has
        # received; a report sent before the scheduler listened is
        # lost until the next periodic one.
        if wanted <= up and _scheduler_knows_backends(stack):
            return
        time.sleep(1)
    raise svc.StackError('Cinder services not up after %ds: %s up, %s '
                         'wanted; see %s' % (timeout, sorted(up),
                                             sorted(wanted),
                                             stack.path('log')))


def _scheduler_knows_backends(stack):
    pools = json.loads(stack.bootstrap('pools'))
    backends = {p.partition('#')[0].rpartition('@')[2] for p in pools}
    return set(BACKENDS) <= backends
