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

"""StoreLocation parsing (fuzzed) and the extra cinder:// and rbd:// ones."""

import json
import random
import uuid

from glance_store import exceptions
from glance_store import location as gs_location
from oslo_config import cfg
import pytest

from glance_thunder_store import extra_locations
from glance_thunder_store import location as location_mod
from thunder_common import locations

VOLUME = '0b6bcd3c-9a1f-4d8e-8f5e-3c2f4d1a9e77'
FSID = 'a7f64266-0894-4f1e-a635-d0aeaa0e4cc7'
VALID = [
    'thunder://%s' % VOLUME,
    'thunder://fast/%s' % VOLUME,
    'cinder://%s' % VOLUME,
    'cinder://fast/%s' % VOLUME,
    'rbd://%s/volumes/volume-%s/thunder-clone-0123456789abcdef' % (FSID,
                                                                   VOLUME),
]
HOSTILE = [
    '', 'thunder', 'thunder:', 'thunder:/', 'thunder://', 'thunder:///',
    'thunder:////', 'thunder://a/b/%s' % VOLUME,
    'thunder://../%s' % VOLUME, 'thunder://%2e%2e/' + VOLUME,
    'thunder://%s?x=1' % VOLUME, 'thunder://%s#frag' % VOLUME,
    'thunder://user:pass@host/%s' % VOLUME,
    'thunder://%s/' % VOLUME, 'thunder:// %s' % VOLUME,
    'thunder://%s\n' % VOLUME, 'thunder://%s\x00' % VOLUME,
    'THUNDER://%s' % VOLUME, 'thunder+http://%s' % VOLUME,
    'file:///etc/passwd', 'http://example.com/%s' % VOLUME,
    'thunder://' + 'a' * 5000, 'thunder://%s' % ('0' * 32 + '0'),
    'thunder://{%s}' % VOLUME, 'thunder://urn:uuid:%s' % VOLUME,
    'thunder://st\u00f6re/%s' % VOLUME, 'thunder://-x/%s' % VOLUME,
    'rbd://', 'rbd://%s' % FSID, 'rbd://%s/pool' % FSID,
    'rbd://%s/pool/image' % FSID, 'rbd://%s/pool/image/' % FSID,
    'rbd://%s//image/snap' % FSID, 'rbd://not-a-uuid/p/i/s',
    'rbd://%s/p/i/s/extra' % FSID, 'rbd://%s/p/i%%2Fx/s' % FSID,
    'rbd://%s/p/i%%40x/s' % FSID, 'rbd://%s/p/i/s%%00' % FSID,
    'rbd://%s/p/i/%%ff' % FSID, 'rbd://%s/p/i/s%%0a' % FSID,
    'rbd://%s/p/%s/s' % (FSID, 'x' * 300),
    'rbd://%s/p/i/s?q' % FSID,
]


def _parse(url):
    loc = location_mod.StoreLocation({}, cfg.CONF)
    loc.parse_uri(url)
    return loc


@pytest.mark.parametrize('url', VALID)
def test_valid_locations_round_trip(url):
    loc = _parse(url)
    assert loc.get_uri() == url
    assert _parse(loc.get_uri()).get_uri() == url


def test_kinds():
    thunder, thunder_store, cinder, cinder_store, rbd = map(_parse, VALID)
    assert thunder.volume_id == VOLUME and not thunder.is_alias
    assert thunder_store.parsed.store == 'fast'
    assert cinder.is_alias and cinder.volume_id == VOLUME
    assert cinder_store.scheme == 'cinder'
    assert rbd.is_alias and rbd.volume_id is None and rbd.scheme == 'rbd'


def test_uuid_is_canonicalised():
    loc = _parse('thunder://%s' % VOLUME.upper().replace('-', ''))
    assert loc.get_uri() == 'thunder://%s' % VOLUME


def test_from_specs():
    loc = location_mod.StoreLocation({'volume_id': VOLUME, 'store': 'b'},
                                     cfg.CONF)
    assert loc.get_uri() == 'thunder://b/%s' % VOLUME


@pytest.mark.parametrize('url', HOSTILE)
def test_hostile_locations_are_refused_clearly(url):
    with pytest.raises(exceptions.BadStoreUri) as caught:
        _parse(url)
    assert 'Invalid image location' in str(caught.value)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize('value', [None, 42, b'thunder://x', ['thunder://']])
def test_non_strings_are_refused(value):
    with pytest.raises(exceptions.BadStoreUri, match='not a string'):
        _parse(value)


@pytest.mark.parametrize('url', VALID[:4])
def test_every_truncation_of_a_volume_location_is_refused(url):
    for cut in range(len(url)):
        with pytest.raises(exceptions.BadStoreUri):
            _parse(url[:cut])


def test_truncations_of_an_rbd_location_never_misparse():
    url = VALID[4]
    for cut in range(len(url)):
        try:
            loc = _parse(url[:cut])
        except exceptions.BadStoreUri:
            continue
        # Only a shorter snapshot name can still be valid.
        assert url.startswith(loc.get_uri())
        assert loc.parsed.image == 'volume-%s' % VOLUME


def test_fuzzed_locations_parse_or_fail_cleanly():
    rng = random.Random(1234)
    alphabet = ('abcdef0123456789-/:%?#@.\x00\n \u00e9\ud800' +
                'ABCDEF')
    for _ in range(5000):
        url = list(rng.choice(VALID))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(url) + 1)
            if op == 0 and url:
                del url[min(pos, len(url) - 1)]
            elif op == 1:
                url.insert(pos, rng.choice(alphabet))
            elif url:
                url[min(pos, len(url) - 1)] = rng.choice(alphabet)
        url = ''.join(url)
        try:
            loc = _parse(url)
        except exceptions.BadStoreUri:
            continue
        # Whatever parses must be a clean location that re-parses to
        # itself.
        again = _parse(loc.get_uri())
        assert again.get_uri() == loc.get_uri()


def test_glance_location_object():
    loc = gs_location.Location('thunder', location_mod.StoreLocation,
                               cfg.CONF, uri=VALID[1], backend='fast')
    assert loc.get_store_uri() == VALID[1]


# -- the extra locations ---------------------------------------------------

RBD_META = {'thunder_rbd_fsid': FSID, 'thunder_rbd_pool': 'volumes',
            'thunder_rbd_image': 'volume-%s' % VOLUME,
            'thunder_rbd_snapshot': 'thunder-clone-0123456789abcdef'}


def test_extra_locations_single_store():
    extra = extra_locations.extra_locations(VALID[0], dict(RBD_META))
    assert extra == [{'url': 'cinder://%s' % VOLUME, 'metadata': {}},
                     {'url': VALID[4], 'metadata': {}}]


def test_extra_locations_multi_store():
    meta = dict(RBD_META, store='fast')
    extra = extra_locations.extra_locations(VALID[1], meta)
    assert extra == [
        {'url': 'cinder://fast/%s' % VOLUME, 'metadata': {'store': 'fast'}},
        {'url': VALID[4], 'metadata': {'store': 'fast'}}]


def test_extra_locations_without_rbd_facts():
    extra = extra_locations.extra_locations(VALID[0], {})
    assert [e['url'] for e in extra] == ['cinder://%s' % VOLUME]


@pytest.mark.parametrize('url', VALID[2:] + ['http://x/y'])
def test_extra_locations_need_a_thunder_location(url):
    with pytest.raises(locations.InvalidLocation):
        extra_locations.extra_locations(url, RBD_META)


@pytest.mark.parametrize('key, value', [
    ('thunder_rbd_fsid', 'nope'), ('thunder_rbd_pool', 'a/b'),
    ('thunder_rbd_snapshot', 'x\ny'), ('thunder_rbd_image', 'i@s')])
def test_extra_locations_refuse_bad_rbd_facts(key, value):
    with pytest.raises(locations.InvalidLocation):
        extra_locations.extra_locations(VALID[0], dict(RBD_META,
                                                       **{key: value}))


def test_json_patch_and_command_line(capsys):
    ops = extra_locations.json_patch(VALID[0], RBD_META)
    assert [op['op'] for op in ops] == ['add', 'add']
    assert {op['path'] for op in ops} == {'/locations/-'}
    assert extra_locations.main([VALID[0], json.dumps(RBD_META)]) == 0
    assert json.loads(capsys.readouterr().out) == ops
    assert extra_locations.main([VALID[0]]) == 2
    assert extra_locations.main(['bad', '{}']) == 1
    assert extra_locations.main([VALID[0], '[1]']) == 1


def test_extra_locations_are_served_by_the_store():
    for extra in extra_locations.extra_locations(str(VALID[0]), RBD_META):
        assert _parse(extra['url']).is_alias


def test_random_volume_ids():
    for _ in range(100):
        volume = str(uuid.uuid4())
        assert _parse('thunder://%s' % volume).volume_id == volume


# -- the location with the image id -----------------------------------------

IMAGE = '5e1f0c2a-7d3b-4a9e-b8c6-2f4d6a8e0b13'
NEW_FORM = ['thunder://%s?image_id=%s' % (VOLUME, IMAGE),
            'thunder://fast/%s?image_id=%s' % (VOLUME, IMAGE),
            'thunder://%s?image_id=%s' % (VOLUME, IMAGE.upper())]
# Each is NEW_FORM[0] or [1] with one thing wrong.
MALFORMED_NEW_FORM = [
    'thunder://%s?image_id=' % VOLUME,
    'thunder://%s?image_id' % VOLUME,
    'thunder://%s?' % VOLUME,
    'thunder://%s??image_id=%s' % (VOLUME, IMAGE),
    'thunder://%s?=%s' % (VOLUME, IMAGE),
    'thunder://%s?image=%s' % (VOLUME, IMAGE),
    'thunder://%s?IMAGE_ID=%s' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s&image_id=%s' % (VOLUME, IMAGE, IMAGE),
    'thunder://%s?image_id=%s&x=1' % (VOLUME, IMAGE),
    'thunder://%s?x=1&image_id=%s' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s&' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s;x' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s?image_id=%s' % (VOLUME, IMAGE, IMAGE),
    'thunder://%s?image_id=%s#frag' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s/' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s/%s' % (VOLUME, IMAGE, VOLUME),
    'thunder://%s?image_id= %s' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s\n' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s\x00' % (VOLUME, IMAGE),
    'thunder://%s?image_id={%s}' % (VOLUME, IMAGE),
    'thunder://%s?image_id=urn:uuid:%s' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s' % (VOLUME, IMAGE.replace('-', '')),
    'thunder://%s?image_id=%s' % (VOLUME, IMAGE[:-1]),
    'thunder://%s?image_id=%s0' % (VOLUME, IMAGE),
    'thunder://%s?image_id=%s' % (VOLUME, 'g' + IMAGE[1:]),
    'thunder://%s?image_id=%s' % (VOLUME, '\uff15' + IMAGE[1:]),
    'thunder://%s?image_id=%%35%s' % (VOLUME, IMAGE[1:]),
    'thunder://%s?image_id=%s' % (VOLUME, IMAGE.replace('-', '%2D')),
    'thunder://?image_id=%s' % IMAGE,
    'thunder://%s/?image_id=%s' % (VOLUME, IMAGE),
    'thunder://fast/?image_id=%s' % IMAGE,
    'thunder://a/fast/%s?image_id=%s' % (VOLUME, IMAGE),
    'thunder://%s&image_id=%s' % (VOLUME, IMAGE),
    'cinder://%s?image_id=%s' % (VOLUME, IMAGE),
    'cinder://fast/%s?image_id=%s' % (VOLUME, IMAGE),
    'rbd://%s/volumes/volume-%s/snap?image_id=%s' % (FSID, VOLUME, IMAGE),
]


@pytest.mark.parametrize('url', NEW_FORM)
def test_location_with_the_image_id_round_trips(url):
    loc = _parse(url)
    assert loc.get_uri() == url
    assert loc.volume_id == VOLUME and not loc.is_alias
    assert loc.image_id in (IMAGE, IMAGE.upper())


@pytest.mark.parametrize('url', MALFORMED_NEW_FORM)
def test_malformed_locations_with_an_image_id_are_refused(url):
    # The well-formed location parses; this one, one thing off, does not.
    assert _parse(NEW_FORM[0]).image_id == IMAGE
    with pytest.raises(exceptions.BadStoreUri) as caught:
        _parse(url)
    assert 'Invalid image location' in str(caught.value)


def test_from_specs_with_the_image_id():
    loc = location_mod.StoreLocation(
        {'volume_id': VOLUME, 'store': 'fast', 'image_id': IMAGE}, cfg.CONF)
    assert loc.get_uri() == NEW_FORM[1]


def test_aliases_name_no_image():
    for url in VALID[2:] + VALID[:2]:
        assert _parse(url).image_id is None


def test_truncations_of_a_location_with_an_image_id():
    # Cut anywhere, it is refused, or it is the older form exactly: never
    # a location naming another image.
    url = NEW_FORM[1]
    older = url.split('?')[0]
    for cut in range(len(url)):
        try:
            loc = _parse(url[:cut])
        except exceptions.BadStoreUri:
            continue
        assert loc.get_uri() == older and loc.image_id is None


def test_extra_locations_of_a_location_with_an_image_id():
    extra = extra_locations.extra_locations(NEW_FORM[1],
                                            dict(RBD_META, store='fast'))
    assert [e['url'] for e in extra] == ['cinder://fast/%s' % VOLUME,
                                         VALID[4]]
