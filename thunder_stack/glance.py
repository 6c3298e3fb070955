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


"""Glance of the local stack: its stores, configured and started.

Stores: glance_store's ``rbd`` (upstream, the default) and ``cinder``
(images as Cinder volumes of the rbd type), and once the thunder store
exists, ``thunder`` (the default then; images located by their sealed
snapshot, the store's default) and ``thunder_uri`` (images located by
thunder:// URIs), written by the devstack plugin. Glance shows each image's
first location as ``direct_url`` and keeps the deprecated
``show_multiple_locations`` off, as devstack does: the tests of the
thunder:// aliases turn it on for their own time
(:func:`show_multiple_locations`).
"""

import os
import shutil

from thunder_stack import devstack
from thunder_stack import ini
from thunder_stack import layout
from thunder_stack import services as svc

RBD_BACKEND = layout.RBD_BACKEND
CINDER_STORE = layout.CINDER_STORE


def write_conf(stack):
    etc = stack.path('etc', 'glance')
    conf = os.path.join(etc, 'glance-api.conf')
    os.makedirs(etc, exist_ok=True)
    paste = os.path.join(etc, 'glance-api-paste.ini')
    shutil.copy(os.path.join(stack.venv, 'etc', 'glance',
                             'glance-api-paste.ini'), paste)
    data = stack.path('data', 'glance')
    for sub in ('staging', 'tasks', 'cache'):
        os.makedirs(os.path.join(data, sub), exist_ok=True)
    ini.write(conf, {
        'DEFAULT': {
            'enabled_backends': '%s:rbd,%s:cinder' % (RBD_BACKEND,
                                                      CINDER_STORE),
            'worker_self_reference_url': stack.url('glance'),
            'log_file': stack.path('log', 'glance-app.log'),
            'debug': True,
            'image_cache_dir': os.path.join(data, 'cache'),
            'show_image_direct_url': True,
        },
        'database': {'connection': stack.db_url('glance')},
        'keystone_authtoken': stack.authtoken('glance'),
        'paste_deploy': {'flavor': 'keystone', 'config_file': paste},
        'glance_store': {'default_backend': RBD_BACKEND},
        RBD_BACKEND: {
            'rbd_store_ceph_conf': stack.ceph_conf,
            'rbd_store_pool': layout.POOLS['images'],
            'rbd_store_user': 'admin',
            'store_description': "glance_store's RBD store (upstream)",
        },
        # glance_store's cinder store (images as Cinder volumes of the
        # rbd type): upstream's own take on what VMThunder does.
        CINDER_STORE: {
            'cinder_store_auth_address': stack.auth_url,
            'cinder_store_user_name': 'glance',
            'cinder_store_password': stack.password,
            'cinder_store_project_name': 'service',
            'cinder_store_user_domain_name': 'Default',
            'cinder_store_project_domain_name': 'Default',
            'cinder_catalog_info': 'volumev3::publicURL',
            'cinder_os_region_name': 'RegionOne',
            'cinder_volume_type': RBD_BACKEND,
            'rootwrap_config': stack.path('etc', 'glance', 'rootwrap.conf'),
            'store_description': "glance_store's cinder store "
                                 "(upstream)",
        },
        'os_glance_staging_store': {
            'filesystem_store_datadir': os.path.join(data, 'staging')},
        'os_glance_tasks_store': {
            'filesystem_store_datadir': os.path.join(data, 'tasks')},
        'oslo_concurrency': {'lock_path': os.path.join(data, 'locks')},
        # os-brick's privileged calls (the cinder store's connector
        # properties): the virtualenv's helper, we are root already.
        'privsep_osbrick': {'helper_command': os.path.join(
            stack.venv, 'bin', 'privsep-helper')},
    })
    ini.write(os.path.join(etc, 'uwsgi.ini'), {'uwsgi': svc.uwsgi_options(
        'glance.wsgi.api:application', stack.ports['glance'],
        processes=2, env='OS_GLANCE_CONFIG_DIR=%s' % etc)})
    # The import options, as devstack's configure_glance leaves them
    # (no plugin) before the plugin adds image_conversion.
    ini.write(os.path.join(etc, 'glance-image-import.conf'),
              {'image_import_opts': {'image_import_plugins': '[]'}})
    devstack.run(stack, 'configure_thunder_glance_import')
    available = devstack.thunder_store_available()
    if available:
        devstack.run(stack, 'configure_thunder_glance_store')
        devstack.run(stack, 'configure_thunder_glance_store', env={
            'THUNDER_GLANCE_STORE': layout.THUNDER_URI_STORE,
            'THUNDER_GLANCE_DEFAULT': 'False',
            'THUNDER_STORE_LOCATION_SCHEME': 'thunder'})
    stack.state['thunder_store'] = available
    stack.save_state()


def start(stack):
    conf = stack.path('etc', 'glance', 'glance-api.conf')
    svc.once(stack.path('data', 'glance-db-synced'),
             'creating the Glance database',
             [os.path.join(stack.venv, 'bin', 'glance-manage'),
              '--config-file', conf, 'db_sync'])
    stack.restart_if_config_changed(
        'glance-api', [conf, stack.path('etc', 'glance', 'uwsgi.ini'),
                       stack.path('etc', 'glance',
                                  'glance-image-import.conf')])
    stack.start('glance-api', timeout=120)


def show_multiple_locations(stack, shown):
    """Turn Glance's ``show_multiple_locations`` on or off, restarting it.

    The JSON-patch location calls (``glance location-add``) need it on;
    the next ``up`` writes the configuration anew, with it off.
    """
    conf = stack.path('etc', 'glance', 'glance-api.conf')
    ini.iniset(conf, 'DEFAULT', 'show_multiple_locations', str(shown))
    start(stack)
