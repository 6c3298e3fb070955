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

"""Throughput of the thunder-cache peer server on loopback.

Writes an incompressible image-volume (image, then manifest) into a
temporary directory, starts one ``thunder-cache`` daemon (``python -m
thunder_cache.daemon``, a separate process, as in production) with that
file as the origin, and measures, in one run:

cold fill
    one reader asks the daemon for every chunk once: the daemon reads the
    origin, verifies each chunk, writes it and makes it durable (data
    synced, then map), either before serving each chunk (``commit_interval
    = 0``, a second daemon) or in grouped commits every 0.05 s (the
    default);
plain file
    the baseline: ``--readers`` readers ``pread`` chunk-sized blocks of the
    daemon's (warm) cache file directly, no network, no verification;
peer, warm
    ``--readers`` readers, each an authenticated peer with its own node id
    and keep-alive connection, fetch chunks from the daemon (served with
    ``sendfile`` from its cache file);
peer, warm, 1 reader
    the same with a single reader;
over TLS (``--tls``)
    a second daemon with ``[peer] tls_enabled`` (a CA and certificates made
    with openssl in the temporary directory, mutual TLS, EC P-256) is
    filled by one reader, then read by the same warm readers, over TLS:
    bodies go through ``pread`` and TLS in slices instead of ``sendfile``.

Readers are separate processes (``--mode threads`` to use threads), each
reading every chunk ``--rounds`` times in its own random order. Prints a
table with the aggregate MB/s and the ratio to the plain-file baseline,
with ``--tls`` a second one with the warm rates in plain HTTP and over TLS
and their ratio, and checks the goal: at least 1 GB/s aggregate with 8
readers (in plain HTTP).

    tox -e bench -- benchmarks/peer_throughput.py [--size-mib 256]
        [--chunk-kib 1024] [--readers 8] [--rounds 4] [--tls]
"""

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from thunder_cache.peer import peerpolicy
from thunder_cache.peer import protocol
from thunder_cache.peer import sources
from thunder_cache.peer import tls as tls_mod
from thunder_common import manifest as manifest_mod
from thunder_stack import pki
from thunder_stack import services as svc

SECRET = b'peer-throughput-benchmark-secret'
IMAGE_ID = 'bench'
GOAL_BYTES_PER_SECOND = 1e9


def write_volume(path, size, chunk_size):
    builder = manifest_mod.ManifestBuilder(chunk_size)
    block = os.urandom(chunk_size)
    with open(path, 'wb') as f:
        written = 0
        while written < size:
            # Vary every chunk so that no two chunks are equal.
            data = (written.to_bytes(8, 'big') + block[8:])[:size - written]
            f.write(data)
            builder.update(data)
            written += len(data)
        manifest = builder.finish()
        f.seek(manifest_mod.volume_offset(size))
        f.write(manifest.to_bytes())
    return manifest


def start_daemon(workdir, port, manifest, volume, commit_interval=0.05,
                 name='server', tls=None):
    """Start a daemon; ``tls``: (CA file, certificate, key) for TLS."""
    cache_dir = os.path.join(workdir, name)
    os.makedirs(os.path.join(cache_dir, 'images.d'))
    with open(os.path.join(cache_dir, 'images.d', IMAGE_ID + '.json'),
              'w') as f:
        json.dump({'manifest_digest': manifest.digest(),
                   'image_size': manifest.image_size,
                   'origin': {'type': 'file', 'path': volume}}, f)
    secret = os.path.join(workdir, 'secret')
    with open(secret, 'wb') as f:
        f.write(SECRET)
    conf = os.path.join(workdir, name + '.conf')
    with open(conf, 'w') as f:
        f.write('[node]\nnode_id = bench-%s\nlisten_address = 127.0.0.1\n'
                'listen_port = %d\ncache_dir = %s\npid_file = %s\n'
                'local_socket =\n'
                '[peer]\nshared_secret_file = %s\nmax_children = 64\n'
                '[cache]\ncommit_interval = %s\n'
                '[origin]\nfile_origin_dirs = %s\n'
                % (name, port, cache_dir,
                   os.path.join(workdir, name + '.pid'), secret,
                   commit_interval, os.path.dirname(os.path.abspath(volume))))
        if tls:
            f.write('[peer]\ntls_enabled = true\ntls_ca_file = %s\n'
                    'tls_certificate = %s\ntls_key = %s\n' % tls)
    log = open(os.path.join(workdir, name + '.log'), 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'thunder_cache.daemon',
                             '--config-file', conf], stdout=log,
                            stderr=subprocess.STDOUT)
    context = None
    if tls:
        context = tls_mod.client_context(tls[1], tls[2], tls[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen('%s://127.0.0.1:%d/metrics' % (
                'https' if tls else 'http', port), timeout=1,
                context=context).read()
            return proc, os.path.join(cache_dir, IMAGE_ID, 'data')
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError('thunder-cache did not start; see %s'
                       % os.path.join(workdir, name + '.log'))


def _peer_reader(args):
    """Bytes read; ``args[6]``, if given: (CA, certificate, key) for TLS."""
    url, reader, chunks, sizes, rounds, seed = args[:6]
    tls = args[6] if len(args) > 6 else None
    # The readers of one run use one scheme at a time.
    protocol.use_tls(bool(tls))
    signer = protocol.Signer(SECRET, 'reader-%d' % reader, '%s://127.0.0.1:%d'
                             % (protocol.url_scheme(), 20000 + reader))
    context = tls_mod.client_context(tls[1], tls[2], tls[0]) if tls else None
    client = sources.PeerClient(signer, timeout=30, tls_context=context)
    client.policy = peerpolicy.AddressPolicy(['127.0.0.0/8'])
    rng = random.Random(seed)
    total = 0
    for _ in range(rounds):
        order = list(range(chunks))
        rng.shuffle(order)
        for index in order:
            total += len(client.get_chunk(url, IMAGE_ID, index,
                                          sizes[index]))
    client.close()
    return total


def _file_reader(args):
    path, reader, chunks, sizes, rounds, seed, chunk_size = args
    rng = random.Random(seed)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(chunk_size)
    try:
        for _ in range(rounds):
            order = list(range(chunks))
            rng.shuffle(order)
            for index in order:
                view = memoryview(buf)[:sizes[index]]
                total += os.preadv(fd, [view], index * chunk_size)
    finally:
        os.close(fd)
    return total


def run(func, jobs, mode):
    started = time.perf_counter()
    if mode == 'processes' and len(jobs) > 1:
        # Not fork: a parent with threads (cache_io.py's) can leave a lock
        # held in the child, which then hangs (seen here).
        with multiprocessing.get_context('forkserver').Pool(
                len(jobs)) as pool:
            totals = pool.map(func, jobs)
    elif mode == 'threads' and len(jobs) > 1:
        from concurrent import futures
        with futures.ThreadPoolExecutor(len(jobs)) as pool:
            totals = list(pool.map(func, jobs))
    else:
        totals = [func(job) for job in jobs]
    elapsed = time.perf_counter() - started
    return sum(totals), elapsed


def cpu_seconds(proc):
    """User and system CPU seconds a process has used so far."""
    with open('/proc/%d/stat' % proc.pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def warm_rows(args, proc, url, chunks, sizes, name, files=None):
    """``--readers`` readers, then one, of a warm daemon; with its CPU."""
    rows = []
    for readers, first, mode in ((args.readers, 1, args.mode),
                                 (1, 99, 'inline')):
        jobs = [(url, first + r, chunks, sizes, args.rounds, first + r) +
                ((files,) if files else ()) for r in range(readers)]
        before = cpu_seconds(proc)
        total, elapsed = run(_peer_reader, jobs, mode)
        rows.append((name, readers, total, elapsed,
                     cpu_seconds(proc) - before))
    return rows


def measure_tls(args, workdir, manifest, volume, sizes, procs):
    """The TLS rows: a TLS daemon's cold fill, then its warm readers."""
    authority = pki.Pki(os.path.join(workdir, 'pki'))
    files = (authority.ca_file,) + authority.node('tls', ['127.0.0.1'])
    port = svc.free_port()
    url = 'https://127.0.0.1:%d' % port
    proc, _path = start_daemon(workdir, port, manifest, volume, name='tls',
                               tls=files)
    procs.append(proc)
    chunks = manifest.chunk_count
    total, elapsed = run(_peer_reader, [(url, 0, chunks, sizes, 1, 0, files)],
                         'inline')
    assert total == manifest.image_size
    return [('cold fill over TLS, grouped commits', 1, total, elapsed,
             None)] + warm_rows(args, proc, url, chunks, sizes,
                                'peer, warm over TLS (pread slices)', files)


def print_tls_cost(pairs):
    """Plain HTTP and TLS side by side: (plain row, TLS row) pairs."""
    print()
    print('%-22s %7s %10s %10s %9s %16s' % (
        'TLS cost', 'readers', 'plain MB/s', 'TLS MB/s', 'TLS/plain',
        'daemon CPU s/GiB'))
    for plain, secure in pairs:
        name, readers, total, elapsed, cpu = plain
        plain_rate = total / elapsed
        secure_rate = secure[2] / secure[3]
        per_gib = '-'
        if cpu is not None:
            per_gib = '%.2f / %.2f' % (cpu / total * 2 ** 30,
                                       secure[4] / secure[2] * 2 ** 30)
        print('%-22s %7d %10.0f %10.0f %8.2fx %16s' % (
            'cold fill' if name.startswith('cold') else 'peer, warm',
            readers, plain_rate / 1e6, secure_rate / 1e6,
            secure_rate / plain_rate, per_gib))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size-mib', type=int, default=256)
    parser.add_argument('--chunk-kib', type=int, default=1024)
    parser.add_argument('--readers', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=4)
    parser.add_argument('--mode', choices=('processes', 'threads'),
                        default='processes')
    parser.add_argument('--workdir', help='directory for the image and '
                        'the cache (default: a temporary directory)')
    parser.add_argument('--tls', action='store_true',
                        help='also measure the warm peer reads over TLS, '
                        'and print their cost')
    args = parser.parse_args(argv)

    chunk_size = args.chunk_kib * 1024
    size = args.size_mib * 1024 * 1024
    workdir = tempfile.mkdtemp(prefix='thunder-peer-bench-',
                               dir=args.workdir)
    procs = []
    tls_rows = []
    try:
        volume = os.path.join(workdir, 'volume')
        manifest = write_volume(volume, size, chunk_size)
        chunks = manifest.chunk_count
        sizes = [manifest.chunk_range(i)[1] for i in range(chunks)]
        rows = []
        # A daemon that commits each chunk before serving it, for the
        # cold-fill comparison only.
        port = svc.free_port()
        strict, _path = start_daemon(workdir, port, manifest, volume,
                                     commit_interval=0, name='strict')
        try:
            total, elapsed = run(
                _peer_reader, [('http://127.0.0.1:%d' % port, 0, chunks,
                                sizes, 1, 0)], 'inline')
        finally:
            strict.send_signal(signal.SIGTERM)
            strict.wait(30)
        rows.append(('cold fill, commit per chunk', 1, total, elapsed,
                     None))

        port = svc.free_port()
        url = 'http://127.0.0.1:%d' % port
        proc, data_path = start_daemon(workdir, port, manifest, volume)
        procs.append(proc)
        total, elapsed = run(_peer_reader,
                             [(url, 0, chunks, sizes, 1, 0)], 'inline')
        assert total == size
        rows.append(('cold fill, grouped commits (0.05 s)', 1, total,
                     elapsed, None))

        jobs = [(data_path, r, chunks, sizes, args.rounds, r, chunk_size)
                for r in range(args.readers)]
        total, elapsed = run(_file_reader, jobs, args.mode)
        baseline = total / elapsed
        rows.append(('plain file pread (baseline)', args.readers, total,
                     elapsed, None))

        rows += warm_rows(args, proc, url, chunks, sizes,
                          'peer, warm (sendfile)')
        peer_rate = rows[3][2] / rows[3][3]
        if args.tls:
            tls_rows = measure_tls(args, workdir, manifest, volume, sizes,
                                   procs)
            # The plain rows they compare with: the same order.
            tls_pairs = list(zip([rows[1], rows[3], rows[4]], tls_rows))
            rows += tls_rows
    finally:
        protocol.use_tls(False)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    print('Peer server throughput on loopback: %d MiB image, %d KiB '
          'chunks, %d rounds, readers as %s, %d CPUs'
          % (args.size_mib, args.chunk_kib, args.rounds, args.mode,
             os.cpu_count()))
    print()
    print('%-40s %7s %10s %9s %10s' % ('', 'readers', 'MB/s', 'seconds',
                                       'vs. file'))
    for name, readers, total, elapsed, _cpu in rows:
        rate = total / elapsed
        print('%-40s %7d %10.0f %9.2f %9.2fx' % (name, readers, rate / 1e6,
                                                 elapsed, rate / baseline))
    if tls_rows:
        print_tls_cost(tls_pairs)
    ok = peer_rate >= GOAL_BYTES_PER_SECOND
    print()
    print('goal: >= %.0f MB/s with %d readers: %s (%.0f MB/s)'
          % (GOAL_BYTES_PER_SECOND / 1e6, args.readers,
             'met' if ok else 'NOT met', peer_rate / 1e6))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
