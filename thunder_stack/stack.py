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

``tools/thunder-stack up|demo|status|down`` runs this module. ``up``
installs what is missing (Debian packages with apt-get, the services into a
virtualenv with pip) and starts, each as a process of its own stopped by
PID: MariaDB, RabbitMQ, a single-node Ceph (BlueStore, so data survives a
restart), Keystone and Glance under uWSGI, Cinder's API, scheduler and
volume services, and the node cache daemon ``thunder-cache`` (its peer
server on 127.0.0.1, its volume files mounted under ``data/``). Cinder has
three backends, ``thunder`` (ThunderDriver), ``thunder-peer``
(PeerDriver, over thunder-cache) and ``rbd`` (Cinder's
RBDDriver, on another pool) with a volume type each;
Glance has the upstream ``rbd`` store and, once the thunder store exists,
the ``thunder`` store. The VMThunder parts of cinder.conf and
glance-api.conf are written by ``devstack/lib/thunder``, the devstack
plugin's own functions, sourced with a small iniset shim.

Everything (virtualenv, configuration, data, logs, PID files) lives in one
directory: ``.stack/`` in the checkout, or ``$THUNDER_STACK_DIR``.
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

from thunder_cache.control import client as control
from thunder_common import loops
from thunder_stack import ceph as ceph_mod
from thunder_stack import ini
from thunder_stack import nova as nova_mod
from thunder_stack import services as svc

CHECKOUT = svc.CHECKOUT

APT_PACKAGES = ('mariadb-server', 'rabbitmq-server', 'ceph-mon', 'ceph-osd',
                'ceph-mgr', 'ceph-common', 'python3-rados', 'python3-rbd',
                'qemu-utils', 'fuse3') + nova_mod.APT_PACKAGES
PIP_PACKAGES = ('cinder==29.0.0', 'glance==33.0.0', 'keystone==30.0.0',
                'glance-store>=5.7,<6', 'os-brick>=7.1', 'python-cinderclient',
                'python-glanceclient', 'python-openstackclient', 'uwsgi',
                'PyMySQL', 'mfusepy>=3.1',
                # the benchmarks' plots (demo --bulk-boot, --nova ...)
                'matplotlib') + nova_mod.PIP_PACKAGES
DEFAULT_PORTS = {'mysql': 16306, 'epmd': 16369, 'amqp': 16672,
                 'rabbit_dist': 16673, 'ceph': 16789, 'keystone': 16500,
                 'glance': 16292, 'cinder': 16776, 'thunder_cache': 16485,
                 **nova_mod.PORTS}
POOLS = {'thunder': 'thunder', 'rbd': 'volumes', 'images': 'images',
         'nova': nova_mod.EPHEMERAL_POOL}
THUNDER_BACKEND = 'thunder'
PEER_BACKEND = 'thunder-peer'
# A second thunder Glance store, whose images are located by their sealed
# snapshot (thunder_store_location_scheme = rbd): Nova's and Cinder's RBD
# code clone them with no location added by hand.
RBD_LOCATION_STORE = 'thunder_rbd'
RBD_BACKEND = 'rbd'
BACKENDS = (THUNDER_BACKEND, PEER_BACKEND, RBD_BACKEND)
CINDER_STORE = 'cinder'
CEPH_SIZE_GIB = int(os.environ.get('THUNDER_STACK_CEPH_GIB', '40'))


log = svc.log
StackError = svc.StackError
run = svc.run


def stack_dir():
    return os.path.abspath(os.environ.get('THUNDER_STACK_DIR') or
                           os.path.join(CHECKOUT, '.stack'))


class Stack:

    def __init__(self, root=None):
        self.root = root or stack_dir()
        self.venv = os.path.join(self.root, 'venv')
        self.python = os.path.join(self.venv, 'bin', 'python')
        self.etc = os.path.join(self.root, 'etc')
        self.data = os.path.join(self.root, 'data')
        self.state_file = os.path.join(self.root, 'state.json')
        self.state = self._load_state()

    # -- state ------------------------------------------------------------

    def _load_state(self):
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _save_state(self):
        os.makedirs(self.root, exist_ok=True)
        tmp = self.state_file + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.state, f, indent=2, sort_keys=True)
        os.replace(tmp, self.state_file)

    def _init_state(self):
        """Ports and password, chosen once and then kept."""
        changed = False
        if 'password' not in self.state:
            self.state['password'] = 'thunder-' + secrets.token_hex(6)
            changed = True
        ports = self.state.setdefault('ports', {})
        taken = set()
        for name, preferred in DEFAULT_PORTS.items():
            env = os.environ.get('THUNDER_STACK_PORT_%s' % name.upper())
            if env:
                ports[name] = int(env)
                changed = True
            if name not in ports:
                port = svc.free_port(preferred)
                while port in taken:
                    port = svc.free_port()
                ports[name] = port
                changed = True
            taken.add(ports[name])
        if changed:
            self._save_state()

    @property
    def ports(self):
        return self.state['ports']

    @property
    def password(self):
        return self.state['password']

    def url(self, name):
        return 'http://127.0.0.1:%d' % self.ports[name]

    @property
    def auth_url(self):
        return self.url('keystone') + '/v3'

    def db_url(self, name):
        return 'mysql+pymysql://root:%s@127.0.0.1:%d/%s?charset=utf8' % (
            self.password, self.ports['mysql'], name)

    @property
    def transport_url(self):
        return 'rabbit://guest:guest@127.0.0.1:%d/' % self.ports['amqp']

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    # -- installation -----------------------------------------------------

    def install(self):
        self._install_apt()
        self._install_venv()

    def _install_apt(self):
        missing = [p for p in APT_PACKAGES if not _dpkg_installed(p)]
        if not missing:
            return
        log('installing Debian packages: %s' % ' '.join(missing))
        sudo = [] if os.geteuid() == 0 else ['sudo']
        run(sudo + ['apt-get', 'update', '-qq'])
        # policy-rc.d: do not let the packages start system-wide daemons;
        # the stack runs its own MariaDB and RabbitMQ.
        policy = '/usr/sbin/policy-rc.d'
        made_policy = False
        if not os.path.exists(policy) and os.geteuid() == 0:
            with open(policy, 'w') as f:
                f.write('#!/bin/sh\nexit 101\n')
            os.chmod(policy, 0o755)
            made_policy = True
        try:
            run(sudo + ['apt-get', 'install', '-y', '-qq',
                        '--no-install-recommends'] + missing,
                env={'DEBIAN_FRONTEND': 'noninteractive'}, timeout=1800)
        finally:
            if made_policy:
                os.unlink(policy)

    def _install_venv(self):
        marker = self.path('venv', '.thunder-installed')
        wanted = json.dumps({'pip': PIP_PACKAGES,
                             'setup.cfg': _read(os.path.join(
                                 CHECKOUT, 'setup.cfg'))})
        if _read(marker) == wanted and os.path.exists(self.python):
            return
        if not os.path.exists(self.python):
            base = os.environ.get('THUNDER_STACK_PYTHON') or shutil.which(
                'python3.11') or sys.executable
            log('creating the virtualenv %s with %s' % (self.venv, base))
            run([base, '-m', 'venv', self.venv])
        pip = [self.python, '-m', 'pip', 'install', '-q']
        log('installing OpenStack services into %s (pip, a few minutes '
            'the first time)' % self.venv)
        run(pip + list(PIP_PACKAGES), timeout=3600)
        run(pip + ['--no-deps', '-e', CHECKOUT], timeout=600)
        run([os.path.join(CHECKOUT, 'tools', 'link-ceph-bindings'),
             self.python])
        with open(marker, 'w') as f:
            f.write(wanted)

    # -- services ---------------------------------------------------------

    def services(self):
        """Every long-running process, in start order (Ceph apart)."""
        p = self.ports
        bin_ = os.path.join(self.venv, 'bin')
        rabbit_env = {
            'RABBITMQ_NODENAME': 'thunder@localhost',
            'RABBITMQ_NODE_IP_ADDRESS': '127.0.0.1',
            'RABBITMQ_NODE_PORT': str(p['amqp']),
            'RABBITMQ_DIST_PORT': str(p['rabbit_dist']),
            'RABBITMQ_MNESIA_BASE': self.path('data', 'rabbitmq', 'mnesia'),
            'RABBITMQ_LOG_BASE': self.path('log', 'rabbitmq'),
            'RABBITMQ_CONFIG_FILE': self.path('etc', 'rabbitmq',
                                              'rabbitmq'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': self.path(
                'etc', 'rabbitmq', 'enabled_plugins'),
            'RABBITMQ_PID_FILE': self.path('run', 'rabbitmq-beam.pid'),
            'ERL_EPMD_PORT': str(p['epmd']),
            'ERL_EPMD_ADDRESS': '127.0.0.1',
            'HOME': self.path('data', 'rabbitmq'),
        }
        return [
            svc.Service(
                'mysql',
                ['/usr/sbin/mariadbd', '--no-defaults',
                 '--datadir=%s' % self.path('data', 'mysql'),
                 '--socket=%s' % self.path('run', 'mysqld.sock'),
                 '--port=%d' % p['mysql'], '--bind-address=127.0.0.1',
                 '--user=root', '--skip-name-resolve',
                 '--pid-file=%s' % self.path('run', 'mysqld-own.pid'),
                 '--innodb-buffer-pool-size=256M',
                 '--innodb-flush-log-at-trx-commit=2',
                 '--max-connections=2000',
                 '--log-error=%s' % self.path('log', 'mysqld-error.log')],
                self.root, port=p['mysql']),
            svc.Service('epmd', ['epmd', '-address', '127.0.0.1', '-port',
                                 str(p['epmd'])], self.root,
                        port=p['epmd'], marker='epmd'),
            svc.Service('rabbitmq', [_rabbitmq_server()], self.root,
                        port=p['amqp'], env=rabbit_env,
                        marker='rabbitmq'),
            svc.Service(
                'keystone',
                [os.path.join(bin_, 'uwsgi'), '--ini',
                 self.path('etc', 'keystone', 'uwsgi.ini')],
                self.root, port=p['keystone'],
                health=lambda: svc.http_reason(self.auth_url)),
            svc.Service(
                'glance-api',
                [os.path.join(bin_, 'uwsgi'), '--ini',
                 self.path('etc', 'glance', 'uwsgi.ini')],
                self.root, port=p['glance'],
                health=lambda: svc.http_reason(self.url('glance') +
                                               '/versions')),
            svc.Service(
                'thunder-cache',
                [os.path.join(bin_, 'thunder-cache'), '--config-file',
                 self.thunder_cache_conf, '--log-file',
                 self.path('log', 'thunder-cache.log')],
                self.root, port=p['thunder_cache'],
                health=self._thunder_cache_reason),
            svc.Service(
                'cinder-api',
                [os.path.join(bin_, 'cinder-api'), '--config-file',
                 self.path('etc', 'cinder', 'cinder.conf'),
                 '--log-file', self.path('log', 'cinder-api.log')],
                self.root, port=p['cinder'],
                health=lambda: svc.http_reason(self.url('cinder') + '/')),
            svc.Service(
                'cinder-scheduler',
                [os.path.join(bin_, 'cinder-scheduler'), '--config-file',
                 self.path('etc', 'cinder', 'cinder.conf'),
                 '--log-file', self.path('log', 'cinder-scheduler.log')],
                self.root),
            svc.Service(
                'cinder-volume',
                [os.path.join(bin_, 'cinder-volume'), '--config-file',
                 self.path('etc', 'cinder', 'cinder.conf'),
                 '--log-file', self.path('log', 'cinder-volume.log')],
                self.root),
        ] + nova_mod.services(self)

    @property
    def thunder_cache_conf(self):
        return self.path('etc', 'thunder', 'thunder-cache.conf')

    @property
    def thunder_cache_paths(self):
        base = self.path('data', 'thunder-cache')
        return {'state': base, 'run': self.path('run', 'thunder-cache'),
                'mount': os.path.join(base, 'volumes'),
                # devstack's configure_thunder_cache puts them there.
                'layers': os.path.join(base, 'layers'),
                'control': self.path('run', 'thunder-cache', 'control.sock')}

    def _thunder_cache_reason(self):
        """None once the daemon serves volume files and answers."""
        paths = self.thunder_cache_paths
        if not os.path.ismount(paths['mount']):
            return '%s is not mounted' % paths['mount']
        return self._thunder_cache_ping(paths['control'])

    @staticmethod
    def _thunder_cache_ping(control_socket):
        """None if the daemon of ``control_socket`` answers, else why."""
        try:
            control.ControlClient(control_socket, timeout=5).call('ping')
        except control.ControlError as e:
            return str(e)
        return None

    def service(self, name):
        for s in self.services():
            if s.name == name:
                return s
        raise KeyError(name)

    def ceph(self):
        return ceph_mod.LocalCeph(
            self.path('data', 'ceph'), pools=tuple(POOLS.values()),
            port=self.ports['ceph'], objectstore='bluestore',
            size_gib=CEPH_SIZE_GIB)

    @property
    def ceph_conf(self):
        return self.path('data', 'ceph', 'ceph.conf')

    # -- up ---------------------------------------------------------------

    def up(self):
        started = time.monotonic()
        for sub in ('etc', 'log', 'run', 'data'):
            os.makedirs(self.path(sub), exist_ok=True)
        self.install()
        self._init_state()
        self._mysql()
        self._rabbitmq()
        log('starting Ceph (BlueStore in %s)' % self.path('data', 'ceph'))
        self.ceph().start(timeout=300)
        self._keystone()
        self._thunder_cache()
        self._write_cinder_conf()
        self._write_glance_conf()
        # Cinder first: Glance's cinder store looks its volume type up in
        # Cinder when it starts.
        self._cinder()
        self._glance()
        nova_mod.up(self)
        self._write_openrc()
        log('stack up in %.0f s; credentials in %s'
            % (time.monotonic() - started, self.path('openrc')))

    def _start(self, name, timeout=120):
        service = self.service(name)
        if service.pid() is None:
            log('starting %s' % name)
        service.start()
        service.wait_healthy(timeout)
        return service

    def _mysql(self):
        datadir = self.path('data', 'mysql')
        if not os.path.exists(os.path.join(datadir, 'mysql')):
            log('creating the MariaDB data directory')
            run(['mariadb-install-db', '--no-defaults',
                 '--datadir=%s' % datadir, '--user=root',
                 '--auth-root-authentication-method=normal',
                 '--skip-test-db'])
        self._start('mysql', timeout=60)
        sql = ["ALTER USER 'root'@'localhost' IDENTIFIED BY '{pw}'",
               "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' "
               "IDENTIFIED BY '{pw}'",
               "ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY '{pw}'",
               "GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION"]
        for db in ('keystone', 'glance', 'cinder') + nova_mod.DATABASES:
            sql.append('CREATE DATABASE IF NOT EXISTS %s CHARACTER SET '
                       'utf8mb4' % db)
        statement = ';'.join(sql).format(pw=self.password)
        base = ['mariadb', '--no-defaults',
                '--socket=%s' % self.path('run', 'mysqld.sock'), '-uroot']
        result = run(base + ['-p' + self.password, '-e', statement],
                     check=False)
        if result.returncode:
            run(base + ['-e', statement])

    def _rabbitmq(self):
        os.makedirs(self.path('etc', 'rabbitmq'), exist_ok=True)
        os.makedirs(self.path('data', 'rabbitmq'), exist_ok=True)
        with open(self.path('etc', 'rabbitmq', 'rabbitmq.conf'), 'w') as f:
            f.write('listeners.tcp.default = 127.0.0.1:%d\n'
                    'loopback_users.guest = true\n'
                    'log.console = true\nlog.file = false\n'
                    'disk_free_limit.absolute = 100MB\n'
                    % self.ports['amqp'])
        with open(self.path('etc', 'rabbitmq', 'enabled_plugins'), 'w') as f:
            f.write('[].\n')
        self._start('epmd', timeout=30)
        self._start('rabbitmq', timeout=120)

    # -- Keystone ---------------------------------------------------------

    def _keystone(self):
        etc = self.path('etc', 'keystone')
        conf = os.path.join(etc, 'keystone.conf')
        ini.write(conf, {
            'DEFAULT': {'log_file': self.path('log', 'keystone-app.log')},
            'database': {'connection': self.db_url('keystone')},
            'token': {'provider': 'fernet'},
            'fernet_tokens': {'key_repository': os.path.join(
                etc, 'fernet-keys')},
            'fernet_receipts': {'key_repository': os.path.join(
                etc, 'fernet-keys')},
            'credential': {'key_repository': os.path.join(
                etc, 'credential-keys')},
        })
        ini.write(os.path.join(etc, 'uwsgi.ini'), {'uwsgi': svc.uwsgi_options(
            'keystone.wsgi.api:application', self.ports['keystone'],
            processes=2,
            env='OS_KEYSTONE_CONFIG_FILES=%s' % conf)})
        manage = [os.path.join(self.venv, 'bin', 'keystone-manage'),
                  '--config-file', conf]
        marker = self.path('data', 'keystone-bootstrapped')
        if not os.path.exists(marker):
            log('creating the Keystone database')
            run(manage + ['db_sync'])
            for what in ('fernet_setup', 'credential_setup'):
                run(manage + [what, '--keystone-user', 'root',
                              '--keystone-group', 'root'])
            run(manage + ['bootstrap', '--bootstrap-password',
                          self.password,
                          '--bootstrap-admin-url', self.auth_url,
                          '--bootstrap-internal-url', self.auth_url,
                          '--bootstrap-public-url', self.auth_url,
                          '--bootstrap-region-id', 'RegionOne'])
        self._restart_if_config_changed(
            'keystone', [conf, os.path.join(etc, 'uwsgi.ini')])
        self._start('keystone', timeout=90)
        if not os.path.exists(marker):
            self._bootstrap('keystone')
            with open(marker, 'w') as f:
                f.write('ok\n')

    def _settings_file(self):
        path = self.path('etc', 'bootstrap.json')
        settings = {
            'auth_url': self.auth_url, 'password': self.password,
            'glance_url': self.url('glance'),
            'cinder_url': self.url('cinder'),
            'volume_types': {name: name for name in BACKENDS},
        }
        settings.update(nova_mod.settings(self))
        with open(path, 'w') as f:
            json.dump(settings, f)
        os.chmod(path, 0o600)
        return path

    def _bootstrap(self, what, *args, **kwargs):
        return run([self.python, '-m', 'thunder_stack.bootstrap', what,
                    self._settings_file()] + list(args), **kwargs).stdout

    # -- configuration through the devstack plugin -------------------------

    def _devstack(self, *functions, env=None):
        """Source devstack/settings and lib/thunder; call ``functions``."""
        script = ['set -euo pipefail',
                  'source thunder_stack/devstack-shim.sh',
                  'source devstack/settings',
                  'source devstack/lib/thunder']
        script.extend(functions)
        full_env = {
            'THUNDER_PYTHON': sys.executable,
            'PYTHONPATH': CHECKOUT,
            'THUNDER_DIR': CHECKOUT,
            'CINDER_CONF': self.path('etc', 'cinder', 'cinder.conf'),
            'GLANCE_API_CONF': self.path('etc', 'glance', 'glance-api.conf'),
            'GLANCE_IMAGE_IMPORT_CONF': self.path('etc', 'glance',
                                                  'glance-image-import.conf'),
            'THUNDER_GLANCE_PYTHON': self.python,
            'THUNDER_CEPH_CONF': self.ceph_conf,
            'THUNDER_RBD_POOL': POOLS['thunder'],
            # The local Ceph runs without cephx: no user, no secret.
            'THUNDER_RBD_USER': '',
            'THUNDER_RBD_SECRET_UUID': '',
            'THUNDER_CINDER_BACKEND': THUNDER_BACKEND,
            'THUNDER_PEER_BACKEND': PEER_BACKEND,
            'THUNDER_CACHE_CONTROL_SOCKET': self.thunder_cache_paths[
                'control'],
            'THUNDER_GLANCE_URL': self.url('glance'),
            'THUNDER_STORE_AUTH_ADDRESS': self.auth_url,
            'THUNDER_STORE_PASSWORD': self.password,
            'THUNDER_CINDER_GLANCE_PASSWORD': self.password,
            'GLANCE_ENABLE_MULTIPLE_STORES': 'True',
            'THUNDER_GLANCE_DEFAULT': 'True',
        }
        full_env.update(env or {})
        run(['bash', '-c', '\n'.join(script)], env=full_env)

    def thunder_store_available(self):
        if os.environ.get('THUNDER_STACK_THUNDER_STORE', '1') == '0':
            return False
        # The store's module and its entry point (glance_store loads stores
        # by entry point; setup.cfg declares it).
        return (os.path.exists(os.path.join(CHECKOUT, 'glance_thunder_store',
                                            'store.py')) and
                'glance_thunder_store.store:Store' in (
                    _read(os.path.join(CHECKOUT, 'setup.cfg')) or ''))

    def _write_cinder_conf(self):
        conf = self.path('etc', 'cinder', 'cinder.conf')
        paste = self.path('etc', 'cinder', 'api-paste.ini')
        os.makedirs(os.path.dirname(conf), exist_ok=True)
        shutil.copy(os.path.join(self.venv, 'etc', 'cinder',
                                 'api-paste.ini'), paste)
        # Which list filters the API accepts (by name, status, ...): without
        # this file Cinder ignores every filter.
        filters = self.path('etc', 'cinder', 'resource_filters.json')
        shutil.copy(os.path.join(self.venv, 'etc', 'cinder',
                                 'resource_filters.json'), filters)
        state = self.path('data', 'cinder')
        os.makedirs(os.path.join(state, 'conversion'), exist_ok=True)
        ini.write(conf, {
            'DEFAULT': {
                'host': 'thunder-stack',
                'my_ip': '127.0.0.1',
                'state_path': state,
                'api_paste_config': paste,
                'resource_query_filters_file': filters,
                'osapi_volume_listen': '127.0.0.1',
                'osapi_volume_listen_port': self.ports['cinder'],
                'osapi_volume_workers': 2,
                'transport_url': self.transport_url,
                'auth_strategy': 'keystone',
                'enabled_backends': ','.join(BACKENDS),
                'default_volume_type': THUNDER_BACKEND,
                'image_conversion_dir': os.path.join(state, 'conversion'),
                # The zones of emulated compute nodes (thunder_stack.nodes)
                # come and go: the API must not keep a list an hour old.
                'az_cache_duration': 5,
                'rootwrap_config': self.path('etc', 'cinder',
                                             'rootwrap.conf'),
                'debug': True,
            },
            'database': {'connection': self.db_url('cinder'),
                         'max_pool_size': 20, 'max_overflow': 40},
            'keystone_authtoken': self._authtoken('cinder'),
            'oslo_concurrency': {'lock_path': os.path.join(state, 'locks')},
            'oslo_messaging_rabbit': {'heartbeat_timeout_threshold': 0},
            # How Cinder calls Nova (volume events).
            'nova': nova_mod.cinder_nova_section(self),
            'cinder_sys_admin': {'helper_command': os.path.join(
                self.venv, 'bin', 'privsep-helper')},
            'privsep_osbrick': {'helper_command': os.path.join(
                self.venv, 'bin', 'privsep-helper')},
            RBD_BACKEND: {
                'volume_backend_name': RBD_BACKEND,
                'volume_driver': 'cinder.volume.drivers.rbd.RBDDriver',
                'rbd_ceph_conf': self.ceph_conf,
                'rbd_pool': POOLS['rbd'],
                'rbd_flatten_volume_from_snapshot': False,
                'rbd_max_clone_depth': 5,
                'image_volume_cache_enabled': False,
            },
        })
        self._devstack('configure_thunder_cinder_backend %s'
                       % THUNDER_BACKEND,
                       'configure_thunder_peer_backend %s' % PEER_BACKEND,
                       'configure_thunder_cinder_glance')

    def _thunder_cache(self):
        """Write thunder-cache.conf (devstack's function) and start it."""
        # Peers (none but itself here) on loopback: allowed explicitly.
        self._devstack('configure_thunder_cache', env=self.thunder_cache_env(
            self.thunder_cache_conf, self.thunder_cache_paths,
            'thunder-stack', '127.0.0.1', self.ports['thunder_cache'],
            '127.0.0.0/8'))
        self._restart_if_config_changed('thunder-cache',
                                        [self.thunder_cache_conf])
        self._start('thunder-cache', timeout=60)

    def thunder_cache_env(self, conf, paths, node_id, listen, port,
                          networks):
        """devstack's variables for configure_thunder_cache (one node)."""
        return {
            'THUNDER_CACHE_CONF': conf,
            # One secret for the deployment: every node's is this file.
            'THUNDER_CACHE_SECRET_FILE': self.path('etc', 'thunder',
                                                   'peer-secret'),
            'THUNDER_CACHE_STATE_DIR': paths['state'],
            'THUNDER_CACHE_RUN_DIR': paths['run'],
            'THUNDER_CACHE_CONTROL_SOCKET': paths['control'],
            'THUNDER_CACHE_NODE_ID': node_id,
            'THUNDER_CACHE_LISTEN': listen,
            'THUNDER_CACHE_PEER_NETWORKS': networks,
            'THUNDER_CACHE_PORT': str(port),
            # Short, so that the e2e tests see a trace published.
            'THUNDER_CACHE_RECORD_WINDOW': '10',
        }

    def _authtoken(self, user):
        return {'www_authenticate_uri': self.auth_url,
                'auth_url': self.auth_url, 'auth_type': 'password',
                'username': user, 'password': self.password,
                'project_name': 'service', 'user_domain_name': 'Default',
                'project_domain_name': 'Default',
                'service_token_roles_required': True}

    def _write_glance_conf(self):
        etc = self.path('etc', 'glance')
        conf = os.path.join(etc, 'glance-api.conf')
        os.makedirs(etc, exist_ok=True)
        paste = os.path.join(etc, 'glance-api-paste.ini')
        shutil.copy(os.path.join(self.venv, 'etc', 'glance',
                                 'glance-api-paste.ini'), paste)
        data = self.path('data', 'glance')
        for sub in ('staging', 'tasks', 'cache'):
            os.makedirs(os.path.join(data, sub), exist_ok=True)
        ini.write(conf, {
            'DEFAULT': {
                'enabled_backends': '%s:rbd,%s:cinder' % (RBD_BACKEND,
                                                          CINDER_STORE),
                'worker_self_reference_url': self.url('glance'),
                'log_file': self.path('log', 'glance-app.log'),
                'debug': True,
                'image_cache_dir': os.path.join(data, 'cache'),
                'show_image_direct_url': True,
            },
            'database': {'connection': self.db_url('glance')},
            'keystone_authtoken': self._authtoken('glance'),
            'paste_deploy': {'flavor': 'keystone', 'config_file': paste},
            'glance_store': {'default_backend': RBD_BACKEND},
            RBD_BACKEND: {
                'rbd_store_ceph_conf': self.ceph_conf,
                'rbd_store_pool': POOLS['images'],
                'rbd_store_user': 'admin',
                'store_description': "glance_store's RBD store (upstream)",
            },
            # glance_store's cinder store (images as Cinder volumes of the
            # rbd type): upstream's own take on what VMThunder does.
            CINDER_STORE: {
                'cinder_store_auth_address': self.auth_url,
                'cinder_store_user_name': 'glance',
                'cinder_store_password': self.password,
                'cinder_store_project_name': 'service',
                'cinder_store_user_domain_name': 'Default',
                'cinder_store_project_domain_name': 'Default',
                'cinder_catalog_info': 'volumev3::publicURL',
                'cinder_os_region_name': 'RegionOne',
                'cinder_volume_type': RBD_BACKEND,
                'rootwrap_config': self.path('etc', 'glance',
                                             'rootwrap.conf'),
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
                self.venv, 'bin', 'privsep-helper')},
        })
        ini.write(os.path.join(etc, 'uwsgi.ini'), {'uwsgi': svc.uwsgi_options(
            'glance.wsgi.api:application', self.ports['glance'],
            processes=2, env='OS_GLANCE_CONFIG_DIR=%s' % etc)})
        # The import options, as devstack's configure_glance leaves them
        # (no plugin) before the plugin adds image_conversion.
        ini.write(os.path.join(etc, 'glance-image-import.conf'),
                  {'image_import_opts': {'image_import_plugins': '[]'}})
        self._devstack('configure_thunder_glance_import')
        if self.thunder_store_available():
            self._devstack('configure_thunder_glance_store')
            self._devstack('configure_thunder_glance_store', env={
                'THUNDER_GLANCE_STORE': RBD_LOCATION_STORE,
                'THUNDER_GLANCE_DEFAULT': 'False',
                'THUNDER_STORE_LOCATION_SCHEME': 'rbd'})
        self.state['thunder_store'] = self.thunder_store_available()
        self._save_state()

    # -- Glance and Cinder ------------------------------------------------

    def _glance(self):
        conf = self.path('etc', 'glance', 'glance-api.conf')
        marker = self.path('data', 'glance-db-synced')
        if not os.path.exists(marker):
            log('creating the Glance database')
            run([os.path.join(self.venv, 'bin', 'glance-manage'),
                 '--config-file', conf, 'db_sync'])
            with open(marker, 'w') as f:
                f.write('ok\n')
        self._restart_if_config_changed(
            'glance-api', [conf, self.path('etc', 'glance', 'uwsgi.ini'),
                           self.path('etc', 'glance',
                                     'glance-image-import.conf')])
        self._start('glance-api', timeout=120)

    def _cinder(self):
        conf = self.path('etc', 'cinder', 'cinder.conf')
        marker = self.path('data', 'cinder-db-synced')
        if not os.path.exists(marker):
            log('creating the Cinder database')
            run([os.path.join(self.venv, 'bin', 'cinder-manage'),
                 '--config-file', conf, 'db', 'sync'])
            with open(marker, 'w') as f:
                f.write('ok\n')
        for name in ('cinder-api', 'cinder-scheduler', 'cinder-volume'):
            self._restart_if_config_changed(name, [conf])
        self._start('cinder-api', timeout=120)
        self._start('cinder-scheduler', timeout=30)
        self._start('cinder-volume', timeout=30)
        self._bootstrap('volume-types')
        self._wait_volume_services()

    def _restart_if_config_changed(self, name, files):
        """Stop a running service whose configuration changed since start."""
        digest = json.dumps([_read(f) for f in files])
        key = 'config:%s' % name
        service = self.service(name)
        if service.pid() is not None and self.state.get(key) != digest:
            log('configuration of %s changed: restarting it' % name)
            service.stop()
        self.state[key] = digest
        self._save_state()

    def _wait_volume_services(self, timeout=300):
        wanted = {'cinder-scheduler@thunder-stack'}
        wanted.update('cinder-volume@thunder-stack@%s' % name
                      for name in BACKENDS)
        deadline = time.monotonic() + timeout
        up = set()
        while time.monotonic() < deadline:
            for name in ('cinder-scheduler', 'cinder-volume'):
                service = self.service(name)
                if service.pid() is None:
                    raise StackError('%s exited; see %s:\n%s' % (
                        name, service.log_file, svc.tail(service.log_file)))
            up = {'%s@%s' % (s['binary'], s['host'])
                  for s in self.volume_services()
                  if s['state'] == 'up' and s['status'] == 'enabled'}
            # A service is up once it has a heartbeat, but the scheduler
            # places volumes only on backends whose capabilities it has
            # received; a report sent before the scheduler listened is
            # lost until the next periodic one.
            if wanted <= up and self._scheduler_knows_backends():
                return
            time.sleep(1)
        raise StackError('Cinder services not up after %ds: %s up, %s '
                         'wanted; see %s' % (timeout, sorted(up),
                                             sorted(wanted),
                                             self.path('log')))

    def _scheduler_knows_backends(self):
        pools = json.loads(self._bootstrap('pools'))
        backends = {p.partition('#')[0].rpartition('@')[2] for p in pools}
        return set(BACKENDS) <= backends

    def volume_services(self):
        return json.loads(self._bootstrap('services'))

    def openrc_env(self):
        return {'OS_AUTH_URL': self.auth_url, 'OS_USERNAME': 'admin',
                'OS_PASSWORD': self.password, 'OS_PROJECT_NAME': 'admin',
                'OS_USER_DOMAIN_ID': 'default',
                'OS_PROJECT_DOMAIN_ID': 'default',
                'OS_IDENTITY_API_VERSION': '3',
                'OS_REGION_NAME': 'RegionOne',
                'OS_VOLUME_API_VERSION': '3.50',
                'OS_IMAGE_API_VERSION': '2'}

    def _write_openrc(self):
        lines = ['# Source me: admin credentials of the local stack.']
        for key, value in sorted(self.openrc_env().items()):
            lines.append('export %s=%s' % (key, value))
        lines.append('export PATH=%s:$PATH' % os.path.join(self.venv, 'bin'))
        lines.append('export CEPH_CONF=%s' % self.ceph_conf)
        with open(self.path('openrc'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        os.chmod(self.path('openrc'), 0o600)

    # -- down and status --------------------------------------------------

    def down(self):
        if 'ports' not in self.state:
            log('no stack in %s' % self.root)
            return
        if self.state.get('nodes'):
            from thunder_stack import nodes as nodes_mod
            nodes_mod.Nodes(self).down()
        for service in reversed(self.services()):
            if service.pid() is not None:
                log('stopping %s (pid %d)' % (service.name, service.pid()))
            if service.name == 'thunder-cache':
                self._detach_loop_devices()
            nova_mod.before_stop(self, service)
            service.stop()
        if 'ports' in self.state:
            cluster = self.ceph()
            if cluster.running():
                log('stopping Ceph')
            cluster.stop()

    def _detach_loop_devices(self):
        """Loop devices left on volume files (a test that failed)."""
        mount = self.thunder_cache_paths['mount']
        out = run(list(loops.LIST_COMMAND), check=False, quiet=True).stdout
        for name in loops.backed_by(out, under=mount):
            log('detaching %s (a volume file of %s)' % (name, mount))
            run(['losetup', '--detach', name], check=False, quiet=True)

    def status(self):
        rows = []
        if not self.state:
            return rows
        for service in self.services():
            rows.append(service.status())
        cluster = self.ceph()
        running = cluster.running()
        row = {'name': 'ceph', 'pid': None, 'port': self.ports['ceph'],
               'state': 'stopped', 'log': cluster._path('log')}
        if running:
            pid = cluster._pid(running[0])
            row['pid'] = pid
            row['state'] = 'partial (%s)' % ','.join(running)
            if len(running) == len(ceph_mod.DAEMONS):
                try:
                    health = cluster.ceph_json('health', timeout=10)
                    row['state'] = 'ok' if health.get('status') in (
                        'HEALTH_OK', 'HEALTH_WARN') else 'unhealthy'
                    row['reason'] = health.get('status')
                except ceph_mod.CephError as e:
                    row['state'] = 'unhealthy'
                    row['reason'] = str(e)[:80]
        rows.insert(3, row)
        if self.service('cinder-api').pid():
            try:
                for s in self.volume_services():
                    if s['binary'] == 'cinder-volume':
                        rows.append({'name': '  %s' % s['host'],
                                     'pid': None, 'port': None,
                                     'state': 'ok' if s['state'] == 'up'
                                     else s['state']})
            except StackError:
                pass
        rows.extend(nova_mod.status_rows(self))
        if self.state.get('nodes'):
            from thunder_stack import nodes as nodes_mod
            rows.extend(nodes_mod.Nodes(self).status())
        return rows

    def is_up(self):
        rows = self.status()
        return bool(rows) and all(r['state'] == 'ok' for r in rows)


def _rabbitmq_server():
    base = '/usr/lib/rabbitmq/lib'
    if os.path.isdir(base):
        for entry in sorted(os.listdir(base), reverse=True):
            path = os.path.join(base, entry, 'sbin', 'rabbitmq-server')
            if os.path.exists(path):
                return path
    return '/usr/lib/rabbitmq/bin/rabbitmq-server'


def _dpkg_installed(package):
    result = subprocess.run(['dpkg-query', '-W', '-f=${Status}', package],
                            capture_output=True, text=True)
    return 'install ok installed' in result.stdout


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def print_status(rows):
    if not rows:
        print('thunder-stack: no stack in %s' % stack_dir())
        return
    print('%-24s %-8s %-7s %-10s %s' % ('SERVICE', 'PID', 'PORT', 'STATE',
                                        'DETAIL'))
    for r in rows:
        print('%-24s %-8s %-7s %-10s %s' % (
            r['name'], r['pid'] or '-', r['port'] or '-', r['state'],
            r.get('reason', '')))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='tools/thunder-stack',
        description='Real Keystone, Glance, Cinder, RabbitMQ, MariaDB and '
                    'Ceph on 127.0.0.1, kept in one directory (%s).'
                    % stack_dir())
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('up', help='install what is missing and start '
                              'everything (idempotent)')
    sub.add_parser('down', help='stop every service by PID')
    sub.add_parser('status', help='each service with its PID, port and '
                                  'health')
    demo = sub.add_parser('demo', help='up, then create many volumes from '
                                       'one image with thunder and with '
                                       'upstream; print the timings '
                                       '(--bulk-boot: then the bulk boot '
                                       'benchmark)')
    demo.add_argument('--volumes', '-n', type=int, default=10,
                      help='volumes to create from the image (default 10)')
    demo.add_argument('--image-size-mib', type=int, default=1024,
                      help='size of the raw image (default 1024 MiB)')
    demo.add_argument('--flows', default='thunder,upstream,upstream-cinder',
                      help='comma-separated flows: thunder (thunder store, '
                           'ThunderDriver), upstream (rbd store, RBDDriver), '
                           'upstream-cinder (cinder store, RBDDriver)')
    demo.add_argument('--keep', action='store_true',
                      help='keep the demo volumes and images')
    demo.add_argument('--timeout', type=int, default=900,
                      help='seconds to wait for the volumes')
    demo.add_argument('--json', help='also write the results to this file')
    demo.add_argument('--bulk-boot', action='store_true',
                      help='after the flows (alone with --flows ""), run '
                           'benchmarks/bulk_boot.py: N emulated nodes boot '
                           'one image (needs root)')
    demo.add_argument('--bulk-boot-args', default='--quick',
                      help='arguments of benchmarks/bulk_boot.py, one '
                           'string (default "--quick"; "" for the full '
                           'benchmark; one option alone as '
                           '--bulk-boot-args=--quick); results go to '
                           'data/demo/bulk-boot of the stack unless it '
                           'has --out')
    demo.add_argument('--nova', action='store_true',
                      help='after the flows (alone with --flows ""), run '
                           'benchmarks/nova_boot.py: N servers at once '
                           'through Nova, thunder against Nova\'s own RBD '
                           'paths')
    demo.add_argument('--nova-args', default='',
                      help='arguments of benchmarks/nova_boot.py, one '
                           'string (default "": the full comparison; e.g. '
                           '"--counts 1 --rounds 1"); results go to '
                           'data/demo/nova-boot of the stack unless it has '
                           '--out')
    demo.add_argument('--nova-nodes', action='store_true',
                      help='after the flows (alone with --flows ""), run '
                           'benchmarks/nova_nodes.py: one server per '
                           'emulated compute node at once, peer mode '
                           'against Nova\'s image cache (needs root; '
                           'brings up 2 nodes behind 100 Mbit/s links '
                           'unless nodes are up)')
    demo.add_argument('--nova-nodes-args',
                      default='--rounds 3 --image-mib 1024',
                      help='arguments of benchmarks/nova_nodes.py, one '
                           'string (default "--rounds 3 --image-mib 1024", '
                           'about half an hour); results '
                           'go to data/demo/nova-nodes of the stack unless '
                           'it has --out')
    tempest = sub.add_parser('tempest', help="run Tempest's volume tests "
                                             'against the stack')
    tempest.add_argument('--regex', default=None,
                         help='tests to run (default: Tempest and '
                              'cinder-tempest-plugin volume API tests)')
    tempest.add_argument('--exclude', default=None,
                         help='tests to leave out (a regex)')
    tempest.add_argument('--concurrency', type=int, default=2)
    tempest.add_argument('--volume-type', default=None,
                         help="volume type of Tempest's volumes (default: "
                              "Cinder's, %s; %s: peer mode)"
                              % (THUNDER_BACKEND, PEER_BACKEND))
    nodes = sub.add_parser('nodes', help='add emulated compute nodes to '
                                         'the running stack (up), or remove '
                                         'them (down): see '
                                         'thunder_stack/nodes.py')
    nodes.add_argument('action', choices=('up', 'down'))
    nodes.add_argument('--count', type=int, default=2,
                       help='compute nodes node-1..node-N (default 2)')
    nodes.add_argument('--link-mbit', type=int, default=None,
                       help='shape every node\'s link to this rate, both '
                            'ways (default: unshaped)')
    args = parser.parse_args(argv)
    stack = Stack()
    try:
        if args.command == 'up':
            stack.up()
            print_status(stack.status())
        elif args.command == 'down':
            stack.down()
        elif args.command == 'status':
            rows = stack.status()
            print_status(rows)
            return 0 if rows and all(r['state'] == 'ok' for r in rows) else 3
        elif args.command == 'demo':
            from thunder_stack import demo as demo_mod
            if args.bulk_boot:
                demo_mod.bulk_boot_command(stack, args)     # before "up"
            if args.nova:
                demo_mod.nova_boot_command(stack, args)
            if args.nova_nodes:
                demo_mod.nova_nodes_command(stack, args)
            if not stack.is_up():
                stack.up()
            return demo_mod.run_demo(stack, args)
        elif args.command == 'nodes':
            from thunder_stack import nodes as nodes_mod
            if args.action == 'up':
                nodes_mod.Nodes(stack, args.count, args.link_mbit).up()
                print_status(stack.status())
            else:
                nodes_mod.Nodes(stack).down()
        elif args.command == 'tempest':
            from thunder_stack import tempest as tempest_mod
            if not stack.is_up():
                stack.up()
            args.regex = args.regex or tempest_mod.DEFAULT_REGEX
            return tempest_mod.run_tempest(stack, args)
    except (StackError, svc.ServiceError, ceph_mod.CephError) as e:
        print('thunder-stack: error: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
