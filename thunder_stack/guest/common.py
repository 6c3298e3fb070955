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

"""What the guest image's modules share: errors, commands, host tools."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

MiB = 1024 * 1024
GiB = 1024 * MiB


class GuestError(RuntimeError):
    """The image could not be built or booted; the message says why."""


def log(message):
    print('guest: %s' % message, file=sys.stderr, flush=True)


def run(cmd, check=True, **kwargs):
    """Run a command; GuestError with its output's tail if it fails."""
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          **kwargs)
    if check and proc.returncode:
        raise GuestError('%s failed (%d): %s' % (
            ' '.join(str(c) for c in cmd), proc.returncode,
            (proc.stderr or proc.stdout).strip()[-2000:]))
    return proc


def raw_to_qcow2(raw, path):
    """``raw`` converted to qcow2 at ``path`` (qemu-img convert).

    Through a temporary file beside it: ``path`` appears whole or not at
    all. GuestError if qemu-img fails.
    """
    tmp = path + '.tmp'
    try:
        run(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', raw, tmp])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _present(tool):
    return os.path.exists(tool) if os.path.isabs(tool) else bool(
        shutil.which(tool))


def ensure_tools(tools, say=log):
    """Install the Debian packages of missing ``tools``.

    ``tools``: {command, or absolute path of a file: Debian package}.
    Only as root; otherwise GuestError naming the packages.
    """
    missing = sorted(set(pkg for tool, pkg in tools.items()
                         if not _present(tool)))
    if not missing:
        return
    if os.geteuid():
        raise GuestError('missing host tools: apt-get install %s' %
                         ' '.join(missing))
    say('installing the host tools\' Debian packages: apt-get install %s' %
        ' '.join(missing))
    run(['apt-get', 'install', '-y', '-q', '--no-install-recommends'] +
        missing, env=dict(os.environ, DEBIAN_FRONTEND='noninteractive'))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(4 * MiB), b''):
            digest.update(block)
    return digest.hexdigest()


def write_json(path, doc):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)
