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

"""benchmarks/nova_nodes.py: table, goals and plot from per-server rows."""

from benchmarks import nova_nodes

MB = 1000 * 1000


def row(round_, flow, node, marker, link, origin=0, peers=0, warm=''):
    return {'round': round_, 'flow': flow, 'node': node, 'server': 'x',
            'active_s': marker / 2, 'marker_s': marker, 'warm_s': warm,
            'origin_link_bytes': link, 'node_origin_bytes': origin,
            'node_peer_bytes': peers, 'image_bytes': 0}


def two_rounds(peer_link=25 * MB, cache_marker=180.0):
    rows = []
    for k in (1, 2):
        rows += [row(k, 'peer', 'node-1', 24.0, peer_link, origin=23 * MB),
                 row(k, 'peer', 'node-2', 20.0, peer_link, peers=23 * MB),
                 row(k, 'image-cache', 'node-1', cache_marker, 2245 * MB),
                 row(k, 'image-cache', 'node-2', cache_marker + 10,
                     2245 * MB)]
    return rows


def test_working_set_is_one_nodes_fetch():
    assert nova_nodes.working_set(two_rounds()) == 23 * MB
    assert nova_nodes.working_set([]) == 0


def test_goals_met():
    lines = nova_nodes.goals(two_rounds())
    assert len(lines) == 2
    assert lines[0].startswith('goal: origin bytes <= 1.2x')
    assert ' met ' in lines[0] and '1.09x' in lines[0]
    # median image cache 185 s against median peer 22 s
    assert ' met ' in lines[1] and '8.4x' in lines[1]


def test_goals_missed():
    lines = nova_nodes.goals(two_rounds(peer_link=46 * MB, cache_marker=30))
    assert ' MISSED ' in lines[0] and '2.00x' in lines[0]
    assert ' MISSED ' in lines[1]


def test_no_peer_flow_no_goals():
    rows = [r for r in two_rounds() if r['flow'] != 'peer']
    assert nova_nodes.goals(rows) == []


def test_table_per_flow_median_over_rounds():
    rows = two_rounds()
    rows.append(row(2, 'pre-cache', 'node-1', 18.0, 2245 * MB, warm=180.0))
    lines = nova_nodes.table(rows, 1 << 30)
    assert lines[1].split()[:4] == ['peer', '2', '11.0/12.0', '22.0/24.0']
    assert lines[1].split()[5:] == ['25.0', '23.0', '23.0']
    assert lines[3].split()[:5] == ['pre-cache', '1', '9.0/9.0',
                                    '18.0/18.0', '180.0']
    assert 'image 1073.7 MB' in lines[-1]


def test_plot_written(tmp_path):
    message = nova_nodes.plot(two_rounds(), str(tmp_path))
    if message.startswith('matplotlib is not installed'):
        assert not (tmp_path / 'results.png').exists()
    else:
        assert (tmp_path / 'results.png').stat().st_size > 1000
