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

"""devstack/plugin.sh driven through its phases, as devstack drives it.

devstack itself cannot run here; these tests stand in for the few devstack
functions the plugin calls and run its phases in the order stack.sh does,
on a devstack-plugin-ceph style configuration. They need no stack, except
the one that puts the stack's compute node in an availability zone through
its real Nova.
"""

import json
import os
import subprocess
import sys

from thunder_stack import ini
from thunder_stack import layout
from thunder_stack import nova as nova_mod

DEVSTACK_STUBS = r'''
set -euo pipefail
source thunder_stack/devstack-shim.sh
function echo_summary { echo "summary: $*"; }
function is_service_enabled { return 0; }
function setup_develop { echo "setup_develop $*" >> "$CALLS"; }
'''
# Sourced after lib/thunder, replacing its install_thunder (which links the
# Ceph bindings into a Python).
STUB_INSTALL = r'''
function install_thunder { echo "install_thunder $*" >> "$CALLS"; }
'''
# What devstack's configure_cinder does with CINDER_ENABLED_BACKENDS.
CONFIGURE_BACKENDS = r'''
echo "enabled_backends $CINDER_ENABLED_BACKENDS" >> "$CALLS"
for be in ${CINDER_ENABLED_BACKENDS//,/ }; do
    if type "configure_cinder_backend_${be%%:*}" >/dev/null 2>&1; then
        "configure_cinder_backend_${be%%:*}" "${be##*:}"
    fi
done
'''


def _run_plugin(tmp_path, script, **env):
    calls = tmp_path / 'calls'
    calls.touch()
    full_env = dict(os.environ, PYTHONPATH=layout.CHECKOUT,
                    THUNDER_PYTHON=sys.executable, CALLS=str(calls),
                    CINDER_CONF=str(tmp_path / 'cinder.conf'),
                    GLANCE_API_CONF=str(tmp_path / 'glance-api.conf'),
                    TEMPEST_CONFIG=str(tmp_path / 'tempest.conf'))
    full_env.update(env)
    result = subprocess.run(['bash', '-c', DEVSTACK_STUBS + script],
                            cwd=layout.CHECKOUT, env=full_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return calls.read_text()


def test_plugin_phases_configure_cinder_and_glance(tmp_path):
    ini.write(str(tmp_path / 'glance-api.conf'), {'DEFAULT': {
        'enabled_backends': 'robust_rbd:rbd,fast:file'}})
    env = dict(CINDER_CEPH_POOL='volumes', CINDER_CEPH_USER='cinder',
               CINDER_CEPH_UUID='457eb676-33da-42ec-9a8c-9293d545c337',
               CEPH_CONF_FILE='/etc/ceph/ceph.conf',
               SERVICE_PASSWORD='secret',
               KEYSTONE_SERVICE_URI='http://10.0.0.1/identity',
               CINDER_ENABLED_BACKENDS='thunder:thunder,ceph:ceph')
    calls = _run_plugin(tmp_path, r'''
source devstack/override-defaults
source devstack/settings
source devstack/plugin.sh source
''' + STUB_INSTALL + CONFIGURE_BACKENDS + r'''
source devstack/plugin.sh stack install
source devstack/plugin.sh stack post-config
source devstack/plugin.sh stack test-config
''', **env)
    assert 'setup_develop %s' % layout.CHECKOUT in calls
    assert 'install_thunder' in calls

    cinder = str(tmp_path / 'cinder.conf')
    assert ini.iniget(cinder, 'thunder', 'volume_driver') == \
        'cinder_thunder_driver.driver.ThunderDriver'
    assert ini.iniget(cinder, 'thunder', 'volume_backend_name') == 'thunder'
    assert ini.iniget(cinder, 'thunder', 'thunder_rbd_pool') == 'volumes'
    assert ini.iniget(cinder, 'thunder', 'thunder_rbd_user') == 'cinder'
    assert ini.iniget(cinder, 'thunder', 'thunder_rbd_secret_uuid') == \
        '457eb676-33da-42ec-9a8c-9293d545c337'
    assert ini.iniget(cinder, 'thunder',
                      'image_volume_cache_enabled') == 'False'
    assert ini.iniget(cinder, 'DEFAULT',
                      'allowed_direct_url_schemes') == 'cinder'
    assert ini.iniget(cinder, 'glance', 'username') == 'cinder'
    assert ini.iniget(cinder, 'glance', 'password') == 'secret'
    assert ini.iniget(cinder, 'glance', 'auth_url') == \
        'http://10.0.0.1/identity/v3'

    glance = str(tmp_path / 'glance-api.conf')
    assert ini.iniget(glance, 'DEFAULT', 'enabled_backends') == \
        'robust_rbd:rbd,fast:file,thunder:thunder'
    assert ini.iniget(glance, 'glance_store', 'default_backend') == 'thunder'
    assert ini.iniget(glance, 'thunder', 'thunder_store_auth_address') == \
        'http://10.0.0.1/identity/v3'
    assert ini.iniget(glance, 'thunder', 'thunder_store_password') == \
        'secret'
    assert ini.iniget(glance, 'thunder',
                      'thunder_store_volume_type') == 'thunder'
    assert ini.iniget(glance, 'DEFAULT', 'show_image_direct_url') == 'True'
    # The rbd locations need no deprecated multiple-locations view.
    assert ini.iniget(glance, 'DEFAULT', 'show_multiple_locations') == \
        'False'
    assert ini.iniget(glance, 'thunder',
                      'thunder_store_location_scheme') == 'rbd'
    imports = str(tmp_path / 'glance-image-import.conf')
    assert ini.iniget(imports, 'image_import_opts',
                      'image_import_plugins') == "['image_conversion']"
    assert ini.iniget(imports, 'image_conversion', 'output_format') == 'raw'
    assert ini.iniget(glance, 'DEFAULT', 'enabled_import_methods') == \
        "['glance-direct', 'web-download', 'copy-image']"
    assert ini.iniget(glance, 'wsgi', 'python_interpreter')

    tempest = str(tmp_path / 'tempest.conf')
    assert ini.iniget(tempest, 'volume', 'storage_protocol') == 'ceph'


def test_glance_store_is_added_once(tmp_path):
    script = r'''
source devstack/settings
source devstack/lib/thunder
configure_thunder_glance_store
configure_thunder_glance_store
'''
    _run_plugin(tmp_path, script)
    glance = str(tmp_path / 'glance-api.conf')
    assert ini.iniget(glance, 'DEFAULT', 'enabled_backends') == \
        'thunder:thunder'


IMPORT_SCRIPT = r'''
source devstack/settings
source devstack/lib/thunder
configure_thunder_glance_import
configure_thunder_glance_import
'''


def test_image_conversion_after_the_other_import_plugins(tmp_path):
    """Added once, after the plugins already listed; a conf of its own."""
    imports = str(tmp_path / 'import.conf')
    ini.write(imports, {'image_import_opts': {
        'image_import_plugins': "['image_decompression']"}})
    _run_plugin(tmp_path, IMPORT_SCRIPT, GLANCE_IMAGE_IMPORT_CONF=imports,
                THUNDER_GLANCE_PYTHON='/venv/bin/python')
    assert ini.iniget(imports, 'image_import_opts', 'image_import_plugins') \
        == "['image_decompression', 'image_conversion']"
    assert ini.iniget(imports, 'image_conversion', 'output_format') == 'raw'
    glance = str(tmp_path / 'glance-api.conf')
    assert ini.iniget(glance, 'wsgi', 'python_interpreter') == \
        '/venv/bin/python'


def test_image_conversion_can_be_left_off(tmp_path):
    _run_plugin(tmp_path, IMPORT_SCRIPT,
                THUNDER_GLANCE_IMAGE_CONVERSION='False')
    assert not (tmp_path / 'glance-image-import.conf').exists()
    assert not (tmp_path / 'glance-api.conf').exists()


def test_single_store_glance(tmp_path):
    _run_plugin(tmp_path, r'''
source devstack/settings
source devstack/lib/thunder
configure_thunder_glance_store
''', GLANCE_ENABLE_MULTIPLE_STORES='False')
    glance = str(tmp_path / 'glance-api.conf')
    assert ini.iniget(glance, 'glance_store', 'stores') == 'thunder'
    assert ini.iniget(glance, 'glance_store', 'default_store') == 'cinder'
    assert ini.iniget(glance, 'glance_store',
                      'thunder_store_user_name') == 'glance'
    assert ini.iniget(glance, 'DEFAULT', 'enabled_backends') == ''


def test_peer_mode_configures_and_starts_thunder_cache(tmp_path):
    """THUNDER_PEER_MODE: the backend, thunder-cache.conf, the daemon."""
    state = tmp_path / 'state'
    env = {'THUNDER_PEER_MODE': 'True', 'SERVICE_PASSWORD': 'secret',
           'KEYSTONE_SERVICE_URI': 'http://10.0.0.1/identity',
           'THUNDER_CACHE_CONF_DIR': str(tmp_path / 'etc'),
           'THUNDER_CACHE_STATE_DIR': str(state),
           'THUNDER_CACHE_RUN_DIR': str(tmp_path / 'run'),
           'THUNDER_CACHE_NODE_ID': 'compute-1', 'HOST_IP': '10.0.0.7',
           'NOVA_CONF': str(tmp_path / 'nova.conf')}
    calls = _run_plugin(tmp_path, r'''
function run_process { echo "run_process $1|$2|$3|$4" >> "$CALLS"; }
function stop_process { echo "stop_process $*" >> "$CALLS"; }
source devstack/override-defaults
source devstack/settings
source devstack/plugin.sh source
''' + STUB_INSTALL + CONFIGURE_BACKENDS + r'''
source devstack/plugin.sh stack install
source devstack/plugin.sh stack post-config
# A stand-in for the native server's holder, which unstack stops.
bash -c 'exec -a thunder-volume-server sleep 60' &
echo $! > "$THUNDER_CACHE_RUN_DIR/volume-server.sock.pid"
# And a process the pid file named once, which it must not touch.
sleep 60 &
other=$!
until grep -q thunder-volume-server \
        "/proc/$(cat "$THUNDER_CACHE_RUN_DIR/volume-server.sock.pid")/cmdline"
do sleep 0.05; done
source devstack/plugin.sh unstack
if kill -0 "$(cat "$THUNDER_CACHE_RUN_DIR/volume-server.sock.pid")"; then
    echo 'unstack left the volume server running' >&2
    exit 1
fi
echo $other > "$THUNDER_CACHE_RUN_DIR/volume-server.sock.pid"
source devstack/plugin.sh unstack
kill -0 $other || { echo 'unstack stopped a stranger' >&2; exit 1; }
kill $other
''', **env)
    # devstack enables the peer backend and makes its volume type.
    assert 'enabled_backends thunder:thunder,thunder_peer:thunder-peer' in \
        calls.splitlines()
    cinder = str(tmp_path / 'cinder.conf')
    assert ini.iniget(cinder, 'thunder-peer', 'volume_driver') == \
        'cinder_thunder_driver.peer.PeerDriver'
    assert not ini.iniget(cinder, 'thunder-peer', 'thunder_mode')
    socket = str(tmp_path / 'run' / 'control.sock')
    assert ini.iniget(cinder, 'thunder-peer',
                      'thunder_cache_control_socket') == socket

    conf = str(tmp_path / 'etc' / 'thunder-cache.conf')
    assert ini.iniget(conf, 'node', 'node_id') == 'compute-1'
    assert ini.iniget(conf, 'node', 'listen_address') == '10.0.0.7'
    assert ini.iniget(conf, 'blockdev', 'enabled') == 'True'
    assert ini.iniget(conf, 'blockdev', 'control_socket') == socket
    # The native volume server by default, built from source.
    assert ini.iniget(conf, 'blockdev', 'volume_server') == 'native'
    binary = ini.iniget(conf, 'blockdev', 'native_server_binary')
    assert binary == str(state / 'bin' / 'thunder-volume-server')
    assert os.access(binary, os.X_OK)
    assert ini.iniget(conf, 'blockdev', 'native_server_socket') == str(
        tmp_path / 'run' / 'volume-server.sock')
    # Image-volumes are read from the backend's pool, and from no other.
    assert ini.iniget(conf, 'origin', 'rbd_pools') == 'volumes'
    assert ini.iniget(conf, 'blockdev', 'mount_dir') == str(
        state / 'volumes')
    assert ini.iniget(conf, 'advertise', 'enabled') == 'True'
    assert ini.iniget(conf, 'advertise', 'username') == 'glance'
    assert ini.iniget(conf, 'advertise', 'password') == 'secret'
    # A server and its peer-mode volumes in one zone, even without zones
    # of their own per node.
    assert ini.iniget(str(tmp_path / 'nova.conf'), 'cinder',
                      'cross_az_attach') == 'False'
    secret = tmp_path / 'etc' / 'peer-secret'
    assert len(secret.read_text().strip()) == 64
    assert secret.stat().st_mode & 0o077 == 0

    started = [line for line in calls.splitlines()
               if line.startswith('run_process thunder-cache|')]
    assert len(started) == 1
    command = started[0].split('|')[1]
    assert command.endswith('--config-file %s' % conf)
    assert started[0].endswith('||root')
    assert 'stop_process thunder-cache' in calls


def test_a_rebuilt_volume_server_is_upgraded_in_place(tmp_path):
    """A new build: SIGHUP to the running holder; no new build: none."""
    state = tmp_path / 'state'
    run = tmp_path / 'run'
    run.mkdir()
    hups = tmp_path / 'hups'
    holder = ('import signal, sys, time\n'
              'signal.signal(signal.SIGHUP, lambda *a: open(sys.argv[1], '
              '"a").write("hup\\n"))\n'
              'open(sys.argv[2], "w").close()\n'
              'time.sleep(120)\n')
    out = tmp_path / 'out'
    _run_plugin(tmp_path, r'''
source devstack/settings
source devstack/lib/thunder
install_thunder_volume_server
binary=$THUNDER_CACHE_STATE_DIR/bin/thunder-volume-server
# A stand-in for the running server's holder: it counts its SIGHUPs.
"$THUNDER_PYTHON" -c "$HOLDER" "$HUPS" "$HUPS.ready" \
    thunder-volume-server &
holder=$!
echo $holder > "$THUNDER_CACHE_RUN_DIR/volume-server.sock.pid"
until [[ -e "$HUPS.ready" ]]; do sleep 0.05; done
install_thunder_volume_server > "$OUT"      # nothing new: no signal
# An older build installed: make builds anew, the holder is told.
printf x >> "$binary"
touch -d 2000-01-01 "$binary"
install_thunder_volume_server >> "$OUT"
sleep 1
kill $holder
''', THUNDER_CACHE_STATE_DIR=str(state), THUNDER_CACHE_RUN_DIR=str(run),
                HOLDER=holder, HUPS=str(hups), OUT=str(out))
    assert hups.read_text() == 'hup\n'
    assert 'thunder-volume-server rebuilt' in out.read_text()
    assert os.access(str(state / 'bin' / 'thunder-volume-server'), os.X_OK)


def test_peer_mode_off_by_default(tmp_path):
    calls = _run_plugin(tmp_path, r'''
function run_process { echo "run_process $*" >> "$CALLS"; }
source devstack/override-defaults
source devstack/settings
source devstack/plugin.sh source
''' + STUB_INSTALL + r'''
source devstack/plugin.sh stack post-config
''', THUNDER_CACHE_CONF_DIR=str(tmp_path / 'etc'))
    assert 'run_process' not in calls
    assert not (tmp_path / 'etc').exists()
    assert not ini.iniget(str(tmp_path / 'cinder.conf'), 'thunder-peer',
                          'volume_driver')


def test_peer_node_of_several(tmp_path):
    """A node's zone (backends, Nova, the extra phase); the shared secret."""
    secret = 'c0ffee' * 11
    env = dict(THUNDER_PEER_MODE='True', THUNDER_CACHE_SHARED_SECRET=secret,
               THUNDER_NODE_AVAILABILITY_ZONE='az-c1',
               NOVA_CONF=str(tmp_path / 'nova.conf'),
               THUNDER_CACHE_CONF_DIR=str(tmp_path / 'etc'),
               THUNDER_CACHE_STATE_DIR=str(tmp_path / 'state'),
               THUNDER_CACHE_RUN_DIR=str(tmp_path / 'run'))
    calls = _run_plugin(tmp_path, r'''
function run_process { :; }
source devstack/override-defaults
source devstack/settings
source devstack/plugin.sh source
''' + STUB_INSTALL + CONFIGURE_BACKENDS + r'''
function join_thunder_availability_zone { echo "join" >> "$CALLS"; }
source devstack/plugin.sh stack post-config
source devstack/plugin.sh stack extra
''', **env)
    cinder = str(tmp_path / 'cinder.conf')
    for backend in ('thunder', 'thunder-peer'):
        assert ini.iniget(cinder, backend,
                          'backend_availability_zone') == 'az-c1'
    nova = str(tmp_path / 'nova.conf')
    assert ini.iniget(nova, 'cinder', 'cross_az_attach') == 'False'
    assert calls.splitlines().count('join') == 1
    secret_file = tmp_path / 'etc' / 'peer-secret'
    assert secret_file.read_text() == secret + '\n'
    assert secret_file.stat().st_mode & 0o077 == 0


def test_no_availability_zone_by_default(tmp_path):
    calls = _run_plugin(tmp_path, r'''
source devstack/override-defaults
source devstack/settings
source devstack/plugin.sh source
''' + STUB_INSTALL + r'''
function join_thunder_availability_zone { echo "join" >> "$CALLS"; }
configure_cinder_backend_thunder thunder
source devstack/plugin.sh stack post-config
source devstack/plugin.sh stack extra
''', NOVA_CONF=str(tmp_path / 'nova.conf'))
    assert not ini.iniget(str(tmp_path / 'cinder.conf'), 'thunder',
                          'backend_availability_zone')
    assert not ini.iniget(str(tmp_path / 'nova.conf'), 'cinder',
                          'cross_az_attach')
    assert 'join' not in calls


def _join_zone(stack, tmp_path, zone, nova_conf, timeout=60):
    """join_thunder_availability_zone against the stack's real Nova."""
    env = dict(os.environ, PYTHONPATH=layout.CHECKOUT,
               THUNDER_PYTHON=sys.executable, NOVA_CONF=nova_conf,
               THUNDER_NODE_AVAILABILITY_ZONE=zone,
               THUNDER_COMPUTE_TIMEOUT=str(timeout),
               PATH=os.path.join(stack.venv, 'bin') + ':' + os.environ['PATH'])
    env.pop('OS_CLOUD', None)
    env.update(stack.openrc_env())
    return subprocess.run(
        ['bash', '-c', 'set -euo pipefail\n'
         'source thunder_stack/devstack-shim.sh\n'
         'source devstack/settings\n'
         'source devstack/lib/thunder\n'
         'join_thunder_availability_zone\n'],
        cwd=layout.CHECKOUT, env=env, capture_output=True, text=True,
        timeout=timeout + 120)


def test_compute_node_joins_its_zone(stack, tmp_path):
    """The extra phase's zone, on the stack's real Nova; twice is once."""
    zone = 'thunder-e2e-zone'
    client = [os.path.join(stack.venv, 'bin', 'openstack')]
    env = dict(os.environ, **stack.openrc_env())
    env.pop('OS_CLOUD', None)

    def openstack(*args, check=True):
        return subprocess.run(client + list(args), env=env, check=check,
                              capture_output=True, text=True, timeout=120)

    try:
        for _ in range(2):
            result = _join_zone(stack, tmp_path, zone,
                                nova_mod.nova_conf(stack))
            assert result.returncode == 0, result.stdout + result.stderr
            assert 'is in availability zone %s' % zone in result.stdout
        aggregate = json.loads(openstack('aggregate', 'show', zone,
                                         '-f', 'json').stdout)
        assert aggregate['availability_zone'] == zone
        assert aggregate['hosts'] == [nova_mod.HOST]
        zones = openstack('availability', 'zone', 'list', '--compute',
                          '-f', 'value', '-c', 'Zone Name').stdout.split()
        assert zone in zones

        # A host that never registers: an error, and no zone for it.
        other = tmp_path / 'nova.conf'
        ini.write(str(other), {'DEFAULT': {'host': 'not-a-compute-node'}})
        result = _join_zone(stack, tmp_path, zone + '-2', str(other),
                            timeout=3)
        assert result.returncode == 1
        assert 'not-a-compute-node did not register within 3s' in \
            result.stderr
        assert openstack('aggregate', 'show', zone + '-2',
                         check=False).returncode
    finally:
        openstack('aggregate', 'remove', 'host', zone, nova_mod.HOST,
                  check=False)
        openstack('aggregate', 'delete', zone, check=False)
