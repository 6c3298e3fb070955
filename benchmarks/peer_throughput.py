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
    ``sendfile`` from its cache file), with one of two readers
    (``--reader``, both by default):

    ``client``
        the node's own :class:`~thunder_cache.peer.sources.PeerClient`
        (``get_chunk``: a new buffer per chunk, read through a buffered
        reader), what a node fetching from its peers runs;
    ``lean``
        the same protocol with less Python: a signed request per chunk on
        one keep-alive connection, the answer's status and length checked
        and its body read with ``recv_into`` into one reused buffer; with
        ``--verify`` every chunk is also checked against the manifest (a
        row of its own). The server does the same work for both: it
        measures the server rather than the Python readers sharing its
        CPUs;
peer, warm, 1 reader
    the same with a single reader;
over TLS (``--tls``)
    a second daemon with ``[peer] tls_enabled`` (a CA and certificates made
    with openssl in the temporary directory, mutual TLS, EC P-256) is
    filled by one reader, then read by the same warm readers, over TLS:
    bodies go through ``pread`` and TLS in slices instead of ``sendfile``.

Readers are separate processes (``--mode threads`` to use threads), each
reading every chunk ``--rounds`` times in its own random order. The clock
starts once every reader is started and set up (connected), and stops when
the last one is done. Prints a table with the aggregate MB/s, the ratio to
the plain-file baseline and the CPU seconds per GiB of the daemon and of
the readers (processes only), with ``--tls`` a second one with the warm
rates in plain HTTP and over TLS and their ratio, and checks the goal of
issue 14: at least 2 GB/s aggregate with 8 readers, in plain HTTP, with
the lean readers (the ``client`` readers' figure is printed beside it).

    tox -e bench -- benchmarks/peer_throughput.py [--size-mib 256]
        [--chunk-kib 1024] [--readers 8] [--rounds 4] [--tls]
        [--reader lean|client|both] [--verify]
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
GOAL_BYTES_PER_SECOND = 2e9
# Seconds readers may take to start and set up, and to finish a run.
START_TIMEOUT = 120
RUN_TIMEOUT = 1800
# The barrier the readers of a timed run wait at once set up (None: no
# wait, the reader runs alone), and this process's CPU seconds then.
_start = None
_cpu_at_start = [0.0]


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


def _process_cpu():
    times = os.times()
    return times.user + times.system


def _ready():
    """A reader is set up: the clock starts once all of them are."""
    if _start is not None:
        _start.wait(START_TIMEOUT)
    _cpu_at_start[0] = _process_cpu()


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
    _ready()
    for _ in range(rounds):
        order = list(range(chunks))
        rng.shuffle(order)
        for index in order:
            total += len(client.get_chunk(url, IMAGE_ID, index,
                                          sizes[index]))
    client.close()
    return total


class _Answer(Exception):
    pass


def _lean_reader(args):
    """Bytes read by a lean peer (see the module's doc).

    ``args[6]``, if given: the chunks' digests, to verify every chunk.
    """
    url, reader, chunks, sizes, rounds, seed = args[:6]
    digests = args[6] if len(args) > 6 else None
    signer = protocol.Signer(SECRET, 'lean-%d' % reader,
                             'http://127.0.0.1:%d' % (20000 + reader))
    _scheme, host, port = protocol.split_url(url)
    buf = bytearray(max(sizes) + protocol.MAX_HEAD_BYTES)
    view = memoryview(buf)
    rng = random.Random(seed)
    total = 0
    with socket.create_connection((host, port), 30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _ready()
        for _ in range(rounds):
            order = list(range(chunks))
            rng.shuffle(order)
            for index in order:
                path = protocol.chunk_path(IMAGE_ID, index)
                headers = signer.headers('GET', path, destination=url)
                request = ['GET %s HTTP/1.1\r\nHost: %s:%d\r\n'
                           % (path, host, port)]
                request += ['%s: %s\r\n' % item for item in headers.items()]
                request.append('\r\n')
                sock.sendall(''.join(request).encode('ascii'))
                body = _lean_answer(sock, buf, view, sizes[index])
                if digests is not None and hashlib.sha256(
                        body).digest() != digests[index]:
                    raise _Answer('chunk %d: wrong bytes' % index)
                total += len(body)
    return total


def _lean_answer(sock, buf, view, length):
    """The body of a 200 answer of ``length`` bytes, read into ``buf``."""
    got = 0
    while True:
        n = sock.recv_into(view[got:protocol.MAX_HEAD_BYTES])
        if not n:
            raise _Answer('connection closed in a head')
        got += n
        end = buf.find(b'\r\n\r\n', 0, got)
        if end >= 0:
            break
        if got >= protocol.MAX_HEAD_BYTES:
            raise _Answer('head too large')
    head = bytes(buf[:end]).lower()
    if (not head.startswith(b'http/1.1 200 ') or
            b'\r\ncontent-length: %d\r\n' % length not in head + b'\r\n'
            or b'\r\nconnection: close' in head):
        raise _Answer('unexpected answer: %r' % head[:200])
    start = end + 4
    need = start + length
    if got > need:
        raise _Answer('more bytes than announced')
    while got < need:
        n = sock.recv_into(view[got:need])
        if not n:
            raise _Answer('connection closed in a body')
        got += n
    return view[start:need]


def _file_reader(args):
    path, reader, chunks, sizes, rounds, seed, chunk_size = args
    rng = random.Random(seed)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(chunk_size)
    _ready()
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


def _worker(func, job, start, results):
    """Run one reader of a timed run; put (bytes, end, CPU) or an error."""
    global _start
    _start = start
    try:
        total = func(job)
        results.put((total, time.monotonic(),
                     _process_cpu() - _cpu_at_start[0]))
    except BaseException as e:
        start.abort()
        results.put(RuntimeError('reader failed: %r' % e))


def run_timed(func, jobs, mode, daemon=None):
    """(bytes, seconds, reader CPU seconds or None, daemon CPU seconds).

    Parallel readers start the clock together once all are set up.
    """
    global _start
    if len(jobs) == 1 or mode == 'inline':
        before = cpu_seconds(daemon) if daemon else None
        started = time.monotonic()
        cpu = _process_cpu()
        total = sum(func(job) for job in jobs)
        elapsed = time.monotonic() - started
        return (total, elapsed, _process_cpu() - cpu,
                cpu_seconds(daemon) - before if daemon else None)
    if mode == 'processes':
        # Not fork: a parent with threads (cache_io.py's) can leave a lock
        # held in the child, which then hangs (seen here).
        context = multiprocessing.get_context('forkserver')
        start = context.Barrier(len(jobs) + 1)
        results = context.Queue()
        workers = [context.Process(target=_worker,
                                   args=(func, job, start, results))
                   for job in jobs]
    else:
        start = threading.Barrier(len(jobs) + 1)
        results = queue.Queue()
        workers = [threading.Thread(target=_worker,
                                    args=(func, job, start, results))
                   for job in jobs]
    for worker in workers:
        worker.start()
    try:
        try:
            start.wait(START_TIMEOUT)
        except threading.BrokenBarrierError:
            raise results.get(timeout=START_TIMEOUT)
        started = time.monotonic()
        before = cpu_seconds(daemon) if daemon else None
        ends = [results.get(timeout=RUN_TIMEOUT) for _ in workers]
        after = cpu_seconds(daemon) if daemon else None
    finally:
        for worker in workers:
            worker.join(RUN_TIMEOUT)
        _start = None  # threads set it in this process
    for end in ends:
        if isinstance(end, BaseException):
            raise end
    reader_cpu = (sum(end[2] for end in ends) if mode == 'processes'
                  else None)
    return (sum(end[0] for end in ends),
            max(end[1] for end in ends) - started, reader_cpu,
            after - before if daemon else None)


def run(func, jobs, mode):
    """(bytes, seconds) of the readers ``func(job)``, for each job."""
    return run_timed(func, jobs, mode)[:2]


def cpu_seconds(proc):
    """User and system CPU seconds a process has used so far."""
    with open('/proc/%d/stat' % proc.pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def warm_rows(args, proc, url, chunks, sizes, name, files=None,
              reader=_peer_reader, extra=None):
    """``--readers`` readers, then one, of a warm daemon; with its CPU.

    Rows: (name, readers, bytes, seconds, daemon CPU, reader CPU).
    """
    rows = []
    for readers, first, mode in ((args.readers, 1, args.mode),
                                 (1, 99, 'inline')):
        jobs = [(url, first + r, chunks, sizes, args.rounds, first + r) +
                ((files or extra,) if files or extra else ())
                for r in range(readers)]
        total, elapsed, reader_cpu, cpu = run_timed(reader, jobs, mode,
                                                    proc)
        if total != readers * args.rounds * sum(sizes):
            raise RuntimeError('%s: %d bytes read' % (name, total))
        rows.append((name, readers, total, elapsed, cpu, reader_cpu))
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
             None, None)] + warm_rows(
                 args, proc, url, chunks, sizes,
                 'peer, warm over TLS (pread slices)', files)


def print_tls_cost(pairs):
    """Plain HTTP and TLS side by side: (plain row, TLS row) pairs."""
    print()
    print('%-22s %7s %10s %10s %9s %16s' % (
        'TLS cost', 'readers', 'plain MB/s', 'TLS MB/s', 'TLS/plain',
        'daemon CPU s/GiB'))
    for plain, secure in pairs:
        name, readers, total, elapsed, cpu, _reader_cpu = plain
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
    parser.add_argument('--reader', choices=('lean', 'client', 'both'),
                        default='both', help='the warm readers: the lean '
                        'one, PeerClient, or both (default)')
    parser.add_argument('--verify', action='store_true',
                        help='also run the lean readers verifying every '
                        'chunk against the manifest')
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
                     None, None))

        port = svc.free_port()
        url = 'http://127.0.0.1:%d' % port
        proc, data_path = start_daemon(workdir, port, manifest, volume)
        procs.append(proc)
        total, elapsed = run(_peer_reader,
                             [(url, 0, chunks, sizes, 1, 0)], 'inline')
        assert total == size
        fill = ('cold fill, grouped commits (0.05 s)', 1, total, elapsed,
                None, None)
        rows.append(fill)

        jobs = [(data_path, r, chunks, sizes, args.rounds, r, chunk_size)
                for r in range(args.readers)]
        total, elapsed, reader_cpu, _cpu = run_timed(_file_reader, jobs,
                                                     args.mode)
        baseline = total / elapsed
        rows.append(('plain file pread (baseline)', args.readers, total,
                     elapsed, None, reader_cpu))

        client = lean = []
        if args.reader in ('client', 'both'):
            client = warm_rows(args, proc, url, chunks, sizes,
                               'peer, warm, PeerClient readers')
            rows += client
        if args.reader in ('lean', 'both'):
            lean = warm_rows(args, proc, url, chunks, sizes,
                             'peer, warm, lean readers', reader=_lean_reader)
            rows += lean
        if args.verify:
            rows += warm_rows(args, proc, url, chunks, sizes,
                              'peer, warm, lean readers, verified',
                              reader=_lean_reader,
                              extra=[manifest.digest_of(i)
                                     for i in range(chunks)])
        goal_row = (lean or client)[0]
        peer_rate = goal_row[2] / goal_row[3]
        if args.tls:
            tls_rows = measure_tls(args, workdir, manifest, volume, sizes,
                                   procs)
            # The plain rows they compare with: the same order.
            tls_pairs = list(zip([fill] + (client or lean), tls_rows))
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
    print('%-40s %7s %7s %7s %8s %12s %12s' % (
        '', 'readers', 'MB/s', 'seconds', 'vs. file', 'daemon CPU',
        'reader CPU'))
    print('%-40s %7s %7s %7s %8s %12s %12s' % (
        '', '', '', '', '', 's/GiB', 's/GiB'))
    for name, readers, total, elapsed, cpu, reader_cpu in rows:
        rate = total / elapsed
        print('%-40s %7d %7.0f %7.2f %7.2fx %12s %12s' % (
            name, readers, rate / 1e6, elapsed, rate / baseline,
            per_gib(cpu, total), per_gib(reader_cpu, total)))
    if tls_rows:
        print_tls_cost(tls_pairs)
    ok = peer_rate >= GOAL_BYTES_PER_SECOND
    print()
    print('goal: >= %.0f MB/s with %d readers (%s): %s (%.0f MB/s)'
          % (GOAL_BYTES_PER_SECOND / 1e6, args.readers, goal_row[0],
             'met' if ok else 'NOT met', peer_rate / 1e6))
    if goal_row[4] is not None and goal_row[5] is not None:
        # What the CPUs could carry if the run had them to itself.
        cpu = goal_row[4] + goal_row[5]
        print('CPU per GiB, daemon + readers (%s): %.2f + %.2f s: %d CPUs '
              'carry at most %.0f MB/s' % (
                  goal_row[0], goal_row[4] / goal_row[2] * 2 ** 30,
                  goal_row[5] / goal_row[2] * 2 ** 30, os.cpu_count(),
                  os.cpu_count() * goal_row[2] / cpu / 1e6))
    print('load average at the end: %.2f %.2f %.2f' % os.getloadavg())
    return 0 if ok else 1


def per_gib(seconds, total):
    return '-' if seconds is None else '%.2f' % (seconds / total * 2 ** 30)


if __name__ == '__main__':
    sys.exit(main())
