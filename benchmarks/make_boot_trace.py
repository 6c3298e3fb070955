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

"""Record the block reads of a real Linux first boot, for the benchmarks.

Run as root::

    tox -e bench -- benchmarks/make_boot_trace.py \
        --out benchmarks/data/boot-trace.json
        [--image /var/tmp/thunder-boot.raw] [--size-mib 1024]

What it does:

1. Builds a raw disk image (default 1 GiB, one MBR partition from 1 MiB,
   ext4) whose root file system is Debian bookworm made by ``debootstrap
   --variant=minbase`` plus the packages of a small cloud image (Debian's
   cloud kernel, systemd, udev, openssh-server, python3, perl, ...). The
   image is left as a cloud image is shipped: apt's caches emptied, no SSH
   host keys, an empty ``/etc/machine-id``, free blocks trimmed, so a few
   hundred MB of the 1 GiB hold data.
2. Installs a first-boot service that does what cloud-init does on a first
   boot, with real programs: generates the SSH host keys, sets the host
   name, ``ldconfig``, lists the packages (``dpkg -l``), imports a set of
   python3 and perl modules, reads the first 2000 files under
   ``/usr/share`` (sorted), writes a few files, ``sync``, then powers the
   guest off.
3. Boots a copy of the image (the volume a VM would get; the image stays as
   made) under ``qemu-system-x86_64`` with the disk set up as libvirt sets
   up Nova's volumes (virtio-blk, raw, ``cache=none``, ``aio=threads``),
   ``-m 1024``, KVM if it boots, TCG otherwise. It boots from the disk as
   a cloud image does: SeaBIOS runs syslinux's MBR, extlinux on the
   partition loads Debian's kernel and initramfs from ``/boot``, so the
   trace starts at the MBR. With ``--no-boot-loader`` qemu is handed the
   same kernel and initramfs (``-kernel``, ``-initrd``) and the trace
   covers the root file system only.
4. Records every read qemu's block layer makes on the disk (the
   ``blk_co_preadv`` trace event of Debian's qemu, ``log`` backend with
   time stamps), i.e. what the node cache would have to serve, in order,
   with the time since qemu started; the writes too (they go to the
   volume's own layer and need no fetch).
5. Writes the JSON trace (``--out``) with the image's metadata and a
   summary: reads, distinct bytes read (the working set), total bytes read,
   1 MiB chunks touched.

Debian packages on the host (installed with apt-get when missing):
``debootstrap``, ``qemu-system-x86``, ``extlinux`` (and its
``syslinux-common``, the MBR), ``e2fsprogs``, ``mount`` (losetup); the
partition table is written by ``thunder_stack.guest.disk.mbr``. If
debootstrap cannot reach the mirror the run stops with its error (apt's
mirror is the same one, so there is no offline fallback to fall back on).

``--reuse-image`` boots the image an earlier run left at ``--image``
again (its metadata is in ``IMAGE.json``, the consoles of the boots in
``IMAGE.console-ACCEL.log``).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import blockdev_mechanisms as bm
from thunder_stack.guest import common as guest_common
from thunder_stack.guest import disk as guest_disk
from thunder_stack.guest import qemu as guest_qemu

MiB = bm.MiB
CHUNK = bm.CHUNK      # thunder_common.manifest.DEFAULT_CHUNK_SIZE
PART_START = guest_disk.PART_START     # the partition's offset in the disk
SUITE = 'bookworm'
MIRROR = 'http://deb.debian.org/debian'
# On top of minbase: what a small Debian cloud image runs on its first
# boot (Debian's own cloud images add cloud-init, which needs a metadata
# service; the first-boot service below does its local part).
PACKAGES = ('linux-image-cloud-amd64', 'systemd-sysv', 'udev', 'dbus',
            'openssh-server', 'python3', 'perl', 'iproute2', 'procps',
            'kmod', 'ca-certificates', 'sudo', 'less', 'cron', 'logrotate',
            'netbase', 'ifupdown', 'isc-dhcp-client', 'e2fsprogs')
MBR = '/usr/lib/syslinux/mbr/mbr.bin'     # syslinux-common
HOST_TOOLS = {'debootstrap': 'debootstrap',
              'qemu-system-x86_64': 'qemu-system-x86',
              'mkfs.ext4': 'e2fsprogs',
              'losetup': 'mount', 'fstrim': 'util-linux',
              'extlinux': 'extlinux', MBR: 'syslinux-common'}
CMDLINE = 'root=LABEL=root ro console=ttyS0 panic=-1'
MARK = 'THUNDER-FIRSTBOOT'

FIRSTBOOT = r'''#!/bin/sh
# First boot of a cloud image, done by hand: what cloud-init does locally
# before (early) and after (final) the SSH server starts. Written by
# benchmarks/make_boot_trace.py.
say() { echo "%(mark)s-$1" > /dev/ttyS0; }
if [ "$1" = early ]; then
    say START
    ssh-keygen -A
    echo thunder-vm > /etc/hostname
    hostname thunder-vm
    exit 0
fi
ldconfig
dpkg -l > /var/tmp/dpkg-l.txt
dpkg -S /bin/sh > /dev/null
python3 -c 'import json, email.parser, http.client, ssl, sqlite3, \
    logging.handlers, urllib.request, xml.etree.ElementTree, asyncio, \
    subprocess, argparse, hashlib, uuid, decimal; print("python ok")'
perl -MPOSIX -MFile::Find -MGetopt::Long -MData::Dumper -MIO::Socket \
    -e 'print "perl ok\n"'
find /usr/share -type f | sort | head -n 2000 | xargs cat > /dev/null
ip addr > /var/tmp/ip-addr.txt
ps aux > /var/tmp/ps.txt
journalctl -b --no-pager > /var/tmp/journal.txt
mkdir -p /home/debian
head -c 4194304 /dev/urandom > /home/debian/data.bin
sha256sum /home/debian/data.bin > /home/debian/data.bin.sha256
sync
say DONE
systemctl poweroff --no-block
''' % {'mark': MARK}

# Two units, like cloud-init's: host keys before sshd, the rest after.
EARLY_UNIT = '''[Unit]
Description=First boot, early (benchmarks/make_boot_trace.py)
DefaultDependencies=no
After=local-fs.target systemd-remount-fs.service
Before=ssh.service sysinit.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/thunder-firstboot early
StandardOutput=journal+console

[Install]
WantedBy=sysinit.target
'''

FINAL_UNIT = '''[Unit]
Description=First boot, final (benchmarks/make_boot_trace.py)
After=multi-user.target ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/thunder-firstboot final
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
'''

TRACE_RE = re.compile(
    r'^\d+@(\d+\.\d+):blk_co_(preadv|pwritev) blk (\S+) bs \S+ '
    r'offset (\d+) bytes (\d+) flags (\S+)')


def log(msg):
    print('.. %s' % msg, file=sys.stderr, flush=True)


run = bm.run


def ensure_tools():
    guest_common.ensure_tools(HOST_TOOLS, say=log)


# -- the image -------------------------------------------------------------


def loop_attach(cleanup, image, size):
    """A loop device over the partition (offset; no partition scanning)."""
    dev = run(['losetup', '--find', '--show', '--offset', str(PART_START),
               '--sizelimit', str(size - PART_START), image]).stdout.strip()
    cleanup.callback(run, ['losetup', '-d', dev], False)
    return dev


def mount(cleanup, dev, mountpoint):
    os.makedirs(mountpoint, exist_ok=True)
    run(['mount', dev, mountpoint])
    cleanup.callback(umount, mountpoint)


def umount(mountpoint):
    if os.path.ismount(mountpoint):
        if run(['umount', mountpoint], check=False).returncode:
            run(['umount', '-l', mountpoint], check=False)


def write(path, text, mode=0o644):
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)


def build_image(args, workdir):
    """Make args.image; returns its metadata (also in args.image.json).

    With a boot loader, extlinux on the ext4 partition and syslinux's MBR
    boot the kernel and initramfs from the image's /boot, as a cloud image
    boots; the kernel and initramfs are also copied next to the image for
    ``--no-boot-loader`` (qemu's -kernel and -initrd).
    """
    size = args.size_mib * MiB
    tmp = args.image + '.part'
    if os.path.exists(tmp):
        os.unlink(tmp)
    with open(tmp, 'wb') as f:
        f.truncate(size)
    inner = bm.Cleanup()
    try:
        dev = loop_attach(inner, tmp, size)
        # Inode tables and journal written now, not by the guest's kernel
        # in the background of the boot; no 64bit feature, which
        # extlinux 6.04 cannot read (a 1 GiB file system does not need it).
        run(['mkfs.ext4', '-q', '-L', 'root', '-O', '^64bit', '-E',
             'lazy_itable_init=0,lazy_journal_init=0', dev])
        root = os.path.join(workdir, 'root')
        mount(inner, dev, root)
        log('debootstrap --variant=minbase %s (a few minutes)' % SUITE)
        started = time.monotonic()
        run(['debootstrap', '--variant=minbase',
             '--include=' + ','.join(PACKAGES), SUITE, root, args.mirror])
        log('debootstrap took %.0f s' % (time.monotonic() - started))
        configure(root)
        packages = run(['chroot', root, 'dpkg-query', '-W', '-f',
                        '${Package}=${Version}\n']).stdout.split()
        boot = os.path.join(root, 'boot')
        kernels = sorted(k for k in os.listdir(boot)
                         if k.startswith('vmlinuz-'))
        if not kernels:
            raise RuntimeError('no kernel in the image\'s /boot')
        version = kernels[-1][len('vmlinuz-'):]
        kernel = os.path.join(args.image + '.vmlinuz')
        initrd = os.path.join(args.image + '.initrd')
        shutil.copyfile(os.path.join(boot, kernels[-1]), kernel)
        shutil.copyfile(os.path.join(boot, 'initrd.img-' + version), initrd)
        conf = os.path.join(boot, 'extlinux')
        os.makedirs(conf, exist_ok=True)
        write(os.path.join(conf, 'extlinux.conf'),
              'SERIAL 0 115200\nDEFAULT debian\nPROMPT 0\nTIMEOUT 0\n'
              'LABEL debian\n  KERNEL /boot/vmlinuz-%s\n'
              '  INITRD /boot/initrd.img-%s\n  APPEND %s\n' % (
                  version, version, CMDLINE))
        run(['extlinux', '--install', conf])
        # Deleted blocks are free once the journal commits: sync first.
        run(['sync', '-f', root])
        run(['fstrim', root])
        st = os.statvfs(root)
        fs_used = (st.f_blocks - st.f_bfree) * st.f_frsize
    finally:
        inner.close()
    with open(MBR, 'rb') as f:      # syslinux's boot code, one partition
        mbr = guest_disk.mbr(f.read(), PART_START, size - PART_START)
    with open(tmp, 'r+b') as f:
        f.write(mbr)
    os.rename(tmp, args.image)
    meta = {'packages': packages, 'kernel_version': version,
            'fs_used_bytes': fs_used}
    with open(args.image + '.json', 'w') as f:
        json.dump(meta, f)
    return meta


def configure(root):
    """Make the tree a cloud image as shipped, with a first-boot service."""
    write(os.path.join(root, 'etc/fstab'),
          'LABEL=root / ext4 defaults,errors=remount-ro 0 1\n')
    write(os.path.join(root, 'etc/hostname'), 'localhost\n')
    write(os.path.join(root, 'etc/hosts'),
          '127.0.0.1 localhost\n::1 localhost ip6-localhost\n')
    # systemd makes a machine id on the first boot, as in cloud images.
    write(os.path.join(root, 'etc/machine-id'), '')
    dbus_id = os.path.join(root, 'var/lib/dbus/machine-id')
    if os.path.lexists(dbus_id):
        os.unlink(dbus_id)
    write(os.path.join(root, 'etc/network/interfaces'),
          'source /etc/network/interfaces.d/*\n'
          'auto lo\niface lo inet loopback\n')
    # The host keys are made on the first boot (cloud-init deletes them).
    sshdir = os.path.join(root, 'etc/ssh')
    for name in os.listdir(sshdir):
        if name.startswith('ssh_host_'):
            os.unlink(os.path.join(sshdir, name))
    write(os.path.join(root, 'usr/local/sbin/thunder-firstboot'),
          FIRSTBOOT, 0o755)
    for name, unit, target in (('early', EARLY_UNIT, 'sysinit'),
                               ('final', FINAL_UNIT, 'multi-user')):
        path = 'etc/systemd/system/thunder-firstboot-%s.service' % name
        write(os.path.join(root, path), unit)
        wants = os.path.join(root, 'etc/systemd/system/%s.target.wants' % (
            target))
        os.makedirs(wants, exist_ok=True)
        link = os.path.join(wants, os.path.basename(path))
        if not os.path.lexists(link):
            os.symlink('/' + path, link)
    run(['chroot', root, 'apt-get', 'clean'])
    for sub in ('var/lib/apt/lists', 'var/log'):
        base = os.path.join(root, sub)
        for dirpath, dirnames, filenames in os.walk(base):
            for name in filenames:
                if name != 'lock':
                    os.unlink(os.path.join(dirpath, name))


# -- the boot --------------------------------------------------------------


class Console(threading.Thread):
    """Reads the guest's serial console; keeps each line's arrival time."""

    def __init__(self, stream, path, t0):
        super().__init__(daemon=True)
        self.stream = stream
        self.out = open(path, 'w')
        self.t0 = t0
        self.last = time.time()
        self.marks = {}
        self.first_output = None

    def run(self):
        for raw in iter(self.stream.readline, b''):
            now = time.time()
            self.last = now
            line = raw.decode(errors='replace').rstrip('\r\n')
            if self.first_output is None and line.strip():
                self.first_output = now - self.t0
            self.out.write('[%9.3f] %s\n' % (now - self.t0, line))
            self.out.flush()
            for mark in ('START', 'DONE'):
                if '%s-%s' % (MARK, mark) in line and mark not in self.marks:
                    self.marks[mark] = now - self.t0
            for check in ('python ok', 'perl ok'):
                if line.startswith(check) or ' %s' % check in line:
                    self.marks[check] = now - self.t0
            if 'Linux version' in line and 'kernel' not in self.marks:
                self.marks['kernel'] = now - self.t0
                self.kernel_banner = line.split('Linux version', 1)[1]
        self.out.close()


def boot(args, accel, kernel, initrd, volume, workdir):
    """Boot the volume once; returns a dict, or raises if the boot failed."""
    trace = os.path.join(workdir, 'trace-%s.log' % accel)
    console_log = os.path.join(workdir, 'console-%s.log' % accel)
    stderr_log = os.path.join(workdir, 'qemu-%s.log' % accel)
    events = os.path.join(workdir, 'events')
    for path in (trace, console_log):
        if os.path.exists(path):
            os.unlink(path)
    # One -trace option: a later one would reset the output file.
    write(events, 'blk_co_preadv\nblk_co_pwritev\n')
    cmd = guest_qemu.qemu_command(accel, volume) + [
        '-trace', 'events=%s,file=%s' % (events, trace)]
    if args.no_boot_loader:
        cmd += ['-kernel', kernel, '-initrd', initrd, '-append', CMDLINE]
    log('boot under %s: %s' % (accel, ' '.join(cmd)))
    t0 = time.time()
    with open(stderr_log, 'wb') as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
    console = Console(proc.stdout, console_log, t0)
    console.start()
    failure = None
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.time()
            if now - t0 > args.timeout:
                failure = 'no power-off after %d s' % args.timeout
            elif console.first_output is None and now - t0 > 60:
                failure = 'no console output in 60 s'
            elif now - console.last > args.stall:
                failure = 'no console output for %d s' % args.stall
            if failure:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.time() - t0
    console.join(10)
    with open(stderr_log, errors='replace') as f:
        stderr = f.read()
    kept = '%s.console-%s.log' % (args.image, accel)
    shutil.copyfile(console_log, kept)
    if failure is None and 'DONE' not in console.marks:
        failure = 'qemu exited (%s) before the first boot was done: %s' % (
            proc.returncode, stderr.strip()[-1000:])
    if failure is None and not ('python ok' in console.marks and
                                'perl ok' in console.marks):
        failure = 'the first-boot service\'s python3 or perl failed'
    if failure:
        raise RuntimeError('%s boot failed: %s (console: %s)' % (
            accel, failure, kept))
    reads, writes = parse_trace(trace, t0)
    return {'accel': accel, 'seconds': round(seconds, 2),
            'kernel_seconds': round(console.marks.get('kernel', -1), 2),
            'firstboot_start_seconds': round(console.marks['START'], 2),
            'firstboot_done_seconds': round(console.marks['DONE'], 2),
            'kernel': getattr(console, 'kernel_banner', '').strip(),
            'reads': reads, 'writes': writes}


def parse_trace(path, t0):
    reads, writes = [], []
    blks = set()
    last = 0.0
    with open(path) as f:
        for line in f:
            m = TRACE_RE.match(line)
            if not m:
                continue
            stamp, kind, blk, offset, length, _flags = m.groups()
            blks.add(blk)
            # In the order qemu issued them; the wall clock may step back.
            t = max(round(float(stamp) - t0, 6), last)
            last = t
            entry = [t, int(offset), int(length)]
            (reads if kind == 'preadv' else writes).append(entry)
    if len(blks) > 1:
        raise RuntimeError('reads from %d block backends in %s' % (
            len(blks), path))
    return reads, writes


def summarize(reads, size):
    """Count, working set (distinct bytes), total bytes, chunks touched."""
    spans = sorted((off, off + length) for _t, off, length in reads)
    distinct = 0
    end = -1
    for start, stop in spans:
        if stop <= end:
            continue
        distinct += stop - max(start, end)
        end = stop
    chunks = set()
    for _t, off, length in reads:
        chunks.update(range(off // CHUNK, (off + length - 1) // CHUNK + 1))
    return {'reads': len(reads),
            'distinct_bytes': distinct,
            'total_bytes': sum(length for _t, _o, length in reads),
            'chunk_size': CHUNK,
            'chunks_touched': len(chunks),
            'chunks_in_image': -(-size // CHUNK),
            'last_read_seconds': reads[-1][0] if reads else 0}


def allocated(path):
    return os.stat(path).st_blocks * 512


def write_trace(path, doc):
    """Compact JSON, one read (or write) per line."""
    reads = doc.pop('reads')
    writes = doc.pop('writes')
    head = json.dumps(doc, indent=1, sort_keys=True)
    lines = [head[:-2] + ',']

    def rows(name, items, last):
        lines.append(' "%s": [' % name)
        lines.extend('  %s%s' % (json.dumps(r, separators=(',', ':')),
                                 ',' if i < len(items) - 1 else '')
                     for i, r in enumerate(items))
        lines.append(' ]' + ('' if last else ','))
    rows('reads', reads, False)
    rows('writes', writes, True)
    lines.append('}')
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.rename(tmp, path)
    with open(path) as f:   # it parses back
        json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='benchmarks/data/boot-trace.json')
    parser.add_argument('--image', default='/var/tmp/thunder-boot.raw')
    parser.add_argument('--size-mib', type=int, default=1024)
    parser.add_argument('--mirror', default=MIRROR)
    parser.add_argument('--accel', choices=('auto', 'kvm', 'tcg'),
                        default='auto',
                        help='auto: KVM, and TCG if KVM does not boot')
    parser.add_argument('--timeout', type=int, default=900,
                        help='seconds a boot may take (default 900)')
    parser.add_argument('--stall', type=int, default=180,
                        help='seconds without console output that count '
                        'as a hung boot (default 180)')
    parser.add_argument('--no-boot-loader', action='store_true',
                        help='give qemu the kernel and initramfs (-kernel, '
                        '-initrd) instead of booting extlinux from the '
                        'disk: the trace then lacks their reads')
    parser.add_argument('--reuse-image', action='store_true',
                        help='boot the --image an earlier run made')
    args = parser.parse_args()
    if os.geteuid():
        parser.error('run as root (loop devices, mount, debootstrap)')
    command = ('tox -e bench -- benchmarks/make_boot_trace.py --out %s'
               % args.out)
    if args.image != parser.get_default('image'):
        command += ' --image %s' % args.image
    if args.size_mib != parser.get_default('size_mib'):
        command += ' --size-mib %d' % args.size_mib
    if args.no_boot_loader:
        command += ' --no-boot-loader'
    ensure_tools()
    cleanup = bm.Cleanup()
    workdir = tempfile.mkdtemp(prefix='boot-trace-', dir='/var/tmp')
    cleanup.callback(shutil.rmtree, workdir, True)
    try:
        if args.reuse_image and os.path.exists(args.image + '.json'):
            with open(args.image + '.json') as f:
                meta = json.load(f)
            log('reusing %s' % args.image)
        else:
            meta = build_image(args, workdir)
        kernel, initrd = args.image + '.vmlinuz', args.image + '.initrd'
        size = os.path.getsize(args.image)
        image_sha = guest_common.file_sha256(args.image)
        accels = ['kvm', 'tcg'] if args.accel == 'auto' else [args.accel]
        if 'kvm' in accels and not os.access('/dev/kvm', os.R_OK | os.W_OK):
            accels.remove('kvm')
        result = None
        tried = []
        for accel in accels:
            volume = os.path.join(workdir, 'volume.raw')
            run(['cp', '--sparse=always', args.image, volume])
            try:
                result = boot(args, accel, kernel, initrd, volume, workdir)
                break
            except RuntimeError as exc:
                log(str(exc))
                tried.append(str(exc))
            finally:
                os.unlink(volume)
        if result is None:
            raise RuntimeError('no boot succeeded: %s' % '; '.join(tried))
        summary = summarize(result['reads'], size)
        summary['writes'] = len(result['writes'])
        summary['written_bytes'] = sum(w[2] for w in result['writes'])
        doc = {
            'format': 1,
            'image': {
                'size': size,
                'sha256': image_sha,
                'used_bytes': meta['fs_used_bytes'],
                'allocated_bytes': allocated(args.image),
                'description': (
                    'Debian %s (debootstrap --variant=minbase plus the '
                    'packages listed), raw, MBR, one ext4 partition '
                    'from offset %d labelled root; first boot runs '
                    'systemd and a first-boot service (SSH host keys, '
                    'ldconfig, dpkg -l, python3 and perl imports, cat '
                    'of the first 2000 files under /usr/share, 4 MiB '
                    'written, sync, '
                    'poweroff). %s' % (
                        SUITE, PART_START, boot_how(args, meta))),
                'packages': meta['packages'],
                'command': command,
            },
            'boot': {
                'accel': result['accel'],
                'seconds': result['seconds'],
                'kernel_banner_seconds': result['kernel_seconds'],
                'firstboot_start_seconds': result['firstboot_start_seconds'],
                'firstboot_done_seconds': result['firstboot_done_seconds'],
                'kernel': result['kernel'],
                'date': datetime.datetime.now(
                    datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
                'qemu': run(['qemu-system-x86_64', '--version']
                            ).stdout.splitlines()[0],
                'host': '%s, %d CPUs, kernel %s' % (
                    cpu_model(), os.cpu_count(), platform.release()),
                'disk': 'virtio-blk-pci, raw, cache.direct=on, aio=threads',
                'memory_mib': 1024,
                'failed_attempts': tried,
                'trace': ('qemu trace event blk_co_preadv (reads) and '
                          'blk_co_pwritev (writes) of the disk, times in '
                          'seconds since qemu was started'),
            },
            'summary': summary,
            'reads': result['reads'],
            'writes': result['writes'],
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)),
                    exist_ok=True)
        write_trace(args.out, doc)
        print(json.dumps({'boot': {k: doc['boot'][k] for k in (
            'accel', 'seconds', 'firstboot_done_seconds')},
            'summary': summary}, indent=1))
    finally:
        cleanup.close()


def boot_how(args, meta):
    if args.no_boot_loader:
        return ('Kernel %s and its initramfs from the image\'s /boot were '
                'given to qemu with -kernel and -initrd (no boot loader), '
                'so the reads cover the root file system only, not the '
                'reading of the kernel and initramfs.' % (
                    meta['kernel_version']))
    return ('Booted from the disk as a cloud image boots: SeaBIOS, '
            'syslinux\'s MBR, extlinux from the partition, which reads '
            'kernel %s and its initramfs from /boot; the reads cover all of '
            'it, from the MBR on.' % meta['kernel_version'])


def cpu_model():
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor()


if __name__ == '__main__':
    main()
