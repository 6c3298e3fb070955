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

"""The Debian packages the guest image is made of: found, fetched, unpacked.

apt's candidates (``apt-cache show``), downloaded once with ``apt-get
download`` and checked against apt's SHA256, unpacked with ``dpkg-deb
-x``: no debootstrap, no chroot, no root.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile

from thunder_stack.guest import common

KERNEL_PACKAGE = 'linux-image-cloud-amd64'
#: Debian packages the image is made of (the kernel's metapackage stands
#: for the versioned package it depends on).
PACKAGES = (KERNEL_PACKAGE, 'busybox-static', 'grub-pc-bin', 'grub-common')


def parse_apt_show(text):
    """The records ``apt-cache show`` printed: [{field: value}]."""
    records, fields, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                records.append(fields)
            fields, key = {}, None
        elif line[0] in ' \t' and key:
            fields[key] += '\n' + line.strip()
        else:
            key, _sep, value = line.partition(':')
            fields[key] = value.strip()
    if fields:
        records.append(fields)
    return records


def _apt_show(names):
    """{package: fields} of the candidates apt knows among ``names``."""
    # Exits non-zero if it knows one of them not, having printed the rest.
    proc = common.run(['apt-cache', 'show', '--no-all-versions'] +
                      list(names), check=False)
    return dict((r['Package'], r) for r in parse_apt_show(proc.stdout)
                if 'Package' in r and 'Version' in r)


def kernel_package(fields):
    """The versioned kernel package the kernel metapackage depends on."""
    for dep in fields.get('Depends', '').split(','):
        name = dep.split()[0] if dep.split() else ''
        if re.match(r'linux-image-\d', name):
            return name
    raise common.GuestError('%s depends on no versioned linux-image '
                            'package: %r' % (fields.get('Package'),
                                             fields.get('Depends')))


def apt_fingerprint(roots=('/var/lib/apt/lists', '/etc/apt')):
    """A digest of what apt's candidates depend on: lists, sources, pins."""
    digest = hashlib.sha256()
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != 'partial')
            for name in sorted(set(names) - {'lock'}):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                digest.update(('%s %d %d\n' % (
                    path, st.st_size, st.st_mtime_ns)).encode())
    return digest.hexdigest()


def resolve_packages(memo=None, updated=False):
    """[{'name', 'version', 'sha256'}] of PACKAGES as apt would fetch them.

    ``memo``: a JSON file that keeps the answer while apt's lists and
    configuration are unchanged (``apt-cache`` takes seconds). Runs
    ``apt-get update`` once (as root) if apt lacks a package.
    """
    fingerprint = apt_fingerprint()
    try:
        with open(memo) as f:
            kept = json.load(f)
        if kept['fingerprint'] == fingerprint and kept['wanted'] == list(
                PACKAGES):
            return kept['packages']
    except (TypeError, OSError, ValueError, KeyError):
        pass
    known = _apt_show(PACKAGES)
    missing = [name for name in PACKAGES if name not in known]
    if not missing:
        kernel = kernel_package(known[KERNEL_PACKAGE])
        known.update(_apt_show([kernel]))
        missing = [] if kernel in known else [kernel]
    if missing:
        if not updated and os.geteuid() == 0:
            common.log('apt knows no %s: apt-get update' % ', '.join(
                missing))
            common.run(['apt-get', 'update', '-q'])
            return resolve_packages(memo, updated=True)
        raise common.GuestError('apt knows no package %s: run apt-get '
                                'update (Debian 12, main)' % ', '.join(
                                    missing))
    resolved = [{'name': name, 'version': known[name]['Version'],
                 'sha256': known[name].get('SHA256', '')}
                for name in [kernel] + list(PACKAGES[1:])]
    if memo:
        common.write_json(memo, {'fingerprint': fingerprint,
                                 'wanted': list(PACKAGES),
                                 'packages': resolved})
    return resolved


def fetch_debs(debs_dir, packages):
    """Paths of the packages' .deb files, downloaded once into debs_dir."""
    os.makedirs(debs_dir, exist_ok=True)
    paths = []
    for pkg in packages:
        path = os.path.join(debs_dir, '%s_%s.deb' % (
            pkg['name'], pkg['version'].replace(':', '%3a')))
        if not os.path.exists(path):
            _download(pkg, path)
        paths.append(path)
    return paths


def _download(pkg, path):
    """apt-get download the package into ``path``, checked, or nothing."""
    wanted = '%s=%s' % (pkg['name'], pkg['version'])
    common.log('apt-get download %s' % wanted)
    tmp = tempfile.mkdtemp(prefix='.download-', dir=os.path.dirname(path))
    try:
        proc = common.run(['apt-get', 'download', '-q', wanted], cwd=tmp,
                          check=False)
        got = glob.glob(os.path.join(tmp, '*.deb'))
        if proc.returncode or len(got) != 1:
            raise common.GuestError(
                'apt-get download %s failed (a stale apt list? run apt-get '
                'update): %s' % (wanted, (proc.stderr or proc.stdout)
                                 .strip()[-1000:]))
        if pkg['sha256'] and common.file_sha256(got[0]) != pkg['sha256']:
            raise common.GuestError('the downloaded %s does not match the '
                                    'SHA256 apt lists for it' % wanted)
        os.rename(got[0], path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpack(debs, dest):
    """Unpack the .deb files into ``dest``; the kernel's version."""
    for deb in debs:
        common.run(['dpkg-deb', '-x', deb, dest])
    kernels = sorted(k[len('vmlinuz-'):] for k in os.listdir(
        os.path.join(dest, 'boot')) if k.startswith('vmlinuz-'))
    if len(kernels) != 1:
        raise common.GuestError('expected one kernel in the packages, found '
                                '%s' % kernels)
    return kernels[0]
