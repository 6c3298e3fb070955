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


"""Supervision of the local stack: its processes, started, stopped, checked.

Every long-running process is a :class:`thunder_stack.services.Service`
(its own session, stopped by PID); :func:`services` lists them in start
order, Ceph apart (:class:`thunder_stack.ceph.LocalCeph` supervises its
daemons). ``down`` stops them in reverse order, ``status`` reports each
with its PID, port and health.
"""

import json
import os

from thunder_stack import cache
from thunder_stack import ceph as ceph_mod
from thunder_stack import layout
from thunder_stack import nova as nova_mod
from thunder_stack import services as svc


def services(stack):
    """Every long-running process, in start order (Ceph apart)."""
    p = stack.ports
    bin_ = os.path.join(stack.venv, 'bin')
    rabbit_env = {
        'RABBITMQ_NODENAME': 'thunder@localhost',
        'RABBITMQ_NODE_IP_ADDRESS': '127.0.0.1',
        'RABBITMQ_NODE_PORT': str(p['amqp']),
        'RABBITMQ_DIST_PORT': str(p['rabbit_dist']),
        'RABBITMQ_MNESIA_BASE': stack.path('data', 'rabbitmq', 'mnesia'),
        'RABBITMQ_LOG_BASE': stack.path('log', 'rabbitmq'),
        'RABBITMQ_CONFIG_FILE': stack.path('etc', 'rabbitmq', 'rabbitmq'),
        'RABBITMQ_ENABLED_PLUGINS_FILE': stack.path(
            'etc', 'rabbitmq', 'enabled_plugins'),
        'RABBITMQ_PID_FILE': stack.path('run', 'rabbitmq-beam.pid'),
        'ERL_EPMD_PORT': str(p['epmd']),
        'ERL_EPMD_ADDRESS': '127.0.0.1',
        'HOME': stack.path('data', 'rabbitmq'),
    }
    return [
        svc.Service(
            'mysql',
            ['/usr/sbin/mariadbd', '--no-defaults',
             '--datadir=%s' % stack.path('data', 'mysql'),
             '--socket=%s' % stack.path('run', 'mysqld.sock'),
             '--port=%d' % p['mysql'], '--bind-address=127.0.0.1',
             '--user=root', '--skip-name-resolve',
             '--pid-file=%s' % stack.path('run', 'mysqld-own.pid'),
             '--innodb-buffer-pool-size=256M',
             '--innodb-flush-log-at-trx-commit=2',
             '--max-connections=2000',
             '--log-error=%s' % stack.path('log', 'mysqld-error.log')],
            stack.root, port=p['mysql']),
        svc.Service('epmd', ['epmd', '-address', '127.0.0.1', '-port',
                             str(p['epmd'])], stack.root,
                    port=p['epmd'], marker='epmd'),
        svc.Service('rabbitmq', [_rabbitmq_server()], stack.root,
                    port=p['amqp'], env=rabbit_env, marker='rabbitmq'),
        svc.Service(
            'keystone',
            [os.path.join(bin_, 'uwsgi'), '--ini',
             stack.path('etc', 'keystone', 'uwsgi.ini')],
            stack.root, port=p['keystone'],
            health=lambda: svc.http_reason(stack.auth_url)),
        svc.Service(
            'glance-api',
            [os.path.join(bin_, 'uwsgi'), '--ini',
             stack.path('etc', 'glance', 'uwsgi.ini')],
            stack.root, port=p['glance'],
            health=lambda: svc.http_reason(stack.url('glance') +
                                           '/versions')),
        svc.Service(
            'thunder-cache',
            [os.path.join(bin_, 'thunder-cache'), '--config-file',
             stack.thunder_cache_conf, '--log-file',
             stack.path('log', 'thunder-cache.log')],
            stack.root, port=p['thunder_cache'],
            health=lambda: cache.reason(stack.thunder_cache_paths)),
        _cinder(stack, 'cinder-api', port=p['cinder'],
                health=lambda: svc.http_reason(stack.url('cinder') + '/')),
        _cinder(stack, 'cinder-scheduler'),
        _cinder(stack, 'cinder-volume'),
    ] + nova_mod.services(stack)


def _cinder(stack, name, **kwargs):
    """A Cinder service: its command with cinder.conf and its own log."""
    return svc.Service(
        name, [os.path.join(stack.venv, 'bin', name), '--config-file',
               stack.path('etc', 'cinder', 'cinder.conf'),
               '--log-file', stack.path('log', '%s.log' % name)],
        stack.root, **kwargs)


def service(stack, name):
    for s in services(stack):
        if s.name == name:
            return s
    raise KeyError(name)


def start(stack, name, timeout=120):
    """Start ``name`` unless it runs; wait until it is healthy."""
    s = service(stack, name)
    if s.pid() is None:
        svc.log('starting %s' % name)
    s.start()
    s.wait_healthy(timeout)
    return s


def restart_if_config_changed(stack, name, files):
    """Stop a running service whose configuration changed since start."""
    digest = json.dumps([layout.read_file(f) for f in files])
    key = 'config:%s' % name
    s = service(stack, name)
    if s.pid() is not None and stack.state.get(key) != digest:
        svc.log('configuration of %s changed: restarting it' % name)
        s.stop()
    stack.state[key] = digest
    stack.save_state()


def down(stack):
    """Stop the nodes, every service (reverse order), then Ceph."""
    if 'ports' not in stack.state:
        svc.log('no stack in %s' % stack.root)
        return
    if stack.state.get('nodes'):
        from thunder_stack import nodes as nodes_mod
        nodes_mod.Nodes(stack).down()
    stuck = []
    for s in reversed(services(stack)):
        if s.pid() is not None:
            svc.log('stopping %s (pid %d)' % (s.name, s.pid()))
        if s.name == 'thunder-cache':
            # Loop devices left on volume files (a test that failed).
            cache.detach_loops(stack.thunder_cache_paths['mount'])
        nova_mod.before_stop(stack, s)
        try:
            s.stop()
        except svc.ServiceError as e:
            # Stop the others all the same; say which did not end.
            svc.log(str(e))
            stuck.append(s.name)
        if s.name == 'thunder-cache':
            cache.stop_volume_server(stack.thunder_cache_paths)
    cluster = stack.ceph()
    if cluster.running():
        svc.log('stopping Ceph')
    cluster.stop()
    if stuck:
        raise svc.ServiceError('still running after SIGKILL: %s (see above)'
                               % ', '.join(stuck))


def status(stack):
    """One row per process: name, pid, port, state (``ok``...), reason."""
    rows = []
    if not stack.state:
        return rows
    for s in services(stack):
        rows.append(s.status())
    rows.insert(3, _ceph_row(stack.ceph(), stack.ports['ceph']))
    if service(stack, 'cinder-api').pid():
        try:
            for s in stack.volume_services():
                if s['binary'] == 'cinder-volume':
                    rows.append({'name': '  %s' % s['host'],
                                 'pid': None, 'port': None,
                                 'state': 'ok' if s['state'] == 'up'
                                 else s['state']})
        except svc.StackError:
            pass
    rows.extend(nova_mod.status_rows(stack))
    if stack.state.get('nodes'):
        from thunder_stack import nodes as nodes_mod
        rows.extend(nodes_mod.Nodes(stack).status())
    return rows


def _ceph_row(cluster, port):
    running = cluster.running()
    row = {'name': 'ceph', 'pid': None, 'port': port,
           'state': 'stopped', 'log': cluster._path('log')}
    if running:
        row['pid'] = cluster._pid(running[0])
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
    return row


def is_up(rows):
    """True if there are rows and every one is ``ok``."""
    return bool(rows) and all(r['state'] == 'ok' for r in rows)


def _rabbitmq_server():
    base = '/usr/lib/rabbitmq/lib'
    if os.path.isdir(base):
        for entry in sorted(os.listdir(base), reverse=True):
            path = os.path.join(base, entry, 'sbin', 'rabbitmq-server')
            if os.path.exists(path):
                return path
    return '/usr/lib/rabbitmq/bin/rabbitmq-server'
