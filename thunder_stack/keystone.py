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


"""Keystone of the local stack: configured, bootstrapped once, started.

Fernet tokens, the database on the stack's MariaDB, served by uWSGI; the
admin user, the service project and the services' users are made by
``thunder_stack.bootstrap keystone`` the first time.
"""

import os

from thunder_stack import ini
from thunder_stack import services as svc


def configure_and_start(stack):
    etc = stack.path('etc', 'keystone')
    conf = os.path.join(etc, 'keystone.conf')
    ini.write(conf, {
        'DEFAULT': {'log_file': stack.path('log', 'keystone-app.log')},
        'database': {'connection': stack.db_url('keystone')},
        'token': {'provider': 'fernet'},
        'fernet_tokens': {'key_repository': os.path.join(
            etc, 'fernet-keys')},
        'fernet_receipts': {'key_repository': os.path.join(
            etc, 'fernet-keys')},
        'credential': {'key_repository': os.path.join(
            etc, 'credential-keys')},
    })
    ini.write(os.path.join(etc, 'uwsgi.ini'), {'uwsgi': svc.uwsgi_options(
        'keystone.wsgi.api:application', stack.ports['keystone'],
        processes=2,
        env='OS_KEYSTONE_CONFIG_FILES=%s' % conf)})
    manage = [os.path.join(stack.venv, 'bin', 'keystone-manage'),
              '--config-file', conf]
    marker = stack.path('data', 'keystone-bootstrapped')
    if not os.path.exists(marker):
        svc.log('creating the Keystone database')
        svc.run(manage + ['db_sync'])
        for what in ('fernet_setup', 'credential_setup'):
            svc.run(manage + [what, '--keystone-user', 'root',
                              '--keystone-group', 'root'])
        svc.run(manage + ['bootstrap', '--bootstrap-password',
                          stack.password,
                          '--bootstrap-admin-url', stack.auth_url,
                          '--bootstrap-internal-url', stack.auth_url,
                          '--bootstrap-public-url', stack.auth_url,
                          '--bootstrap-region-id', 'RegionOne'])
    stack.restart_if_config_changed(
        'keystone', [conf, os.path.join(etc, 'uwsgi.ini')])
    stack.start('keystone', timeout=90)
    if not os.path.exists(marker):
        stack.bootstrap('keystone')
        with open(marker, 'w') as f:
            f.write('ok\n')
