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


"""MariaDB and RabbitMQ of the local stack: the database and the queue.

Both run from Debian's packages with their data under the stack directory,
on the stack's own ports on 127.0.0.1; every OpenStack service's database
is created here.
"""

import os

from thunder_stack import nova as nova_mod
from thunder_stack import services as svc

DATABASES = ('keystone', 'glance', 'cinder') + nova_mod.DATABASES


def mysql(stack):
    """Initialise MariaDB's data once, start it, create the databases."""
    datadir = stack.path('data', 'mysql')
    if not os.path.exists(os.path.join(datadir, 'mysql')):
        svc.log('creating the MariaDB data directory')
        svc.run(['mariadb-install-db', '--no-defaults',
                 '--datadir=%s' % datadir, '--user=root',
                 '--auth-root-authentication-method=normal',
                 '--skip-test-db'])
    stack.start('mysql', timeout=60)
    sql = ["ALTER USER 'root'@'localhost' IDENTIFIED BY '{pw}'",
           "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' "
           "IDENTIFIED BY '{pw}'",
           "ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY '{pw}'",
           "GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION"]
    for db in DATABASES:
        sql.append('CREATE DATABASE IF NOT EXISTS %s CHARACTER SET '
                   'utf8mb4' % db)
    statement = ';'.join(sql).format(pw=stack.password)
    base = ['mariadb', '--no-defaults',
            '--socket=%s' % stack.path('run', 'mysqld.sock'), '-uroot']
    result = svc.run(base + ['-p' + stack.password, '-e', statement],
                     check=False)
    if result.returncode:
        svc.run(base + ['-e', statement])


def rabbitmq(stack):
    """Write RabbitMQ's configuration; start epmd and RabbitMQ."""
    os.makedirs(stack.path('etc', 'rabbitmq'), exist_ok=True)
    os.makedirs(stack.path('data', 'rabbitmq'), exist_ok=True)
    with open(stack.path('etc', 'rabbitmq', 'rabbitmq.conf'), 'w') as f:
        f.write('listeners.tcp.default = 127.0.0.1:%d\n'
                'loopback_users.guest = true\n'
                'log.console = true\nlog.file = false\n'
                'disk_free_limit.absolute = 100MB\n'
                % stack.ports['amqp'])
    with open(stack.path('etc', 'rabbitmq', 'enabled_plugins'), 'w') as f:
        f.write('[].\n')
    stack.start('epmd', timeout=30)
    stack.start('rabbitmq', timeout=120)
