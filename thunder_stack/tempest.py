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

"""``tools/thunder-stack tempest``: Tempest's volume tests on the stack.

As a Cinder third-party CI runs them: tempest and cinder-tempest-plugin
from PyPI (in a virtualenv of their own, ``.stack/tempest-venv``), a
workspace in ``.stack/tempest`` whose ``tempest.conf`` describes the stack
and the guest image of :mod:`thunder_stack.guest` in the default (thunder)
Glance store, both the image volumes are made from and the image servers
boot. Nova and Neutron are available, so the volume tests that attach
volumes to servers run: servers boot without a network (the stack's
Neutron has no networks and no agents: Tempest makes none,
``create_isolated_networks = False``, and names none) and without SSH
validation. Swift and a key manager are not there: tests needing them
skip. The subunit stream and the summary stay in the workspace.
"""

import os
import subprocess
import sys

from thunder_stack import clients
from thunder_stack import guest as guest_mod
from thunder_stack import ini
from thunder_stack import layout
from thunder_stack import services as svc

DEFAULT_REGEX = r'^(tempest\.api\.volume|cinder_tempest_plugin\.api\.volume)'
IMAGE_NAME = 'tempest-guest-image'
#: The image property naming the guest build the image was uploaded from.
IMAGE_SHA_PROPERTY = 'thunder_guest_sha256'
#: The flavor of the servers (one of thunder_stack.nova.FLAVORS).
FLAVOR = 'tiny'


def _venv(stack):
    venv = stack.path('tempest-venv')
    if not os.path.exists(os.path.join(venv, 'bin', 'tempest')):
        svc.log('installing tempest and cinder-tempest-plugin into %s'
                % venv)
        base = os.environ.get('THUNDER_STACK_PYTHON') or sys.executable
        svc.run([base, '-m', 'venv', venv])
        svc.run([os.path.join(venv, 'bin', 'pip'), 'install', '-q',
                 'tempest', 'cinder-tempest-plugin'], timeout=3600)
    return venv


def _image(stack):
    """The guest image in the default store, uploaded once per build.

    Images of other builds of the guest (another sha256) are replaced.
    """
    guest = guest_mod.build(stack.path('data', 'guest'))
    sha = '%s=%s' % (IMAGE_SHA_PROPERTY, guest.sha256)
    current = _images(stack, '--property', sha)
    if current:
        return current[0]
    for image_id in _images(stack):
        svc.log('deleting %s (%s): another build of the guest'
                % (IMAGE_NAME, image_id))
        clients.cli(stack, 'openstack', 'image', 'delete', image_id)
    out = clients.cli(stack, 'glance', 'image-create', '--name', IMAGE_NAME,
                      '--disk-format', guest.fmt, '--container-format', 'bare',
                      '--visibility', 'public', '--property', sha,
                      '--file', guest.path)
    return clients.table_value(out, 'id')


def _images(stack, *filters):
    return clients.cli(stack, 'openstack', 'image', 'list', '--name',
                       IMAGE_NAME, *filters, '-f', 'value', '-c', 'ID').split()


def _flavor(stack):
    return clients.cli(stack, 'openstack', 'flavor', 'show', FLAVOR, '-f',
                       'value', '-c', 'id').strip()


def write_config(stack, workspace, image_id, flavor_id, volume_type=None):
    """tempest.conf for the stack; ``volume_type``: of the test volumes.

    Without ``volume_type`` Tempest's volumes get Cinder's default type
    (thunder: shared mode); ``thunder-peer`` runs the tests in peer mode.
    """
    lock = os.path.join(workspace, 'locks')
    os.makedirs(lock, exist_ok=True)
    ini.write(os.path.join(workspace, 'etc', 'tempest.conf'), {
        'DEFAULT': {'log_file': stack.path('log', 'tempest.log'),
                    'debug': True},
        'oslo_concurrency': {'lock_path': lock},
        'auth': {'admin_username': 'admin',
                 'admin_password': stack.password,
                 'admin_project_name': 'admin',
                 'admin_domain_name': 'Default',
                 'use_dynamic_credentials': True,
                 # Neutron without agents: a network Tempest made would
                 # give ports nothing can bind. Servers boot without one.
                 'create_isolated_networks': False,
                 'tempest_roles': 'member'},
        'identity': {'uri_v3': stack.auth_url, 'auth_version': 'v3',
                     'region': 'RegionOne', 'v3_endpoint_type': 'public'},
        'identity-feature-enabled': {'api_v2': False},
        'service_available': {'cinder': True, 'glance': True,
                              'nova': True, 'neutron': True,
                              'placement': True, 'swift': False,
                              'horizon': False},
        # No fixed_network_name: servers are created without "networks"
        # and Nova, finding none in Neutron, gives them no port.
        'compute': {'image_ref': image_id, 'image_ref_alt': image_id,
                    'flavor_ref': flavor_id, 'flavor_ref_alt': flavor_id,
                    'build_timeout': 300},
        # One node under TCG, no network, no console proxies.
        'compute-feature-enabled': {'live_migration': False,
                                    'cold_migration': False,
                                    'resize': False,
                                    'shelve': False,
                                    'interface_attach': False,
                                    'change_password': False,
                                    'vnc_console': False,
                                    'spice_console': False,
                                    'serial_console': False,
                                    'console_output': True,
                                    # Not run here yet (the thunder
                                    # backend reports multiattach).
                                    'volume_multiattach': False,
                                    'attach_encrypted_volume': False},
        # No SSH into the guests: no network, no keys in the image.
        'validation': {'run_validation': False},
        'volume': {'catalog_type': 'volumev3',
                   'backend_names': '%s,%s' % (layout.THUNDER_BACKEND,
                                               layout.RBD_BACKEND),
                   'storage_protocol': 'ceph',
                   'vendor_name': 'VMThunder',
                   'volume_size': 1,
                   'volume_type': volume_type,
                   'build_timeout': 300,
                   'max_microversion': 'latest',
                   'manage_volume_ref': 'source-name,volume-%s'},
        'volume-feature-enabled': {'backup': False, 'multi_backend': True,
                                   'snapshot': True, 'clone': True,
                                   'manage_volume': True,
                                   'manage_snapshot': False,
                                   'volume_revert': True,
                                   'extend_attached_volume': True,
                                   # Encrypted volumes need a key manager.
                                   'extend_attached_encrypted_volume':
                                       False,
                                   'extend_volume_with_snapshot': True},
        'image-feature-enabled': {'api_v2': True},
    })


def run_tempest(stack, args):
    venv = _venv(stack)
    workspace = stack.path('tempest')
    tempest = os.path.join(venv, 'bin', 'tempest')
    if not os.path.exists(os.path.join(workspace, 'etc')):
        # Registered in the stack's own list of workspaces, not in
        # ~/.tempest (where a stack removed since may hold the name).
        svc.run([tempest, 'init', '--workspace-path',
                 stack.path('tempest-workspaces.yaml'), workspace])
    write_config(stack, workspace, _image(stack), _flavor(stack),
                 args.volume_type)
    cmd = [tempest, 'run', '--regex', args.regex, '--concurrency',
           str(args.concurrency)]
    if args.exclude:
        cmd += ['--exclude-regex', args.exclude]
    svc.log('running %s in %s' % (' '.join(cmd[1:]), workspace))
    return subprocess.run(cmd, cwd=workspace).returncode
