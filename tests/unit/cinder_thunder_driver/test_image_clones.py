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

"""Which images clone in O(1), and the log and counters of the others."""

import logging
import uuid

import pytest

from cinder_thunder_driver import image_clones
from tests.unit.cinder_thunder_driver import fakes

RAW = {'id': 'glance-image-1', 'disk_format': 'raw',
       'container_format': 'bare'}


@pytest.mark.parametrize('meta, volume_args, reason', [
    (RAW, {}, None),
    (dict(RAW, container_format=None), {}, None),
    ({'id': 'i', 'disk_format': 'raw'}, {}, None),
    (dict(RAW, disk_format='qcow2'), {}, image_clones.NOT_RAW),
    (dict(RAW, disk_format=None), {}, image_clones.NOT_RAW),
    ({'id': 'i'}, {}, image_clones.NOT_RAW),
    (dict(RAW, container_format='ova'), {}, image_clones.NOT_BARE),
    (RAW, {'encryption_key_id': str(uuid.uuid4())}, image_clones.ENCRYPTED),
])
def test_not_cloneable(meta, volume_args, reason):
    found = image_clones.not_cloneable(fakes.Volume(**volume_args), meta)
    assert (found and found[0]) == reason


def test_counters_start_at_zero():
    assert image_clones.ImageClones().stats() == {
        image_clones.STAT_CLONES: 0, image_clones.STAT_DECLINED: 0,
        image_clones.STAT_REASONS: {}}


def test_declined_is_logged_with_the_advice_and_counted(caplog):
    caplog.set_level(logging.INFO)
    counts = image_clones.ImageClones()
    volume = fakes.Volume()
    meta = dict(RAW, disk_format='qcow2')
    counts.declined(volume, meta, *image_clones.not_cloneable(volume, meta))
    counts.declined(volume, RAW, image_clones.NO_LOCATION, 'no location')
    counts.cloned()
    [first, second] = [r.getMessage() for r in caplog.records
                       if r.levelno == logging.WARNING]
    assert volume.id in first and RAW['id'] in first
    assert 'disk format is qcow2, not raw' in first
    assert 'image-create-via-import' in first
    assert 'thunder Glance store' in second
    assert counts.stats() == {
        image_clones.STAT_CLONES: 1, image_clones.STAT_DECLINED: 2,
        image_clones.STAT_REASONS: {image_clones.NOT_RAW: 1,
                                    image_clones.NO_LOCATION: 1}}


def test_stats_are_a_copy():
    counts = image_clones.ImageClones()
    stats = counts.stats()
    stats[image_clones.STAT_REASONS]['x'] = 1
    assert counts.stats()[image_clones.STAT_REASONS] == {}
