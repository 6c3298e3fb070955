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
(no Nova, no Neutron, no Swift: tests needing them skip), and a small raw
image in the default (thunder) Glance store as the image volumes are made
from. The subunit stream and the summary stay in the workspace.
"""

import os
import subprocess
import sys

from thunder_stack import ini
from thunder_stack import stack as stack_mod

DEFAULT_REGEX = r'^(tempest\.api\.volume|cinder_tempest_plugin\.api\.volume)'
IMAGE_NAME = 'tempest-raw-image'


def _venv(stack):
    venv = stack.path('tempest-venv')
    if not os.path.exists(os.path.join(venv, 'bin', 'tempest')):
        stack_mod.log('installing tempest and cinder-tempest-plugin into %s'
                      % venv)
        base = os.environ.get('THUNDER_STACK_PYTHON') or sys.executable
        stack_mod.run([base, '-m', 'venv', venv])
        stack_mod.run([os.path.join(venv, 'bin', 'pip'), 'install', '-q',
                       'tempest', 'cinder-tempest-plugin'], timeout=3600)
    return venv


def _image(stack):
    """A 64 MiB raw image in the default store, made once."""
    env = dict(os.environ, **stack.openrc_env())
    env['PATH'] = os.path.join(stack.venv, 'bin') + ':' + env['PATH']
    out = subprocess.run(['openstack', 'image', 'list', '--name', IMAGE_NAME,
                          '-f', 'value', '-c', 'ID'], env=env,
                         capture_output=True, text=True, check=True)
    if out.stdout.strip():
        return out.stdout.split()[0]
    path = stack.path('data', 'demo', 'tempest.raw')
    from thunder_stack import demo
    demo.make_image(path, 64, seed=3)
    out = subprocess.run(['glance', 'image-create', '--name', IMAGE_NAME,
                          '--disk-format', 'raw', '--container-format',
                          'bare', '--visibility', 'public', '--file', path],
                         env=env, capture_output=True, text=True,
                         check=True)
    return demo.table_value(out.stdout, 'id')


def write_config(stack, workspace, image_id):
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
                 'create_isolated_networks': False,
                 'tempest_roles': 'member'},
        'identity': {'uri_v3': stack.auth_url, 'auth_version': 'v3',
                     'region': 'RegionOne', 'v3_endpoint_type': 'public'},
        'identity-feature-enabled': {'api_v2': False},
        'service_available': {'cinder': True, 'glance': True,
                              'nova': False, 'neutron': False,
                              'swift': False, 'horizon': False,
                              'placement': False},
        'compute': {'image_ref': image_id, 'image_ref_alt': image_id},
        'volume': {'catalog_type': 'volumev3',
                   'backend_names': '%s,%s' % (stack_mod.THUNDER_BACKEND,
                                               stack_mod.RBD_BACKEND),
                   'storage_protocol': 'ceph',
                   'vendor_name': 'VMThunder',
                   'volume_size': 1,
                   'build_timeout': 300,
                   'max_microversion': 'latest',
                   'manage_volume_ref': 'source-name,volume-%s'},
        'volume-feature-enabled': {'backup': False, 'multi_backend': True,
                                   'snapshot': True, 'clone': True,
                                   'manage_volume': True,
                                   'manage_snapshot': False,
                                   'volume_revert': True,
                                   'extend_attached_volume': False,
                                   'extend_volume_with_snapshot': True},
        'image-feature-enabled': {'api_v2': True},
    })


def run_tempest(stack, args):
    venv = _venv(stack)
    workspace = stack.path('tempest')
    tempest = os.path.join(venv, 'bin', 'tempest')
    if not os.path.exists(os.path.join(workspace, 'etc')):
        stack_mod.run([tempest, 'init', workspace])
    write_config(stack, workspace, _image(stack))
    cmd = [tempest, 'run', '--regex', args.regex, '--concurrency',
           str(args.concurrency)]
    if args.exclude:
        cmd += ['--exclude-regex', args.exclude]
    stack_mod.log('running %s in %s' % (' '.join(cmd[1:]), workspace))
    return subprocess.run(cmd, cwd=workspace).returncode
