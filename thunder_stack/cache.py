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


"""The stack's node cache daemon, ``thunder-cache``: configured, started.

Its configuration is written by devstack's ``configure_thunder_cache``
(:mod:`thunder_stack.devstack`); the emulated compute nodes
(:mod:`thunder_stack.nodes`) configure theirs the same way with
:func:`env`. Healthy once its volume files are mounted and its control
socket answers.
"""

import os

from thunder_cache.control import client as control_client
from thunder_cache.volumes import nativevol
from thunder_common import loops
from thunder_common import procs
from thunder_stack import devstack
from thunder_stack import services as svc


def configure_and_start(stack):
    """Write thunder-cache.conf (devstack's function) and start it."""
    # Peers (none but itself here) on loopback: allowed explicitly.
    devstack.run(stack, 'configure_thunder_cache', env=env(
        stack, stack.thunder_cache_conf, stack.thunder_cache_paths,
        'thunder-stack', '127.0.0.1', stack.ports['thunder_cache'],
        '127.0.0.0/8'))
    stack.restart_if_config_changed('thunder-cache',
                                    [stack.thunder_cache_conf])
    stack.start('thunder-cache', timeout=60)


def env(stack, conf, paths, node_id, listen, port, networks):
    """devstack's variables for configure_thunder_cache (one node)."""
    return {
        'THUNDER_CACHE_CONF': conf,
        # One secret for the deployment: every node's is this file.
        'THUNDER_CACHE_SECRET_FILE': stack.path('etc', 'thunder',
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


def reason(paths):
    """None once the daemon of ``paths`` serves volume files and answers."""
    if not os.path.ismount(paths['mount']):
        return '%s is not mounted' % paths['mount']
    return ping(paths['control'])


def ping(control_socket):
    """None if the daemon of ``control_socket`` answers, else why."""
    try:
        control_client.ControlClient(control_socket, timeout=5).call('ping')
    except control_client.ControlError as e:
        return str(e)
    return None


def stop_volume_server(paths):
    """Stop the native volume server of ``paths`` (it outlives the daemon).

    Its holder unmounts the volume files; loop devices are detached first.
    """
    try:
        pid = nativevol.NativeServer(paths['native']).stop()
    except nativevol.NativeError as e:
        svc.log('thunder-volume-server did not stop: %s' % e)
        return
    if pid:
        svc.log('stopped thunder-volume-server (pid %d)' % pid)


def served_by_native(paths):
    """Whether thunder-volume-server serves ``paths``' volume files.

    (pid, None) if it answers on its socket, runs the thunder-volume-server
    binary and has /dev/fuse open; (None, reason) otherwise, e.g. when the
    daemon serves them itself (volume_server = python).
    """
    try:
        pid = nativevol.NativeServer(paths['native'], timeout=10).ping()
    except nativevol.NativeError as e:
        return None, str(e)
    try:
        # ' (deleted)': the binary was rebuilt since it started.
        exe = os.path.basename(os.readlink('/proc/%d/exe' % pid)).split()[0]
        fds = procs.open_files(pid)
    except OSError as e:
        return None, 'server %d: %s' % (pid, e)
    if exe != nativevol.BINARY or '/dev/fuse' not in fds:
        return None, 'PID %d runs %s, /dev/fuse %s' % (
            pid, exe, 'open' if '/dev/fuse' in fds else 'not open')
    return pid, None


def detach_loops(mount):
    """Detach the loop devices left on volume files under ``mount``."""
    out = svc.run(list(loops.LIST_COMMAND), check=False, quiet=True).stdout
    for name in loops.backed_by(out, under=mount):
        svc.log('detaching %s (a volume file of %s)' % (name, mount))
        svc.run(['losetup', '--detach', name], check=False, quiet=True)
