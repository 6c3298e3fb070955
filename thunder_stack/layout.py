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


"""Where the local stack lives and what it is called.

The names every part of the stack shares (backends, pools, stores,
ports), its directory (``.stack/`` in the checkout, or
``$THUNDER_STACK_DIR``) and :class:`Layout`: the paths, state (ports and
password, chosen once), URLs and credentials of one stack directory. No
process is started here: the jobs (install, per-service configuration,
supervision) take a :class:`thunder_stack.stack.Stack`, which is a Layout.
"""

import json
import os
import secrets

from thunder_stack import nova as nova_mod
from thunder_stack import services as svc

CHECKOUT = svc.CHECKOUT

DEFAULT_PORTS = {'mysql': 16306, 'epmd': 16369, 'amqp': 16672,
                 'rabbit_dist': 16673, 'ceph': 16789, 'keystone': 16500,
                 'glance': 16292, 'cinder': 16776, 'thunder_cache': 16485,
                 **nova_mod.PORTS}
POOLS = {'thunder': 'thunder', 'rbd': 'volumes', 'images': 'images',
         'nova': nova_mod.EPHEMERAL_POOL}
THUNDER_BACKEND = 'thunder'
PEER_BACKEND = 'thunder-peer'
# The thunder Glance store: its images are located by their sealed
# snapshot (thunder_store_location_scheme = rbd, the default), which Nova's
# and Cinder's RBD code clone with no location added by hand.
THUNDER_STORE = 'thunder'
# A second thunder store, with thunder_store_location_scheme = thunder, for
# what only thunder:// locations do (they name their image).
THUNDER_URI_STORE = 'thunder_uri'
RBD_BACKEND = 'rbd'
BACKENDS = (THUNDER_BACKEND, PEER_BACKEND, RBD_BACKEND)
CINDER_STORE = 'cinder'


def stack_dir():
    return os.path.abspath(os.environ.get('THUNDER_STACK_DIR') or
                           os.path.join(CHECKOUT, '.stack'))


def read_file(path):
    """The text of ``path``, None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class Layout:
    """One stack directory: paths, state, URLs and credentials."""

    def __init__(self, root=None):
        self.root = root or stack_dir()
        self.venv = os.path.join(self.root, 'venv')
        self.python = os.path.join(self.venv, 'bin', 'python')
        self.etc = os.path.join(self.root, 'etc')
        self.data = os.path.join(self.root, 'data')
        self.state_file = os.path.join(self.root, 'state.json')
        self.state = self.load_state()

    # -- state ------------------------------------------------------------

    def load_state(self):
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def save_state(self):
        os.makedirs(self.root, exist_ok=True)
        tmp = self.state_file + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.state, f, indent=2, sort_keys=True)
        os.replace(tmp, self.state_file)

    def init_state(self):
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
            self.save_state()

    # -- names ------------------------------------------------------------

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

    @property
    def ceph_conf(self):
        return self.path('data', 'ceph', 'ceph.conf')

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
                'control': self.path('run', 'thunder-cache', 'control.sock'),
                'native': self.path('run', 'thunder-cache',
                                    'volume-server.sock')}

    # -- credentials ------------------------------------------------------

    def authtoken(self, user):
        """A service's [keystone_authtoken] section."""
        return {'www_authenticate_uri': self.auth_url,
                'auth_url': self.auth_url, 'auth_type': 'password',
                'username': user, 'password': self.password,
                'project_name': 'service', 'user_domain_name': 'Default',
                'project_domain_name': 'Default',
                'service_token_roles_required': True}

    def openrc_env(self):
        return {'OS_AUTH_URL': self.auth_url, 'OS_USERNAME': 'admin',
                'OS_PASSWORD': self.password, 'OS_PROJECT_NAME': 'admin',
                'OS_USER_DOMAIN_ID': 'default',
                'OS_PROJECT_DOMAIN_ID': 'default',
                'OS_IDENTITY_API_VERSION': '3',
                'OS_REGION_NAME': 'RegionOne',
                'OS_VOLUME_API_VERSION': '3.50',
                'OS_IMAGE_API_VERSION': '2'}

    def write_openrc(self):
        lines = ['# Source me: admin credentials of the local stack.']
        for key, value in sorted(self.openrc_env().items()):
            lines.append('export %s=%s' % (key, value))
        lines.append('export PATH=%s:$PATH' % os.path.join(self.venv, 'bin'))
        lines.append('export CEPH_CONF=%s' % self.ceph_conf)
        with open(self.path('openrc'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        os.chmod(self.path('openrc'), 0o600)
