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


"""The devstack plugin's functions, run against the local stack.

The VMThunder parts of cinder.conf, glance-api.conf and thunder-cache.conf
are written by ``devstack/lib/thunder``, the plugin's own functions,
sourced here with ``devstack-shim.sh`` (``iniset``, ``iniget`` through
:mod:`thunder_stack.ini`), so the same code configures both.
"""

import os
import sys

from thunder_stack import layout
from thunder_stack import services as svc


def run(stack, *functions, env=None):
    """Source devstack/settings and lib/thunder; call ``functions``."""
    script = ['set -euo pipefail',
              'source thunder_stack/devstack-shim.sh',
              'source devstack/settings',
              'source devstack/lib/thunder']
    script.extend(functions)
    full_env = {
        # The shim runs python -m thunder_stack.ini: from the checkout.
        'THUNDER_PYTHON': sys.executable,
        'PYTHONPATH': layout.CHECKOUT,
        'THUNDER_DIR': layout.CHECKOUT,
        'CINDER_CONF': stack.path('etc', 'cinder', 'cinder.conf'),
        'GLANCE_API_CONF': stack.path('etc', 'glance', 'glance-api.conf'),
        'GLANCE_IMAGE_IMPORT_CONF': stack.path('etc', 'glance',
                                               'glance-image-import.conf'),
        'THUNDER_GLANCE_PYTHON': stack.python,
        'THUNDER_CEPH_CONF': stack.ceph_conf,
        'THUNDER_RBD_POOL': layout.POOLS['thunder'],
        # The local Ceph runs without cephx: no user, no secret.
        'THUNDER_RBD_USER': '',
        'THUNDER_RBD_SECRET_UUID': '',
        'THUNDER_CINDER_BACKEND': layout.THUNDER_BACKEND,
        'THUNDER_PEER_BACKEND': layout.PEER_BACKEND,
        'THUNDER_CACHE_CONTROL_SOCKET': stack.thunder_cache_paths['control'],
        'THUNDER_GLANCE_URL': stack.url('glance'),
        'THUNDER_STORE_AUTH_ADDRESS': stack.auth_url,
        'THUNDER_STORE_PASSWORD': stack.password,
        'THUNDER_CINDER_GLANCE_PASSWORD': stack.password,
        'GLANCE_ENABLE_MULTIPLE_STORES': 'True',
        'THUNDER_GLANCE_DEFAULT': 'True',
    }
    full_env.update(env or {})
    svc.run(['bash', '-c', '\n'.join(script)], env=full_env)


def thunder_store_available():
    """Whether Glance gets the thunder store (THUNDER_STACK_THUNDER_STORE)."""
    if os.environ.get('THUNDER_STACK_THUNDER_STORE', '1') == '0':
        return False
    # The store's module and its entry point (glance_store loads stores
    # by entry point; setup.cfg declares it).
    return (os.path.exists(os.path.join(layout.CHECKOUT,
                                        'glance_thunder_store', 'store.py'))
            and 'glance_thunder_store.store:Store' in (
                layout.read_file(os.path.join(layout.CHECKOUT, 'setup.cfg'))
                or ''))
