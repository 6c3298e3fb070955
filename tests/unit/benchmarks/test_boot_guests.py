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

"""benchmarks/boot_guests.py: console markers, table, CSV, image-volume."""

import csv
import os

import pytest

from benchmarks import boot_guests
from thunder_common import manifest as manifest_mod

MiB = 1024 * 1024

CONSOLE = '''[    0.512] SeaBIOS (version 1.16.2-debian-1.16.2-1)
[    4.910] [    0.000000] Linux version 6.1.0-50-cloud-amd64 (gcc-12)
[   12.000] [   10.1] Linux version again, not the banner
[   24.164] THUNDER-FIRSTBOOT-START
[   40.001] python ok
[   40.500] perl ok
[   55.342] THUNDER-FIRSTBOOT-DONE
[   55.400] THUNDER-FIRSTBOOT-DONE
not a console line: THUNDER-FIRSTBOOT-START
'''


def test_parse_console_first_occurrence_of_each_marker():
    marks = boot_guests.parse_console(CONSOLE)
    assert marks == {'kernel': 4.91, 'start': 24.164, 'python': 40.001,
                     'perl': 40.5, 'up': 55.342}
    assert boot_guests.boot_failure(marks, 0) is None


@pytest.mark.parametrize('drop,returncode,expected', [
    ('up', 0, 'qemu exited (0) before the first boot was done'),
    ('perl', 0, 'the first-boot service\'s python3 or perl failed'),
    (None, -15, 'qemu exited with -15 after the first boot'),
])
def test_boot_failure(drop, returncode, expected):
    marks = boot_guests.parse_console(CONSOLE)
    marks.pop(drop, None)
    assert boot_guests.boot_failure(marks, returncode) == expected


def test_boot_failure_timeout_wins():
    assert boot_guests.boot_failure({}, None, 'no power-off after 9 s') == (
        'no power-off after 9 s')


def _row(strategy, n, guest, up, ok=True, **extra):
    row = {'round': 1, 'strategy': strategy, 'nodes': n, 'guest': guest,
           'ok': ok, 'error': '' if ok else 'qemu exited (1) before the '
           'first boot was done', 'kernel': 5.0, 'start': 20.0, 'up': up,
           'off': up + 2.5, 'link_mbit': 100.0, 'origin_bytes': '',
           'origin_link_bytes': '', 'node_rx': '', 'node_tx': '',
           'prefetched': '', 'cpu_busy': 0.5, 'load': '1.00 0.50 0.20'}
    row.update(extra)
    return row


ROWS = [
    _row('local-copy', 2, 'g0', 44.0),
    _row('local-copy', 2, 'g1', 46.0),
    _row('peer', 2, 'g0', 60.0, origin_bytes=330 * MiB, node_rx=330 * MiB),
    _row('peer', 2, 'g1', 70.0, ok=False, origin_bytes=330 * MiB,
         node_rx=10 * MiB),
]


def test_summarize_and_table():
    summaries = boot_guests.summarize(ROWS)
    assert [(s['strategy'], s['nodes'], s['ok']) for s in summaries] == [
        ('local-copy', 2, 2), ('peer', 2, 1)]
    assert summaries[0]['up_mean'] == 45.0
    assert summaries[0]['off_max'] == 48.5
    assert summaries[1]['up_max'] == 60.0     # failed guests do not count
    assert summaries[1]['guests'] == 2
    assert summaries[1]['node_rx'] == 170 * MiB
    assert summaries[1]['errors'] == [ROWS[3]['error']]
    lines = boot_guests.table(summaries, 1024 * MiB)
    assert lines[0].split() == ['strategy', 'N', 'kernel', 'start', 'up',
                                'up', 'min-max', 'off', 'max', 'origin',
                                'rx/node', 'copy', 'cpu', 'ok']
    # 2 x 1 GiB at 100 Mbit/s: 171.8 s of download before a local boot.
    assert lines[1].split() == ['local-copy', '2', '5.0', '20.0', '45.0',
                                '44.0-46.0', '48.5', '-', '-', '+172', '50%',
                                '2/2']
    assert lines[2].split() == ['peer', '2', '5.0', '20.0', '60.0',
                                '60.0-60.0', '62.5', '330', 'M', '170', 'M',
                                '-', '50%', '1/2']
    assert len(set(len(line) for line in lines)) == 1


def test_write_csv(tmp_path):
    path = str(tmp_path / 'guests.csv')
    boot_guests.write_csv([dict(ROWS[0], up=44.12345)], path)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(boot_guests.COLUMNS)
    assert rows[0]['up'] == '44.123'
    assert rows[0]['origin_bytes'] == ''


def test_write_volume(tmp_path):
    chunk = 64 * 1024
    image = tmp_path / 'image.raw'
    data = bytearray(os.urandom(5 * chunk + 4096))
    data[chunk:2 * chunk] = bytes(chunk)        # a hole stays a hole
    image.write_bytes(bytes(data))
    volume = str(tmp_path / 'image-volume')
    manifest = boot_guests.write_volume(str(image), volume, chunk)
    assert manifest.image_size == len(data)
    assert manifest.chunk_count == 6
    with open(volume, 'rb') as f:
        assert f.read(len(data)) == bytes(data)
        f.seek(manifest_mod.volume_offset(len(data)))
        assert f.read() == manifest.to_bytes()
