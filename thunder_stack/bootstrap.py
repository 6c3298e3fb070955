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

"""Keystone and Cinder resources of the local stack; idempotent.

Run by ``thunder_stack.stack`` with the stack's virtualenv Python (it needs
keystoneclient and cinderclient)::

    python -m thunder_stack.bootstrap keystone SETTINGS_JSON
    python -m thunder_stack.bootstrap volume-types SETTINGS_JSON
    python -m thunder_stack.bootstrap services SETTINGS_JSON

``keystone`` creates the service project, the ``service`` role, the users
glance and cinder (admin and service roles in the service project, as
devstack gives them) and the image and volume endpoints; ``volume-types``
creates one volume type per Cinder backend; ``services`` prints Cinder's
services as JSON; ``pools`` the pools the scheduler knows, as JSON.
"""

import json
import sys

from cinderclient import client as cinder_client
from keystoneauth1.identity import v3
from keystoneauth1 import session as ks_session
from keystoneclient.v3 import client as keystone_client


def admin_session(s):
    auth = v3.Password(auth_url=s['auth_url'], username='admin',
                       password=s['password'], project_name='admin',
                       user_domain_id='default', project_domain_id='default')
    return ks_session.Session(auth=auth)


def _find(manager, name, **kwargs):
    for item in manager.list(**kwargs):
        if item.name == name:
            return item
    return None


def keystone(s):
    ks = keystone_client.Client(session=admin_session(s))
    domain = 'default'
    project = (_find(ks.projects, 'service', domain=domain) or
               ks.projects.create('service', domain,
                                  description='Service project'))
    roles = {}
    for name in ('admin', 'service', 'member', 'reader'):
        roles[name] = _find(ks.roles, name) or ks.roles.create(name)
    for name in ('glance', 'cinder'):
        user = _find(ks.users, name, domain=domain)
        if user is None:
            user = ks.users.create(name, domain=domain,
                                   password=s['password'],
                                   default_project=project)
        else:
            ks.users.update(user, password=s['password'])
        for role in ('admin', 'service'):
            ks.roles.grant(roles[role], user=user, project=project)
    endpoints = {
        ('glance', 'image'): s['glance_url'],
        ('cinderv3', 'volumev3'): s['cinder_url'] + '/v3/%(project_id)s',
        ('cinder', 'block-storage'): s['cinder_url'] +
        '/v3/%(project_id)s',
    }
    for (name, kind), url in endpoints.items():
        service = None
        for svc in ks.services.list(type=kind):
            service = svc
        if service is None:
            service = ks.services.create(name, kind)
        existing = {e.interface: e for e in ks.endpoints.list(
            service=service)}
        for interface in ('public', 'internal', 'admin'):
            endpoint = existing.get(interface)
            if endpoint is None:
                ks.endpoints.create(service, url, interface=interface,
                                    region='RegionOne')
            elif endpoint.url != url:
                ks.endpoints.update(endpoint, url=url)


def _cinder(s):
    return cinder_client.Client('3.50', session=admin_session(s))


def volume_types(s):
    """Volume types per backend; no volume quotas for admin and service."""
    cinder = _cinder(s)
    ks = keystone_client.Client(session=admin_session(s))
    for name in ('admin', 'service'):
        project = _find(ks.projects, name, domain='default')
        cinder.quotas.update(project.id, volumes=-1, gigabytes=-1,
                             snapshots=-1)
    existing = {t.name: t for t in cinder.volume_types.list(is_public=None)}
    for name, backend in s['volume_types'].items():
        vtype = existing.get(name)
        if vtype is None:
            vtype = cinder.volume_types.create(name)
        if vtype.get_keys().get('volume_backend_name') != backend:
            vtype.set_keys({'volume_backend_name': backend})


def services(s):
    cinder = _cinder(s)
    print(json.dumps([{'binary': x.binary, 'host': x.host,
                       'state': x.state, 'status': x.status}
                      for x in cinder.services.list()]))


def pools(s):
    """The pools Cinder's scheduler knows (from the backends' reports)."""
    cinder = _cinder(s)
    print(json.dumps(sorted(p.name for p in cinder.pools.list())))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command, path = argv
    with open(path) as f:
        settings = json.load(f)
    {'keystone': keystone, 'volume-types': volume_types,
     'services': services, 'pools': pools}[command](settings)
    return 0


if __name__ == '__main__':
    sys.exit(main())
