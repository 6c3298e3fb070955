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


"""Install what the local stack runs: Debian packages and a virtualenv.

Debian packages (MariaDB, RabbitMQ, Ceph, qemu, libvirt) with apt-get; the
OpenStack services, this checkout (editable) and Ceph's bindings into
``venv/`` of the stack directory with pip. Both steps do nothing when
everything is there already (the virtualenv keeps a marker of what it was
installed from).
"""

import json
import os
import shutil
import subprocess
import sys

from thunder_stack import layout
from thunder_stack import nova as nova_mod
from thunder_stack import services as svc

APT_PACKAGES = ('mariadb-server', 'rabbitmq-server', 'ceph-mon', 'ceph-osd',
                'ceph-mgr', 'ceph-common', 'python3-rados', 'python3-rbd',
                'qemu-utils', 'fuse3',
                # thunder-volume-server, built from source by devstack's
                # configure_thunder_cache
                'gcc', 'make', 'pkg-config', 'libfuse3-dev',
                'zlib1g-dev') + nova_mod.APT_PACKAGES
PIP_PACKAGES = ('cinder==29.0.0', 'glance==33.0.0', 'keystone==30.0.0',
                'glance-store>=5.7,<6', 'os-brick>=7.1', 'python-cinderclient',
                'python-glanceclient', 'python-openstackclient', 'uwsgi',
                'PyMySQL', 'mfusepy>=3.1',
                # the benchmarks' plots (demo --bulk-boot, --nova ...)
                'matplotlib') + nova_mod.PIP_PACKAGES


def install(stack):
    """Debian packages, then the virtualenv of ``stack``."""
    _install_apt()
    _install_venv(stack)


def _install_apt():
    missing = [p for p in APT_PACKAGES if not _dpkg_installed(p)]
    if not missing:
        return
    svc.log('installing Debian packages: %s' % ' '.join(missing))
    sudo = [] if os.geteuid() == 0 else ['sudo']
    svc.run(sudo + ['apt-get', 'update', '-qq'])
    # policy-rc.d: do not let the packages start system-wide daemons;
    # the stack runs its own MariaDB and RabbitMQ.
    policy = '/usr/sbin/policy-rc.d'
    made_policy = False
    if not os.path.exists(policy) and os.geteuid() == 0:
        with open(policy, 'w') as f:
            f.write('#!/bin/sh\nexit 101\n')
        os.chmod(policy, 0o755)
        made_policy = True
    try:
        svc.run(sudo + ['apt-get', 'install', '-y', '-qq',
                        '--no-install-recommends'] + missing,
                env={'DEBIAN_FRONTEND': 'noninteractive'}, timeout=1800)
    finally:
        if made_policy:
            os.unlink(policy)


def _install_venv(stack):
    """The services and this checkout's packages, editable.

    thunder_stack itself is not one of them (setup.cfg): what the
    virtualenv runs of it (bootstrap, the devstack shim, Neutron's WSGI
    module) is given the checkout's path (:data:`layout.CHECKOUT`).
    """
    checkout = layout.CHECKOUT
    marker = stack.path('venv', '.thunder-installed')
    wanted = json.dumps({'pip': PIP_PACKAGES,
                         'setup.cfg': layout.read_file(os.path.join(
                             checkout, 'setup.cfg'))})
    if layout.read_file(marker) == wanted and os.path.exists(stack.python):
        return
    if not os.path.exists(stack.python):
        base = os.environ.get('THUNDER_STACK_PYTHON') or shutil.which(
            'python3.11') or sys.executable
        svc.log('creating the virtualenv %s with %s' % (stack.venv, base))
        svc.run([base, '-m', 'venv', stack.venv])
    pip = [stack.python, '-m', 'pip', 'install', '-q']
    svc.log('installing OpenStack services into %s (pip, a few minutes '
            'the first time)' % stack.venv)
    svc.run(pip + list(PIP_PACKAGES), timeout=3600)
    svc.run(pip + ['--no-deps', '-e', checkout], timeout=600)
    svc.run([os.path.join(checkout, 'tools', 'link-ceph-bindings'),
             stack.python])
    with open(marker, 'w') as f:
        f.write(wanted)


def _dpkg_installed(package):
    result = subprocess.run(['dpkg-query', '-W', '-f=${Status}', package],
                            capture_output=True, text=True)
    return 'install ok installed' in result.stdout
