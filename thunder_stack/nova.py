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

"""Nova, Placement, Neutron and libvirt in the local stack.

``thunder_stack.stack`` calls this module from ``up``,
``thunder_stack.supervise`` from ``down`` and ``status``; every process
is a :class:`thunder_stack.services.Service` (own session, PID file,
stopped by PID):

- ``virtlogd`` and ``libvirtd`` from Debian, in the foreground, with
  configuration files of the stack (no systemd here). They use libvirt's
  system paths (``/run/libvirt``, ``qemu:///system``): one libvirtd per
  machine, so ``up`` refuses to run beside a libvirtd it did not start.
- Placement 16 under uWSGI (``placement.wsgi.api``).
- Neutron: ``neutron-server``'s API under uWSGI (``neutron.wsgi.api``),
  ML2 without agents. Nova's API and compute call Neutron even for a server
  booted with ``--nic none`` (doc/source/stack.rst says where).
- Nova 34: the compute API under uWSGI (``nova.wsgi.osapi_compute``),
  ``nova-conductor``, ``nova-scheduler`` and ``nova-compute`` with the
  libvirt driver, ``virt_type = qemu`` (TCG: the ``/dev/kvm`` of these
  machines is paravirtual). Cells: ``nova_cell0`` and ``cell1``, set up
  with ``nova-manage``; the scheduler maps new compute hosts itself
  (``discover_hosts_in_cells_interval``).

nova-compute refuses to start as a new service while libvirt holds any
domain, so libvirt is left without the stack's domains (those named by
``instance_name_template``) whenever nova-compute stops: ``down`` destroys
and undefines them after stopping nova-compute, ``up`` before starting it.
"""

import grp
import json
import os
import re
import shutil
import socket
import subprocess

from thunder_stack import ini
from thunder_stack import services as svc

APT_PACKAGES = ('libvirt-daemon-system', 'libvirt-dev', 'pkg-config',
                'qemu-system-x86', 'qemu-block-extra')
PIP_PACKAGES = ('nova==34.0.0', 'openstack-placement==16.0.0',
                'neutron==29.0.0', 'libvirt-python')
PORTS = {'placement': 16778, 'nova': 16774, 'neutron': 16696}
DATABASES = ('placement', 'neutron', 'nova_api', 'nova', 'nova_cell0')

HOST = 'thunder-stack'
#: The Ceph pool of Nova's ephemeral disks (``[libvirt] images_type = rbd``).
EPHEMERAL_POOL = 'vms'
LIBVIRT_URI = 'qemu:///system'
LIBVIRT_SOCKET = '/run/libvirt/libvirt-sock'
VIRTLOGD_SOCKET = '/run/libvirt/virtlogd-sock'
KVM_DEVICE = '/dev/kvm'
INSTANCE_NAME_TEMPLATE = 'instance-%08x'
#: The names INSTANCE_NAME_TEMPLATE gives, and only those.
INSTANCE_NAME = re.compile(r'^instance-[0-9a-f]{8}$')
CELL = 'cell1'
#: Flavors made at bootstrap: name -> (vCPUs, RAM MiB, disk GB).
FLAVORS = {'tiny': (1, 256, 1)}
NOVA_SERVICES = ('nova-api', 'nova-conductor', 'nova-scheduler',
                 'nova-compute')
#: How long nova-compute may take to register its hypervisor and its
#: resource provider (about 50 s here: libvirt probes qemu at its start).
COMPUTE_TIMEOUT = 300


def services(stack):
    """The processes of this module, in start order."""
    bin_ = os.path.join(stack.venv, 'bin')

    def console_script(name):
        return svc.Service(
            name, [os.path.join(bin_, name), '--config-file',
                   nova_conf(stack, name),
                   '--log-file', stack.path('log', '%s.log' % name)],
            stack.root)

    def uwsgi(name):
        project = name.split('-')[0]
        return svc.Service(
            name, [os.path.join(bin_, 'uwsgi'), '--ini',
                   _uwsgi_ini(stack, name)],
            stack.root, port=stack.ports[project],
            health=lambda: svc.http_reason(stack.url(project) + '/'))

    return [
        svc.Service('virtlogd', [
            '/usr/sbin/virtlogd', '--config', _libvirt_conf(stack,
                                                            'virtlogd'),
            '--pid-file', stack.path('run', 'virtlogd-own.pid')],
            stack.root, health=lambda: _socket_reason(VIRTLOGD_SOCKET)),
        svc.Service('libvirtd', [
            '/usr/sbin/libvirtd', '--config', _libvirt_conf(stack,
                                                            'libvirtd'),
            '--pid-file', stack.path('run', 'libvirtd-own.pid')],
            stack.root, health=libvirt_reason),
        uwsgi('placement-api'),
        uwsgi('neutron-api'),
        uwsgi('nova-api'),
        console_script('nova-conductor'),
        console_script('nova-scheduler'),
        console_script('nova-compute'),
    ]


# -- configuration ------------------------------------------------------------

def nova_conf(stack, service=None):
    """nova-compute's file has no database: it must not touch one."""
    name = 'nova-compute.conf' if service == 'nova-compute' else 'nova.conf'
    return stack.path('etc', 'nova', name)


def _uwsgi_ini(stack, name):
    return stack.path('etc', name.split('-')[0], 'uwsgi.ini')


def _libvirt_conf(stack, daemon):
    return stack.path('etc', 'libvirt', '%s.conf' % daemon)


def _keystone_auth(stack, user):
    """Service credentials as keystoneauth's password plugin reads them."""
    return {'auth_type': 'password', 'auth_url': stack.auth_url,
            'username': user, 'password': stack.password,
            'project_name': 'service', 'user_domain_name': 'Default',
            'project_domain_name': 'Default', 'region_name': 'RegionOne'}


def cinder_nova_section(stack):
    """cinder.conf's [nova]: how Cinder calls Nova (volume events)."""
    options = _keystone_auth(stack, 'nova')
    options['interface'] = 'public'
    return options


def write_config(stack):
    _write_libvirt_conf(stack)
    _write_placement_conf(stack)
    _write_neutron_conf(stack)
    _write_nova_conf(stack)


def _write_libvirt_conf(stack):
    os.makedirs(stack.path('etc', 'libvirt'), exist_ok=True)
    # libvirt's configuration files are not INI files: key = "value".
    settings = {
        'virtlogd': {'log_outputs': '3:stderr'},
        'libvirtd': {
            'log_outputs': '3:stderr',
            # Only root may connect (the stack runs as root), without
            # polkit: there is no D-Bus system bus here.
            'unix_sock_rw_perms': '0700', 'unix_sock_ro_perms': '0700',
            'auth_unix_rw': 'none', 'auth_unix_ro': 'none'},
    }
    for daemon, options in settings.items():
        with open(_libvirt_conf(stack, daemon), 'w') as f:
            f.write('# %s of the local stack (thunder_stack/nova.py)\n'
                    % daemon)
            for key, value in options.items():
                f.write('%s = "%s"\n' % (key, value))


def _write_placement_conf(stack):
    etc = stack.path('etc', 'placement')
    ini.write(os.path.join(etc, 'placement.conf'), {
        'DEFAULT': {'log_file': stack.path('log', 'placement-app.log'),
                    'debug': True},
        'api': {'auth_strategy': 'keystone'},
        'placement_database': {'connection': stack.db_url('placement')},
        'keystone_authtoken': stack.authtoken('placement'),
    })
    _write_uwsgi_ini(stack, 'placement-api', 'placement.wsgi.api', 2,
                     'OS_PLACEMENT_CONFIG_DIR=%s' % etc)


def _write_uwsgi_ini(stack, name, module, processes, env, pythonpath=None):
    ini.write(_uwsgi_ini(stack, name), {'uwsgi': svc.uwsgi_options(
        module + ':application', stack.ports[name.split('-')[0]],
        processes=processes, env=env, pythonpath=pythonpath)})


def _project_dirs(stack, project, *state_dirs):
    """etc/PROJECT with the package's api-paste.ini; data/PROJECT/..."""
    etc = stack.path('etc', project)
    state = stack.path('data', project)
    for sub in state_dirs:
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    os.makedirs(etc, exist_ok=True)
    shutil.copy(os.path.join(stack.venv, 'etc', project, 'api-paste.ini'),
                os.path.join(etc, 'api-paste.ini'))
    return etc, state


def _write_neutron_conf(stack):
    etc, state = _project_dirs(stack, 'neutron', 'locks')
    ini.write(os.path.join(etc, 'neutron.conf'), {
        'DEFAULT': {
            'log_file': stack.path('log', 'neutron-app.log'),
            'debug': True,
            'state_path': state,
            'core_plugin': 'ml2',
            'service_plugins': '',
            'auth_strategy': 'keystone',
            'transport_url': stack.transport_url,
            'api_paste_config': os.path.join(etc, 'api-paste.ini'),
            # No DHCP agent, nothing to schedule networks to.
            'dhcp_agent_notification': False,
            'notify_nova_on_port_status_changes': True,
            'notify_nova_on_port_data_changes': True,
        },
        'database': {'connection': stack.db_url('neutron')},
        'keystone_authtoken': stack.authtoken('neutron'),
        'nova': _keystone_auth(stack, 'nova'),
        'oslo_concurrency': {'lock_path': os.path.join(state, 'locks')},
    })
    ini.write(os.path.join(etc, 'plugins', 'ml2', 'ml2_conf.ini'), {
        'ml2': {'type_drivers': 'flat', 'tenant_network_types': '',
                'mechanism_drivers': '', 'extension_drivers': ''},
        'ml2_type_flat': {'flat_networks': ''},
    })
    # thunder_stack is not installed: uWSGI imports it from the checkout.
    _write_uwsgi_ini(stack, 'neutron-api', 'thunder_stack.neutron_wsgi', 1,
                     'OS_NEUTRON_CONFIG_DIR=%s' % etc,
                     pythonpath=svc.CHECKOUT)


def _write_nova_conf(stack):
    _project_dirs(stack, 'nova', 'instances', 'locks')
    conf = full_conf(stack)
    ini.write(nova_conf(stack), conf)
    ini.write(nova_conf(stack, 'nova-compute'), compute_conf(conf))
    _write_uwsgi_ini(stack, 'nova-api', 'nova.wsgi.osapi_compute', 2,
                     'OS_NOVA_CONFIG_DIR=%s' % stack.path('etc', 'nova'))


def full_conf(stack):
    """nova.conf of the stack, ``{section: {option: value}}``."""
    etc, state = stack.path('etc', 'nova'), stack.path('data', 'nova')
    helper = os.path.join(stack.venv, 'bin', 'privsep-helper')
    conf = {
        'DEFAULT': {
            'host': HOST,
            'my_ip': '127.0.0.1',
            'state_path': state,
            'transport_url': stack.transport_url,
            'compute_driver': 'libvirt.LibvirtDriver',
            'instance_name_template': INSTANCE_NAME_TEMPLATE,
            # Many tiny TCG guests on 2 cores: the benchmarks boot up to
            # 20 one-vCPU servers at once.
            'initial_cpu_allocation_ratio': 16.0,
            # down destroys the servers' domains (nova-compute refuses to
            # start beside domains it does not know); when nova-compute
            # starts again it recreates those of the servers that ran, as
            # after a reboot of a compute host.
            'resume_guests_state_on_host_boot': True,
            # nova-compute's graceful shutdown waits this long for its
            # thread pools (which never finish: its default of 180 s
            # would outlast the stack's SIGKILL after 30 s).
            'graceful_shutdown_timeout': 5,
            'debug': True,
        },
        'api': {'auth_strategy': 'keystone'},
        'wsgi': {'api_paste_config': os.path.join(etc, 'api-paste.ini')},
        'api_database': {'connection': stack.db_url('nova_api')},
        'database': {'connection': stack.db_url('nova')},
        'keystone_authtoken': stack.authtoken('nova'),
        'service_user': dict(_keystone_auth(stack, 'nova'),
                             send_service_user_token=True),
        'placement': _keystone_auth(stack, 'nova'),
        'neutron': _keystone_auth(stack, 'nova'),
        'glance': {'region_name': 'RegionOne'},
        # A server and its volumes in one zone: a peer-mode volume lives
        # on its node, the zone of its own of an emulated compute node
        # (thunder_stack/nodes.py). The API then schedules a server booted
        # from an existing volume into the volume's zone.
        'cinder': dict(_keystone_auth(stack, 'nova'),
                       os_region_name='RegionOne',
                       catalog_info='volumev3::publicURL',
                       cross_az_attach=False),
        'libvirt': {'virt_type': 'qemu', 'connection_uri': LIBVIRT_URI,
                    # Ephemeral disks in Ceph: Nova clones images of
                    # Glance's rbd store (their direct_url) into this
                    # pool. Servers booted from volumes are unaffected.
                    'images_type': 'rbd',
                    'images_rbd_pool': EPHEMERAL_POOL,
                    # No rbd_user: with one, Nova writes an <auth> of the
                    # secret rbd_secret_uuid into the domain (the local
                    # Ceph has no cephx, hence no secret) and librbd
                    # connects as client.admin anyway.
                    'images_rbd_ceph_conf': stack.ceph_conf},
        'vnc': {'enabled': False},
        'conductor': {'workers': 1},
        'scheduler': {'workers': 1,
                      # The scheduler maps new compute hosts to cell1
                      # (what "nova-manage cell_v2 discover_hosts" does).
                      'discover_hosts_in_cells_interval': 5},
        'oslo_concurrency': {'lock_path': os.path.join(state, 'locks')},
        'oslo_messaging_rabbit': {'heartbeat_timeout_threshold': 0},
        # Privileged helpers: the virtualenv's, we are root already.
        'nova_sys_admin': {'helper_command': helper},
        'privsep_osbrick': {'helper_command': helper},
        'os_brick': {'lock_path': os.path.join(state, 'locks')},
    }
    return conf


def compute_conf(conf):
    """nova-compute's sections of the full ``conf``: no database."""
    return {section: dict(options) for section, options in conf.items()
            if section not in ('database', 'api_database',
                               'keystone_authtoken')}


# -- up -----------------------------------------------------------------------

def up(stack):
    """Configure and start everything of this module; idempotent."""
    write_config(stack)
    files = {
        'virtlogd': [_libvirt_conf(stack, 'virtlogd')],
        'libvirtd': [_libvirt_conf(stack, 'libvirtd')],
        'placement-api': [stack.path('etc', 'placement', 'placement.conf'),
                          _uwsgi_ini(stack, 'placement-api')],
        'neutron-api': [stack.path('etc', 'neutron', 'neutron.conf'),
                        stack.path('etc', 'neutron', 'plugins', 'ml2',
                                   'ml2_conf.ini'),
                        _uwsgi_ini(stack, 'neutron-api')],
    }
    for name in NOVA_SERVICES:
        files[name] = [nova_conf(stack, name)]
    files['nova-api'].append(_uwsgi_ini(stack, 'nova-api'))
    for name, paths in files.items():
        stack.restart_if_config_changed(name, paths)
    _libvirt(stack)
    _sync_databases(stack)
    _once(stack, 'nova-keystone-bootstrapped', 'nova-keystone')
    for name in ('placement-api', 'neutron-api', 'nova-api'):
        stack.start(name, timeout=180)
    stack.start('nova-conductor', timeout=60)
    stack.start('nova-scheduler', timeout=60)
    if stack.service('nova-compute').pid() is None:
        remove_domains(stack)
    stack.start('nova-compute', timeout=60)
    _once(stack, 'nova-flavors-created', 'flavors')
    _wait_compute(stack)


def _once(stack, marker, what):
    """``thunder_stack.bootstrap WHAT``, unless done already."""
    path = stack.path('data', marker)
    if not os.path.exists(path):
        stack.bootstrap(what)
        with open(path, 'w') as f:
            f.write('ok\n')


def _kvm_device():
    """/dev/kvm as Debian's udev rules leave it: group kvm, mode 0660.

    Without udev (these machines) it is root's alone. libvirt runs qemu as
    libvirt-qemu (group kvm): its qemu probe finds KVM, but before each use
    of its cached qemu capabilities it checks whether that user may open
    /dev/kvm, finds it may not, throws the cache away and probes qemu again
    (4 to 12 s, several times per call: a server took a minute to be
    defined). Guests still run under TCG (``virt_type = qemu``).
    """
    try:
        st = os.stat(KVM_DEVICE)
        gid = grp.getgrnam('kvm').gr_gid
    except (OSError, KeyError):
        return
    if st.st_gid != gid or st.st_mode & 0o060 != 0o060:
        svc.log('giving %s to group kvm, mode 0660 (as udev would)'
                % KVM_DEVICE)
        os.chown(KVM_DEVICE, -1, gid)
        os.chmod(KVM_DEVICE, 0o660)


def _libvirt(stack):
    _kvm_device()
    for name, sock in (('virtlogd', VIRTLOGD_SOCKET),
                       ('libvirtd', LIBVIRT_SOCKET)):
        if stack.service(name).pid() is None and \
                _socket_reason(sock) is None:
            raise svc.StackError(
                '%s answers on %s but this stack did not start it: libvirt '
                'runs one %s per machine; stop that one (or the other '
                'stack) first' % (name, sock, name))
    stack.start('virtlogd', timeout=30)
    # libvirtd answers its first call about 12 s after it starts here.
    stack.start('libvirtd', timeout=90)


def _sync_databases(stack):
    """Schemas, cell0 and cell1; each step only once (markers in data/)."""
    bin_ = os.path.join(stack.venv, 'bin')
    nova_manage = [os.path.join(bin_, 'nova-manage'), '--config-file',
                   nova_conf(stack)]
    steps = [
        ('placement-db-synced', 'the Placement database',
         [[os.path.join(bin_, 'placement-manage'), '--config-dir',
           stack.path('etc', 'placement'), 'db', 'sync']]),
        ('neutron-db-synced', 'the Neutron database',
         [[os.path.join(bin_, 'neutron-db-manage'), '--config-file',
           stack.path('etc', 'neutron', 'neutron.conf'), '--config-file',
           stack.path('etc', 'neutron', 'plugins', 'ml2', 'ml2_conf.ini'),
           'upgrade', 'head']]),
        ('nova-db-synced', "Nova's databases and cells",
         [nova_manage + ['api_db', 'sync'],
          nova_manage + ['cell_v2', 'map_cell0', '--database_connection',
                         stack.db_url('nova_cell0')],
          None,     # cell1, below: create_cell is not idempotent
          nova_manage + ['db', 'sync'],
          nova_manage + ['db', 'online_data_migrations']]),
    ]
    for marker, what, commands in steps:
        path = stack.path('data', marker)
        if os.path.exists(path):
            continue
        svc.log('creating %s' % what)
        for cmd in commands:
            if cmd is None:
                _create_cell(stack, nova_manage)
            else:
                svc.run(cmd, timeout=900)
        with open(path, 'w') as f:
            f.write('ok\n')


def _create_cell(stack, nova_manage):
    cells = svc.run(nova_manage + ['cell_v2', 'list_cells', '--verbose'])
    if ' %s ' % CELL in cells.stdout:
        return
    svc.run(nova_manage + ['cell_v2', 'create_cell', '--name', CELL,
                           '--database_connection', stack.db_url('nova'),
                           '--transport-url', stack.transport_url])


def _wait_compute(stack):
    """Until servers can be placed on the compute host (or its timeout)."""
    compute = stack.service('nova-compute')
    try:
        out = stack.bootstrap('wait-compute', HOST, str(compute.pid()),
                              str(COMPUTE_TIMEOUT),
                              timeout=COMPUTE_TIMEOUT + 60)
    except svc.StackError as e:
        raise svc.StackError('%s\nsee %s:\n%s' % (
            e, compute.log_file, svc.tail(compute.log_file, 30)))
    svc.log(out.strip())


# -- libvirt ------------------------------------------------------------------

def _socket_reason(path):
    """None if something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
        except OSError as e:
            return '%s: %s' % (path, e.strerror or e)
    return None


def libvirt_uri(sock=LIBVIRT_SOCKET):
    """qemu:///system, through ``sock`` when it is not the system's."""
    if sock == LIBVIRT_SOCKET:
        return LIBVIRT_URI
    return '%s?socket=%s' % (LIBVIRT_URI, sock)


def _virsh(*args, check=True, timeout=60, sock=LIBVIRT_SOCKET):
    return svc.run(['virsh', '--connect', libvirt_uri(sock), '--quiet'] +
                   list(args), check=check, timeout=timeout)


def libvirt_reason(sock=LIBVIRT_SOCKET):
    """None if the libvirtd of ``sock`` answers."""
    reason = _socket_reason(sock)
    if reason:
        return reason
    try:
        result = _virsh('version', check=False, timeout=10, sock=sock)
    except subprocess.TimeoutExpired:
        return 'virsh version: no answer within 10 s'
    if result.returncode:
        return 'virsh version: %s' % result.stderr.strip()[-200:]
    return None


def domains(sock=LIBVIRT_SOCKET):
    """Names of the libvirt domains, running or not; [] without libvirt."""
    if _socket_reason(sock):
        return []
    out = _virsh('list', '--all', '--name', sock=sock).stdout
    return [name.strip() for name in out.splitlines() if name.strip()]


def stack_domains(sock=LIBVIRT_SOCKET):
    return [name for name in domains(sock) if INSTANCE_NAME.match(name)]


def remove_domains(stack, sock=LIBVIRT_SOCKET):
    """Destroy and undefine the stack's domains (Nova's instance names).

    Other domains are left alone; nova-compute would refuse to start as a
    new service beside them, so they are an error here.
    """
    for name in stack_domains(sock):
        svc.log('removing the libvirt domain %s' % name)
        _virsh('destroy', name, check=False, sock=sock)
        # --nvram: a UEFI guest's variables go with its definition.
        _virsh('undefine', '--nvram', name, check=False, sock=sock)
    left = stack_domains(sock)
    if left:
        raise svc.StackError('libvirt domains %s could not be removed'
                             % ', '.join(left))
    others = domains(sock)
    if others:
        raise svc.StackError(
            'libvirt holds domains that are not the stack\'s (%s): '
            'nova-compute refuses to start beside them'
            % ', '.join(others))


# -- down and status ----------------------------------------------------------

def before_stop(stack, service):
    """Called by ``down`` before it stops ``service``."""
    if service.name == 'libvirtd' and service.pid() is not None:
        # nova-compute is stopped already (it starts after libvirtd).
        remove_domains(stack)


def settings(stack):
    """What thunder_stack.bootstrap needs to know about this module."""
    return {'nova_url': stack.url('nova'),
            'placement_url': stack.url('placement'),
            'neutron_url': stack.url('neutron'),
            'flavors': FLAVORS}


def status_rows(stack):
    """The compute host as Nova and Placement see it."""
    if stack.service('nova-api').pid() is None:
        return []
    row = {'name': '  compute %s' % HOST, 'pid': None, 'port': None}
    try:
        status = json.loads(stack.bootstrap('compute-status', HOST,
                                            timeout=120))
    except (svc.StackError, ValueError) as e:
        row.update(state='unknown', reason=str(e).splitlines()[-1][:80])
        return [row]
    row['state'] = 'ok' if status['ok'] else 'unhealthy'
    row['reason'] = status['reason']
    return [row]
