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

import os

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
