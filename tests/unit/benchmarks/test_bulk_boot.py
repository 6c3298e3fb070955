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

"""The pure parts of benchmarks/bulk_boot.py (the runs are functional)."""

import json
import os
import socket
import threading

import pytest

from benchmarks import bulk_boot
from thunder_common import manifest

KiB = 1024
READS = [(0.0, 0, 4 * KiB), (0.1, 2 * KiB, 4 * KiB),
         (0.2, 700 * KiB, 100 * KiB), (0.3, 0, 1 * KiB)]


def test_footprint_is_the_union_of_the_reads():
    assert bulk_boot.footprint(READS) == 6 * KiB + 100 * KiB


def test_chunk_order_is_first_read_order():
    assert bulk_boot.chunk_order(READS, 256 * KiB) == [0, 2, 3]
    assert bulk_boot.chunk_order(READS, 4 * KiB) == [0, 1] + list(
        range(175, 200))


def test_default_chunk_size_is_the_store_s():
    args = bulk_boot.parse_args(['--trace', 'synthetic'])
    assert args.chunk_kib * KiB == manifest.DEFAULT_CHUNK_SIZE


def _bench(tmp_path, *argv):
    args = bulk_boot.parse_args(['--trace', 'synthetic', '--quick'] +
                                list(argv))
    return bulk_boot.Bench(args, str(tmp_path), None, None)


def test_timeouts_stretched_with_the_links(tmp_path):
    bench = _bench(tmp_path)
    assert bench.peer_options == []     # no rate chosen yet: defaults
    bench.timeout_factor = 25.0
    options = dict(line.split(' = ') for line in bench._timeouts())
    assert options == {'fetch_timeout': '250.0', 'relay_timeout': '200.0',
                       'child_ttl': '250', 'min_transfer_rate': '0.04'}


def test_explicit_timeouts_and_peer_options_win(tmp_path):
    bench = _bench(tmp_path, '--fetch-timeout', '7', '--daemon-timeouts',
                   'defaults', '--peer-option', 'max_redirects=64')
    bench.timeout_factor = 25.0
    assert bench._timeouts() == ['fetch_timeout = 7.0',
                                 'max_redirects = 64']


@pytest.mark.parametrize('option', ['max_redirects', 'nosuch=1', '=3'])
def test_bad_peer_option_refused(option, capsys):
    with pytest.raises(SystemExit):
        bulk_boot.parse_args(['--trace', 'synthetic', '--peer-option',
                              option])
    assert 'not NAME=VALUE' in capsys.readouterr().err


def test_cpu_columns_per_gib_received_and_sent():
    gib = bulk_boot.GiB
    # origin, then two nodes: (user, system) seconds.
    cols = bulk_boot.cpu_columns([(1.0, 0.5), (3.0, 1.0), (1.0, 1.0)],
                                 [gib, gib], [gib // 2, 0], gib)
    assert cols['node_cpu_user_s'] == 4.0
    assert cols['node_cpu_sys_s'] == 2.0
    assert cols['cpu_gib_rx'] == 3.0
    assert cols['node_cpu_gib_rx_max'] == 4.0
    assert cols['node_cpu_gib_tx'] == 12.0
    assert cols['origin_cpu_gib_tx'] == 1.5


def test_cpu_columns_without_traffic_are_empty():
    cols = bulk_boot.cpu_columns([(0.1, 0.1), (0.2, 0.0)], [0], [0], 0)
    assert cols['cpu_gib_rx'] == cols['origin_cpu_gib_tx'] == ''


def test_cpu_times_of_this_process_and_of_a_gone_one():
    user, system = bulk_boot.cpu_times(os.getpid())
    assert user > 0 and system >= 0
    assert bulk_boot.cpu_times(2 ** 22 + 1) == (0.0, 0.0)


class FakeControl:
    """A control socket answering ensure_chunks as the daemon does."""

    def __init__(self, path, chunks, observed=False, present=()):
        self.usable = bytearray(b'0' * chunks)
        for index in present:
            self.usable[index] = ord('1')
        self.observed = observed
        self.grant = True           # False: asked chunks stay unusable
        self.requests = []
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn, conn.makefile('rb') as lines:
                for line in lines:
                    request = json.loads(line)
                    self.requests.append((request['first'], request['last']))
                    for index in range(request['first'],
                                       request['last'] + 1):
                        if self.grant:
                            self.usable[index] = ord('1')
                    conn.sendall(json.dumps({'ok': True, 'result': {
                        'usable': self.usable.decode(),
                        'observed': self.observed}}).encode() + b'\n')


@pytest.fixture
def image(tmp_path):
    data = os.urandom(10 * 4 * KiB)
    path = tmp_path / 'data'
    path.write_bytes(data)
    chunks = [data[i:i + 4 * KiB] for i in range(0, len(data), 4 * KiB)]
    return data, str(path), manifest.Manifest.build(chunks, 4 * KiB)


@pytest.mark.parametrize('observed', [False, True])
def test_native_reader_asks_for_runs_it_was_not_told_of(
        tmp_path, image, observed):
    data, path, built = image
    control = FakeControl(str(tmp_path / 'control.sock'), 10, observed,
                          present=[9])
    reader = bulk_boot.NativeReader(str(tmp_path / 'control.sock'), path,
                                    built)
    try:
        # Chunks 1-3 in one request; then 5; then 9 only if observed (the
        # map of a recording daemon names only the chunks asked for).
        assert reader.read(5 * KiB, 10 * KiB) == data[5 * KiB:15 * KiB]
        assert reader.read(6 * KiB, 1) == data[6 * KiB:6 * KiB + 1]
        assert reader.read(20 * KiB, 100) == data[20 * KiB:20 * KiB + 100]
        assert reader.read(36 * KiB, 4 * KiB) == data[36 * KiB:]
    finally:
        reader.close()
        control.listener.close()
    asked = [(1, 3), (5, 5)] + ([(9, 9)] if observed else [])
    assert control.requests == asked
    assert reader.requests == len(asked)
    assert control.connections == 1


@pytest.mark.parametrize('fault, message', [
    ('size', 'a map of 9 chunks'), ('grant', 'not usable after')])
def test_native_reader_refuses_what_it_may_not_read(tmp_path, image, fault,
                                                    message):
    _data, path, built = image
    control = FakeControl(str(tmp_path / 'control.sock'), 10)
    if fault == 'size':
        control.usable = bytearray(b'0' * 9)
    else:
        control.grant = False
    reader = bulk_boot.NativeReader(str(tmp_path / 'control.sock'), path,
                                    built)
    try:
        with pytest.raises(IOError, match=message):
            reader.read(0, 10)
    finally:
        reader.close()
        control.listener.close()
