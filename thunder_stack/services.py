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

"""Processes of the local stack: started in their own session, stopped by PID.

Each service is one command line run in the foreground of a new session
(so its process group is its own), with its output in ``log/NAME.log`` and
its PID in ``run/NAME.pid``. A PID is trusted only while the process's
command line still contains the marker the service was started with (the
stack directory, normally), so a reused PID is never signalled.
"""

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from thunder_common import procs

# Ports free_port picks from, up to the ephemeral range.
FREE_PORTS_FROM = 20000
# Seconds a service's port may stay taken by a process that is going away
# before its start fails.
PORT_WAIT = 30

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServiceError(RuntimeError):
    """A service did not start, or died."""


class StackError(RuntimeError):
    """A step of the stack (a command, a wait) failed."""


def log(msg):
    print('thunder-stack: %s' % msg, flush=True)


def run(cmd, env=None, timeout=900, check=True, quiet=False, cwd=None):
    """Run a command; StackError with its output's tail if it fails."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run([str(c) for c in cmd], capture_output=True,
                            text=True, env=full_env, timeout=timeout,
                            cwd=cwd or CHECKOUT)
    if check and result.returncode:
        raise StackError('%s failed (%d):\n%s' % (
            ' '.join(str(c) for c in cmd), result.returncode,
            (result.stdout + result.stderr)[-3000:]))
    return result


def once(marker, message, command):
    """Run ``command`` (logging ``message``) unless ``marker`` exists."""
    if os.path.exists(marker):
        return
    log(message)
    run(command)
    with open(marker, 'w') as f:
        f.write('ok\n')


def uwsgi_options(module, port, processes, env, pythonpath=None):
    """The [uwsgi] section serving the WSGI app ``module`` on ``port``.

    ``pythonpath``: a directory to import ``module`` from, if it is not
    installed in the virtualenv (thunder_stack's own, from the checkout).
    """
    options = {
        'module': module,
        'http-socket': '127.0.0.1:%d' % port,
        'processes': processes,
        'threads': 4,
        'master': True,
        'die-on-term': True,
        'exit-on-reload': False,
        'hook-master-start': 'unix_signal:15 gracefully_kill_them_all',
        'worker-reload-mercy': 30,
        'enable-threads': True,
        'thunder-lock': True,
        'buffer-size': 65535,
        'add-header': 'Connection: close',
        'lazy-apps': True,
        'http-raw-body': True,
        'http-chunked-input': True,
        'http-auto-chunked': True,
        'http-keepalive': False,
        'socket-timeout': 300,
        # glanceclient uploads with chunked transfer encoding.
        'chunked-input-limit': 20971520,
        'chunked-input-timeout': 300,
        'env': env,
        'need-app': True,
    }
    if pythonpath:
        options['pythonpath'] = pythonpath
    return {k: (str(v).lower() if isinstance(v, bool) else v)
            for k, v in options.items()}


class Service:
    """One long-running process of the stack.

    :param name: short name (file names, ``status``).
    :param argv: command line.
    :param root: the stack directory (pid and log files under it).
    :param port: TCP port on 127.0.0.1 it listens on, if any.
    :param health: callable returning None when healthy, else a reason.
    :param env: extra environment.
    :param marker: string that must appear in the process's command line
        (default: ``root``).
    """

    def __init__(self, name, argv, root, port=None, health=None, env=None,
                 marker=None, cwd=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.root = root
        self.port = port
        self.health = health or (lambda: None if port is None
                                 else port_reason(port))
        self.env = env or {}
        self.marker = marker or root
        self.cwd = cwd or root
        self.pid_file = os.path.join(root, 'run', '%s.pid' % name)
        self.log_file = os.path.join(root, 'log', '%s.log' % name)

    def pid(self):
        """PID if the recorded process is alive and still ours, else None."""
        try:
            with open(self.pid_file) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        if self.marker not in procs.command_line(pid) or \
                not procs.alive(pid):
            return None
        return pid

    def start(self):
        """Start the process unless it runs already; returns its PID."""
        pid = self.pid()
        if pid:
            return pid
        if self.port is not None:
            wait_port_free(self.name, self.port)
        os.makedirs(os.path.dirname(self.pid_file), exist_ok=True)
        os.makedirs(os.path.dirname(self.log_file), exist_ok=True)
        env = dict(os.environ)
        env.update(self.env)
        log = open(self.log_file, 'ab')
        try:
            log.write(('\n==== %s: %s\n' % (time.strftime('%F %T'),
                                            ' '.join(self.argv))).encode())
            log.flush()
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, env=env,
                                    cwd=self.cwd, start_new_session=True,
                                    close_fds=True)
        except FileNotFoundError as e:
            raise ServiceError('%s: cannot run %s: %s'
                               % (self.name, self.argv[0], e))
        finally:
            log.close()
        with open(self.pid_file, 'w') as f:
            f.write('%d\n' % proc.pid)
        # Until the child has exec'd, its command line is still ours.
        deadline = time.monotonic() + 10
        while self.pid() is None and proc.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        return proc.pid

    def wait_healthy(self, timeout):
        """Wait until ``health()`` passes; ServiceError if it dies first."""
        deadline = time.monotonic() + timeout
        reason = 'not checked'
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise ServiceError('%s exited; see %s:\n%s' % (
                    self.name, self.log_file, tail(self.log_file)))
            reason = self.health()
            if reason is None:
                return
            time.sleep(0.5)
        raise ServiceError('%s not healthy after %ss (%s); see %s:\n%s' % (
            self.name, timeout, reason, self.log_file, tail(self.log_file)))

    def stop(self, timeout=30):
        """SIGTERM the process group, then SIGKILL; idempotent.

        ServiceError if a process of the group outlives SIGKILL (stuck in
        the kernel): its port and files would still be taken.
        """
        pid = self.pid()
        if pid is not None and not terminate(pid, timeout):
            raise ServiceError('%s: processes of group %d still run after '
                               'SIGKILL: %s' % (self.name, pid,
                                                _describe(_group(pid))))
        if os.path.exists(self.pid_file):
            os.unlink(self.pid_file)

    def status(self):
        pid = self.pid()
        info = {'name': self.name, 'pid': pid, 'port': self.port,
                'state': 'stopped', 'log': self.log_file}
        if pid is not None:
            reason = self.health()
            info['state'] = 'ok' if reason is None else 'unhealthy'
            if reason:
                info['reason'] = reason
        return info


def terminate(pid, timeout):
    """End the process group led by ``pid`` (our own session), then wait.

    True once no process of the group runs (every thread of each ended:
    a process whose main thread has exited may still hold its sockets).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM
                                       else 10)
        while time.monotonic() < deadline:
            if not _group(pid):
                return True
            time.sleep(0.2)
    return False


def _group(pgid):
    """The PIDs of process group ``pgid`` that still run."""
    try:
        os.waitpid(-pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    members = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and procs.alive(int(entry)):
            members.append(int(entry))
    return members


def _describe(pids):
    """``PID (command, thread states)`` for each of ``pids``."""
    out = []
    for pid in pids:
        out.append('%d (%s; threads %s)' % (
            pid, procs.command_line(pid)[:120] or '?',
            ''.join(sorted(procs.thread_states(pid)))))
    return ', '.join(out) or 'none'


def port_free(port, host='127.0.0.1', reuse=True):
    """Whether a server could listen on ``host:port`` now.

    ``reuse=False``: whether no socket at all has it, not even a closing
    one (a server without ``SO_REUSEADDR`` could bind it too).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def listeners(port):
    """The PIDs with a TCP socket listening on ``port`` (any address)."""
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if (fields[3] == '0A' and
                            int(fields[1].rsplit(':', 1)[1], 16) == port):
                        inodes.add('socket:[%s]' % fields[9])
        except OSError:
            continue
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                if inodes & procs.open_files(int(entry)):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def wait_port_free(name, port, timeout=None):
    """Wait until ``port`` is free for service ``name``; else ServiceError.

    A process that is still going away gets ``timeout`` seconds
    (:data:`PORT_WAIT`); the error names whoever holds the port after that.
    """
    timeout = PORT_WAIT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while not port_free(port):
        if time.monotonic() >= deadline:
            raise ServiceError('%s: port %d is still taken after %gs, by %s'
                               % (name, port, timeout,
                                  _describe(listeners(port))))
        time.sleep(0.2)


def port_open(port, host='127.0.0.1'):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def port_reason(port):
    return None if port_open(port) else 'port %d closed' % port


def http_reason(url, ok=(200, 300)):
    """None if ``url`` answers with one of the ``ok`` statuses."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        return '%s: %s' % (url, getattr(e, 'reason', e))
    return None if status in ok else '%s answered %d' % (url, status)


def free_port(preferred=None):
    """A TCP port of 127.0.0.1 free now: ``preferred`` if it is.

    Chosen below the kernel's ephemeral range (``ip_local_port_range``),
    where no outgoing connection can take it as its local port before its
    server binds it: a port from ``bind(0)`` is in that range, and a
    daemon of an eight-node test once found its port taken so.
    """
    if preferred and port_free(preferred, reuse=False):
        return preferred
    low = _ephemeral_low()
    if low - FREE_PORTS_FROM >= 1000:
        for _ in range(200):
            port = random.randrange(FREE_PORTS_FROM, low)
            if port_free(port, reuse=False):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _ephemeral_low():
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def tail(path, lines=15):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode('utf-8', 'replace')
    except OSError:
        return ''
    return '\n'.join(text.splitlines()[-lines:])
