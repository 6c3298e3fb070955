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

"""A real single-node Ceph cluster on 127.0.0.1, for tests and the stack.

One monitor, one manager and one OSD from Debian's packages, everything
(configuration, keyrings, data, logs, sockets, pid files) inside one work
directory. The OSD keeps its data in memory (memstore, saved to the work
directory on a clean stop) or in a file-backed BlueStore for data sets larger
than memory. Daemons run in the foreground of their own session and are
stopped by the PIDs recorded at start, after checking that each PID still
belongs to this cluster.

Authentication is ``none`` by default; ``auth='cephx'`` turns cephx on for
the whole cluster and creates a ``client.<user>`` key (default ``cinder``)
with the RBD profile on the pools, as an operator would for Cinder.

Command line::

    python -m thunder_stack.ceph start --workdir DIR [--auth cephx]
    python -m thunder_stack.ceph status --workdir DIR
    python -m thunder_stack.ceph stop --workdir DIR
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

from thunder_common import procs
from thunder_stack import services as svc

DAEMONS = ('mon.a', 'mgr.x', 'osd.0')
DEFAULT_POOLS = ('volumes', 'images')
COMMAND_TIMEOUT = 60


class CephError(RuntimeError):
    """The local cluster could not be started, used or stopped."""


class LocalCeph:
    """A single-node Ceph cluster living in ``workdir``.

    :param workdir: directory holding everything of the cluster; created if
        missing. A cluster created there before is restarted, not recreated.
    :param pools: RBD pools to create.
    :param port: monitor's msgr v1 port; 0 picks free ports (v1 and v2).
    :param auth: ``none`` or ``cephx``.
    :param objectstore: ``memstore`` (fast, in RAM) or ``bluestore`` (a
        sparse file in the work directory, for data larger than RAM).
    :param size_gib: capacity the OSD reports (memstore) or its file size.
    :param user: the client created with ``profile rbd`` on the pools.
    """

    def __init__(self, workdir, pools=DEFAULT_POOLS, port=0, auth='none',
                 objectstore='memstore', size_gib=12, user='cinder'):
        if auth not in ('none', 'cephx'):
            raise ValueError("auth must be 'none' or 'cephx', not %r" % auth)
        if objectstore not in ('memstore', 'bluestore'):
            raise ValueError("objectstore must be 'memstore' or 'bluestore',"
                             " not %r" % objectstore)
        self.workdir = os.path.abspath(workdir)
        self.pools = tuple(pools)
        self.port = port
        self.auth = auth
        self.objectstore = objectstore
        self.size_gib = size_gib
        self.user = user
        self.conf_path = os.path.join(self.workdir, 'ceph.conf')
        self.admin_keyring = os.path.join(self.workdir,
                                          'ceph.client.admin.keyring')
        self.user_keyring = os.path.join(self.workdir,
                                         'ceph.client.%s.keyring' % user)

    # -- paths ------------------------------------------------------------

    def _path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def _pid_file(self, daemon):
        return self._path('run', '%s.pid' % daemon)

    def _log_file(self, daemon):
        return self._path('log', '%s.log' % daemon)

    @property
    def created(self):
        return os.path.exists(self._path('created'))

    def _created_with(self):
        with open(self._path('created')) as marker:
            return json.load(marker)['objectstore']

    def _wipe(self):
        for sub in ('run', 'log', 'mon', 'mgr', 'osd', 'keys'):
            shutil.rmtree(self._path(sub), ignore_errors=True)
        for name in ('created', 'ceph.conf', os.path.basename(
                self.admin_keyring), os.path.basename(self.user_keyring)):
            if os.path.exists(self._path(name)):
                os.unlink(self._path(name))

    # -- public API -------------------------------------------------------

    def start(self, timeout=180):
        """Start the cluster (creating it the first time); idempotent.

        Returns once RBD accepts writes in every pool.
        """
        deadline = time.monotonic() + timeout
        if self.running() == list(DAEMONS):
            self._add_pools()
            self.wait_ready(deadline)
            return self
        self.stop()
        if self.created and self._created_with() == 'memstore':
            # A memstore OSD keeps nothing once stopped: start afresh.
            self._wipe()
        try:
            if not self.created:
                self._create(deadline)
            else:
                for daemon in DAEMONS:
                    self._spawn(daemon)
                self._add_pools()
                self.wait_ready(deadline)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self, timeout=60):
        """Stop every daemon of this cluster by PID; idempotent."""
        for daemon in reversed(DAEMONS):
            pid = self._pid(daemon)
            if pid is None:
                continue
            _terminate(pid, timeout)
            os.unlink(self._pid_file(daemon))

    def running(self):
        """Names of this cluster's daemons whose processes are alive."""
        return [d for d in DAEMONS if self._pid(d) is not None]

    def status(self):
        """What ``status`` prints: daemons, conf, fsid and health."""
        info = {'workdir': self.workdir, 'conf': self.conf_path,
                'auth': self.auth, 'running': self.running()}
        if info['running'] == list(DAEMONS):
            health = self.ceph_json('health', timeout=10)
            info['health'] = health.get('status')
            info['fsid'] = self.fsid()
        return info

    def fsid(self):
        return self.ceph_json('fsid')['fsid']

    def ceph(self, *args, timeout=COMMAND_TIMEOUT):
        """Run the ``ceph`` CLI as admin; return its stdout."""
        return self._run(['ceph', '-c', self.conf_path,
                          '--connect-timeout', str(min(timeout, 30))]
                         + list(args), timeout=timeout)

    def ceph_json(self, *args, timeout=COMMAND_TIMEOUT):
        return json.loads(self.ceph(*args, '--format', 'json',
                                    timeout=timeout) or '{}')

    def rbd(self, *args, timeout=COMMAND_TIMEOUT):
        """Run the ``rbd`` CLI as admin; return its stdout."""
        return self._run(['rbd', '-c', self.conf_path] + list(args),
                         timeout=timeout)

    def wait_ready(self, deadline):
        """Wait until a write through librbd succeeds in every pool."""
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                for pool in self.pools:
                    self._probe_write(pool)
                return
            except CephError as exc:
                last = exc
                time.sleep(1)
        raise CephError('Ceph in %s did not accept RBD writes in time: %s'
                        % (self.workdir, last))

    # -- creation ---------------------------------------------------------

    def _create(self, deadline):
        for sub in ('run', 'log', 'mon', 'mgr', 'osd', 'keys'):
            os.makedirs(self._path(sub), exist_ok=True)
        fsid = str(uuid.uuid4())
        if self.port:
            v1, v2 = self.port, svc.free_port()
        else:
            v1, v2 = svc.free_port(), svc.free_port()
        addr = '[v2:127.0.0.1:%d,v1:127.0.0.1:%d]' % (v2, v1)
        self._write_conf(fsid, addr)
        self._make_mon_keyring()
        monmap = self._path('keys', 'monmap')
        self._run(['monmaptool', '--create', '--clobber', '--fsid', fsid,
                   '--addv', 'a', addr, monmap])
        self._run(['ceph-mon', '-c', self.conf_path, '--mkfs', '-i', 'a',
                   '--monmap', monmap,
                   '--keyring', self._path('keys', 'mon.keyring')])
        self._spawn('mon.a')
        self._wait_for(lambda: self.ceph('mon', 'stat', timeout=15),
                       deadline, 'the monitor to answer')
        # Clone v2 (clones of unprotected snapshots, trash of parents).
        self.ceph('osd', 'set-require-min-compat-client', 'mimic')

        self._key_file('mgr.x', self._path('mgr', 'ceph-x', 'keyring'),
                       'mon', 'allow profile mgr', 'osd', 'allow *',
                       'mds', 'allow *')
        self._spawn('mgr.x')
        self._create_osd()
        self._wait_for(self._osd_up, deadline, 'the OSD to come up')
        self._create_pools(self.pools)
        self._key_file('client.%s' % self.user, self.user_keyring,
                       'mon', 'profile rbd', 'osd', self._caps(),
                       'mgr', self._caps())
        self.wait_ready(deadline)
        with open(self._path('created'), 'w') as marker:
            json.dump({'fsid': fsid, 'objectstore': self.objectstore,
                       'auth': self.auth}, marker)

    def _create_pools(self, pools):
        for pool in pools:
            self.ceph('osd', 'pool', 'create', pool, '16', '16')
            self.rbd('pool', 'init', pool)

    def _caps(self):
        return ', '.join('profile rbd pool=%s' % p for p in self.pools)

    def _add_pools(self):
        """Create the pools a cluster made before they were wanted lacks."""
        missing = [p for p in self.pools
                   if p not in self.ceph_json('osd', 'pool', 'ls')]
        if not missing:
            return
        self._create_pools(missing)
        self.ceph('auth', 'caps', 'client.%s' % self.user, 'mon',
                  'profile rbd', 'osd', self._caps(), 'mgr', self._caps())

    def _write_conf(self, fsid, addr):
        auth = 'cephx' if self.auth == 'cephx' else 'none'
        size = self.size_gib * 1024 ** 3
        lines = [
            '[global]',
            'fsid = %s' % fsid,
            'mon host = %s' % addr,
            'public addr = 127.0.0.1',
            'ms bind ipv6 = false',
            'auth cluster required = %s' % auth,
            'auth service required = %s' % auth,
            'auth client required = %s' % auth,
            'osd pool default size = 1',
            'osd pool default min size = 1',
            'osd pool default pg autoscale mode = off',
            'osd crush chooseleaf type = 0',
            'mon allow pool size one = true',
            'mon allow pool delete = true',
            'mon warn on pool no redundancy = false',
            'mon data avail warn = 2',
            'mon data avail crit = 1',
            'run dir = %s' % self._path('run'),
            'log file = %s' % self._path('log', '$name.ceph.log'),
            'mon cluster log file = %s' % self._path('log', 'cluster.log'),
            'mon data = %s' % self._path('mon', '$cluster-$id'),
            'mgr data = %s' % self._path('mgr', '$cluster-$id'),
            'osd data = %s' % self._path('osd', '$cluster-$id'),
            'osd objectstore = %s' % self.objectstore,
            'memstore device bytes = %d' % size,
            'bluestore block path = %s' % self._path('osd', 'block'),
            'bluestore block create = true',
            'bluestore block size = %d' % size,
            'bluestore fsck on mount = false',
            'osd memory target = 1073741824',
            '',
            '[mon]',
            'admin socket = %s' % self._path('run', '$cluster-$name.asok'),
            '[mgr]',
            'admin socket = %s' % self._path('run', '$cluster-$name.asok'),
            '[osd]',
            'admin socket = %s' % self._path('run', '$cluster-$name.asok'),
            '[client]',
            'keyring = %s' % self.admin_keyring,
            'log file = /dev/null',
            'rbd cache = true',
            '',
        ]
        with open(self.conf_path, 'w') as conf:
            conf.write('\n'.join(lines))

    def _make_mon_keyring(self):
        mon_keyring = self._path('keys', 'mon.keyring')
        self._run(['ceph-authtool', '--create-keyring', mon_keyring,
                   '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *'])
        self._run(['ceph-authtool', '--create-keyring', self.admin_keyring,
                   '--gen-key', '-n', 'client.admin',
                   '--cap', 'mon', 'allow *', '--cap', 'osd', 'allow *',
                   '--cap', 'mgr', 'allow *', '--cap', 'mds', 'allow *'])
        self._run(['ceph-authtool', mon_keyring,
                   '--import-keyring', self.admin_keyring])
        os.chmod(self.admin_keyring, 0o600)

    def _key_file(self, entity, path, *caps):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.ceph('auth', 'get-or-create', entity, *caps, '-o', path)
        os.chmod(path, 0o600)

    def _create_osd(self):
        osd_uuid = str(uuid.uuid4())
        key = self._run(['ceph-authtool', '--gen-print-key']).strip()
        secret = self._path('keys', 'osd-secret.json')
        with open(secret, 'w') as f:
            json.dump({'cephx_secret': key}, f)
        osd_id = self.ceph('osd', 'new', osd_uuid, '-i', secret).strip()
        os.unlink(secret)
        if osd_id != '0':
            raise CephError('expected OSD id 0, the monitor gave %r' % osd_id)
        data = self._path('osd', 'ceph-0')
        os.makedirs(data, exist_ok=True)
        keyring = os.path.join(data, 'keyring')
        with open(keyring, 'w') as f:
            f.write('[osd.0]\n\tkey = %s\n' % key)
        os.chmod(keyring, 0o600)
        self._run(['ceph-osd', '-c', self.conf_path, '-i', '0', '--mkfs',
                   '--osd-uuid', osd_uuid], timeout=120)
        self._spawn('osd.0')

    def _osd_up(self):
        if self.ceph_json('osd', 'stat', timeout=15).get('num_up_osds') != 1:
            raise CephError('OSD not up yet')

    def _probe_write(self, pool):
        name = 'thunder-ready-probe'
        try:
            self.rbd('create', '--size', '4M', '%s/%s' % (pool, name),
                     timeout=20)
            self.rbd('bench', '--io-type', 'write', '--io-size', '4K',
                     '--io-total', '4K', '%s/%s' % (pool, name), timeout=20)
        finally:
            try:
                self.rbd('rm', '--no-progress', '%s/%s' % (pool, name),
                         timeout=20)
            except CephError:
                pass

    # -- processes --------------------------------------------------------

    def _spawn(self, daemon):
        kind, ident = daemon.split('.')
        log = open(self._log_file(daemon), 'ab')
        try:
            proc = subprocess.Popen(
                ['ceph-%s' % kind, '-f', '-c', self.conf_path, '-i', ident],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True)
        finally:
            log.close()
        with open(self._pid_file(daemon), 'w') as f:
            f.write('%d\n' % proc.pid)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise CephError('ceph-%s exited at start (status %s); see %s'
                            % (kind, proc.returncode, self._log_file(daemon)))

    def _pid(self, daemon):
        """PID of ``daemon`` if alive and still one of ours, else None."""
        try:
            with open(self._pid_file(daemon)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        if self.conf_path not in procs.command_line(pid).split(' '):
            return None  # the PID was reused by another process
        return pid if procs.alive(pid) else None

    def _check_alive(self):
        dead = [d for d in DAEMONS
                if os.path.exists(self._pid_file(d)) and self._pid(d) is None]
        if dead:
            raise CephError('%s died; see %s' % (
                ', '.join(dead),
                ', '.join(self._log_file(d) for d in dead)))

    def _wait_for(self, check, deadline, what):
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                check()
                return
            except CephError as exc:
                last = exc
                time.sleep(0.5)
        raise CephError('timed out waiting for %s: %s' % (what, last))

    def _run(self, cmd, timeout=COMMAND_TIMEOUT):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise CephError('%s timed out after %ss' % (' '.join(cmd),
                                                        timeout))
        except FileNotFoundError:
            raise CephError('%s is not installed: apt-get install ceph-mon '
                            'ceph-osd ceph-mgr ceph-common' % cmd[0])
        if result.returncode:
            raise CephError('%s failed (%d): %s' % (
                ' '.join(cmd), result.returncode,
                (result.stderr or result.stdout).strip()[-2000:]))
        return result.stdout


def _terminate(pid, timeout):
    """SIGTERM, then SIGKILL after ``timeout`` seconds; wait for the end."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while procs.alive(pid):
        time.sleep(0.1)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m thunder_stack.ceph',
        description='Start, inspect or stop a single-node Ceph on '
                    '127.0.0.1 kept in one directory.')
    parser.add_argument('command', choices=('start', 'stop', 'status'))
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--pools', default=','.join(DEFAULT_POOLS))
    parser.add_argument('--port', type=int, default=0)
    parser.add_argument('--auth', choices=('none', 'cephx'), default='none')
    parser.add_argument('--objectstore', choices=('memstore', 'bluestore'),
                        default='memstore')
    parser.add_argument('--size-gib', type=int, default=12)
    args = parser.parse_args(argv)
    cluster = LocalCeph(args.workdir, pools=args.pools.split(','),
                        port=args.port, auth=args.auth,
                        objectstore=args.objectstore, size_gib=args.size_gib)
    try:
        if args.command == 'start':
            cluster.start()
        elif args.command == 'stop':
            cluster.stop()
        print(json.dumps(cluster.status(), indent=2, sort_keys=True))
    except CephError as exc:
        print('error: %s' % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
