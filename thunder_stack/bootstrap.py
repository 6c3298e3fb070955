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

For Nova (thunder_stack.nova): ``nova-keystone`` creates the users nova,
placement and neutron and the compute, placement and network endpoints;
``flavors`` the stack's flavors (and lifts the compute quotas);
``wait-compute SETTINGS HOST PID TIMEOUT`` waits until servers can be
placed on the compute host (nova-compute PID has reported since it started,
its hypervisor is mapped and up, Placement has its inventory);
``compute-status SETTINGS HOST`` prints that check as JSON.
"""

import datetime
import json
import os
import sys
import time

from cinderclient import client as cinder_client
from keystoneauth1 import adapter
from keystoneauth1 import exceptions as ks_exceptions
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
    for name in ('glance', 'cinder'):
        _service_user(ks, name, s['password'])
    _endpoints(ks, {
        ('glance', 'image'): s['glance_url'],
        ('cinderv3', 'volumev3'): s['cinder_url'] + '/v3/%(project_id)s',
        ('cinder', 'block-storage'): s['cinder_url'] +
        '/v3/%(project_id)s',
    })


def nova_keystone(s):
    """Users nova, placement, neutron; compute, placement, network."""
    ks = keystone_client.Client(session=admin_session(s))
    for name in ('nova', 'placement', 'neutron'):
        _service_user(ks, name, s['password'])
    _endpoints(ks, {
        ('nova', 'compute'): s['nova_url'] + '/v2.1',
        ('placement', 'placement'): s['placement_url'],
        ('neutron', 'network'): s['neutron_url'],
    })


def _service_user(ks, name, password):
    """A user with the admin and service roles in the service project.

    As devstack grants them; the project and the roles are made if missing.
    """
    domain = 'default'
    project = (_find(ks.projects, 'service', domain=domain) or
               ks.projects.create('service', domain,
                                  description='Service project'))
    roles = {}
    for role in ('admin', 'service', 'member', 'reader'):
        roles[role] = _find(ks.roles, role) or ks.roles.create(role)
    user = _find(ks.users, name, domain=domain)
    if user is None:
        user = ks.users.create(name, domain=domain, password=password,
                               default_project=project)
    else:
        ks.users.update(user, password=password)
    for role in ('admin', 'service'):
        ks.roles.grant(roles[role], user=user, project=project)


def _endpoints(ks, endpoints):
    """``{(service name, type): url}``: public, internal, admin each."""
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


def _api(s, service_type, microversion=None):
    return adapter.Adapter(admin_session(s), service_type=service_type,
                           interface='public', region_name='RegionOne',
                           default_microversion=microversion)


def flavors(s):
    """The stack's flavors; no compute quotas for admin and service."""
    nova = _api(s, 'compute', '2.60')
    existing = {f['name']: f for f in nova.get(
        '/flavors/detail?is_public=None').json()['flavors']}
    for name, (vcpus, ram, disk) in s['flavors'].items():
        flavor = existing.get(name)
        if flavor is None:
            nova.post('/flavors', json={'flavor': {
                'name': name, 'vcpus': vcpus, 'ram': ram, 'disk': disk}})
        elif (flavor['vcpus'], flavor['ram'], flavor['disk']) != (
                vcpus, ram, disk):
            raise SystemExit('flavor %s exists with %s vCPUs, %s MiB, '
                             '%s GB; the stack wants %s, %s, %s' % (
                                 name, flavor['vcpus'], flavor['ram'],
                                 flavor['disk'], vcpus, ram, disk))
    ks = keystone_client.Client(session=admin_session(s))
    for name in ('admin', 'service'):
        project = _find(ks.projects, name, domain='default')
        nova.put('/os-quota-sets/%s' % project.id, json={'quota_set': {
            'instances': -1, 'cores': -1, 'ram': -1}})


def _process_start(pid):
    """When process ``pid`` started (UTC, naive, as Nova's timestamps)."""
    with open('/proc/%d/stat' % pid) as f:
        ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/stat') as f:
        boot = next(int(line.split()[1]) for line in f
                    if line.startswith('btime '))
    return datetime.datetime.fromtimestamp(
        boot + ticks / os.sysconf('SC_CLK_TCK'), datetime.timezone.utc
    ).replace(tzinfo=None)


def _compute_status(s, host, since=None):
    """(ok, reason): is ``host`` a compute host servers can be placed on?

    ``since``: the compute service must have reported after this time
    (a restarted nova-compute is not up until it reports; its record
    still looks up for a minute after the old process stopped).
    """
    nova = _api(s, 'compute', '2.53')
    services = nova.get('/os-services?binary=nova-compute&host=%s'
                        % host).json()['services']
    if not services:
        return False, 'no nova-compute service registered on %s' % host
    service = services[0]
    if service['state'] != 'up' or service['status'] != 'enabled':
        return False, 'nova-compute on %s is %s and %s' % (
            host, service['state'], service['status'])
    reported = service['updated_at']
    if since and (not reported or
                  datetime.datetime.fromisoformat(reported) < since):
        return False, 'nova-compute on %s has not reported since it ' \
            'started' % host
    hypervisors = [h for h in nova.get('/os-hypervisors/detail').json()[
        'hypervisors'] if h['service']['host'] == host]
    if not hypervisors:
        # Listed once the scheduler has mapped the host to its cell.
        return False, 'no hypervisor of %s mapped to a cell yet' % host
    hypervisor = hypervisors[0]
    if hypervisor['state'] != 'up':
        return False, 'hypervisor %s is %s' % (
            hypervisor['hypervisor_hostname'], hypervisor['state'])
    placement = _api(s, 'placement', '1.14')
    response = placement.get('/resource_providers/%s/inventories'
                             % hypervisor['id'], raise_exc=False)
    inventories = response.json().get('inventories', {}) \
        if response.ok else {}
    if 'VCPU' not in inventories:
        return False, 'no VCPU inventory in Placement for %s' % (
            hypervisor['hypervisor_hostname'])
    return True, '%s: %d vCPUs, %d MiB' % (
        hypervisor['hypervisor_hostname'], inventories['VCPU']['total'],
        inventories.get('MEMORY_MB', {}).get('total', 0))


def compute_status(s, host):
    ok, reason = _compute_status(s, host)
    print(json.dumps({'ok': ok, 'reason': reason}))


def wait_compute(s, host, pid, timeout):
    """Wait until servers can be placed on ``host``; exit 1 if not."""
    deadline = time.monotonic() + float(timeout)
    pid = int(pid)
    since = _process_start(pid)
    reason = 'not checked'
    while time.monotonic() < deadline:
        if not os.path.exists('/proc/%d' % pid):
            raise SystemExit('nova-compute (pid %d) exited while waiting '
                             'for it: %s' % (pid, reason))
        try:
            ok, reason = _compute_status(s, host, since)
        except ks_exceptions.ClientException as e:
            ok, reason = False, str(e)
        if ok:
            print('compute host %s' % reason)
            return
        time.sleep(2)
    raise SystemExit('compute host %s not ready after %ss: %s'
                     % (host, timeout, reason))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command, path = argv[:2]
    with open(path) as f:
        settings = json.load(f)
    {'keystone': keystone, 'volume-types': volume_types,
     'services': services, 'pools': pools, 'nova-keystone': nova_keystone,
     'flavors': flavors, 'wait-compute': wait_compute,
     'compute-status': compute_status}[command](settings, *argv[2:])
    return 0


if __name__ == '__main__':
    sys.exit(main())
