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

"""Parsing of image location URIs, including hostile input."""

import random

import pytest

from thunder_common import locations

VOL = '0b7c3a1e-5d4f-4c2b-9a8e-1f2d3c4b5a69'
FSID = '6f0e8cf9-1b2d-4e55-9d0a-7c7f5a4e2b10'


@pytest.mark.parametrize('url, expected', [
    ('thunder://' + VOL, locations.VolumeLocation('thunder', VOL)),
    ('cinder://' + VOL, locations.VolumeLocation('cinder', VOL)),
    ('thunder://store1/' + VOL,
     locations.VolumeLocation('thunder', VOL, 'store1')),
    ('cinder://fast_ceph-2.a/' + VOL,
     locations.VolumeLocation('cinder', VOL, 'fast_ceph-2.a')),
    ('cinder://_/' + VOL, locations.VolumeLocation('cinder', VOL, '_')),
    # Ids are canonicalised: upper case, no dashes.
    ('thunder://' + VOL.upper(), locations.VolumeLocation('thunder', VOL)),
    ('thunder://' + VOL.replace('-', ''),
     locations.VolumeLocation('thunder', VOL)),
    ('rbd://%s/volumes/volume-%s/snap' % (FSID, VOL),
     locations.RbdLocation(FSID, 'volumes', 'volume-' + VOL, 'snap')),
    ('rbd://%s/images/img/snap' % FSID.upper().replace('-', ''),
     locations.RbdLocation(FSID, 'images', 'img', 'snap')),
    # Percent-encoding is decoded, including characters that are fine in
    # names but special in URIs.
    ('rbd://%s/a%%3Ab/s%%25/%%41' % FSID,
     locations.RbdLocation(FSID, 'a:b', 's%', 'A')),
    ('rbd://%s/p%%3Aq/%%C3%%A9t%%C3%%A9/%%7Esnap' % FSID,
     locations.RbdLocation(FSID, 'p:q', '\u00e9t\u00e9', '~snap')),
    ('rbd://%s/p/%s/s' % (FSID, 'x' * 255),
     locations.RbdLocation(FSID, 'p', 'x' * 255, 's')),
])
def test_valid_locations(url, expected):
    parsed = locations.parse(url)
    assert parsed == expected
    assert locations.parse(parsed.url) == parsed


@pytest.mark.parametrize('location, url', [
    (locations.VolumeLocation('thunder', VOL), 'thunder://' + VOL),
    (locations.VolumeLocation('cinder', VOL, 's'), 'cinder://s/' + VOL),
    (locations.RbdLocation(FSID, 'p', 'a b/c@d', 's%'),
     'rbd://%s/p/a%%20b%%2Fc%%40d/s%%25' % FSID),
])
def test_url_formatting(location, url):
    assert location.url == url


def test_thunder_and_cinder_location_helpers():
    assert locations.thunder_location(VOL.upper()).url == 'thunder://' + VOL
    assert (locations.cinder_location(VOL, 'glance1').url ==
            'cinder://glance1/' + VOL)
    for bad in ('', 'not-a-uuid', VOL + '\n', VOL[:-1]):
        with pytest.raises(ValueError):
            locations.thunder_location(bad)


LONG = 'rbd://%s/p/%s/s' % (FSID, 'x' * 3000)


@pytest.mark.parametrize('location, reason', [
    (None, 'not a string'),
    (b'thunder://' + VOL.encode(), 'not a string'),
    (42, 'not a string'),
    (LONG, 'longer than 2048'),
    ('', 'no scheme'),
    (VOL, 'no scheme'),
    ('thunder:' + VOL, 'no scheme'),
    ('http://' + VOL, 'unsupported scheme'),
    ('THUNDER://' + VOL, 'unsupported scheme'),
    ('file:///etc/passwd', 'unsupported scheme'),
    ('thunder://', 'volume id is not a UUID'),
    ('thunder://not-a-uuid', 'volume id is not a UUID'),
    ('thunder://' + VOL[:-1], 'volume id is not a UUID'),
    ('thunder://' + VOL + '0', 'volume id is not a UUID'),
    ('thunder://' + VOL + '\n', 'volume id is not a UUID'),
    # Mixed dashes: 0b7c3a1e5d4f-4c2b-...
    ('thunder://' + VOL.replace('-', '', 1), 'volume id is not a UUID'),
    ('thunder://s/' + VOL + '/x', 'expected thunder://[STORE/]VOLUME_ID'),
    ('cinder://a/b/' + VOL, 'expected cinder://[STORE/]VOLUME_ID'),
    ('thunder:///' + VOL, 'invalid store name'),
    ('thunder://-store/' + VOL, 'invalid store name'),
    ('thunder://.store/' + VOL, 'invalid store name'),
    ('thunder://%s/%s' % ('s' * 65, VOL), 'invalid store name'),
    ('thunder://st ore/' + VOL, 'invalid store name'),
    ('thunder://store\n/' + VOL, 'invalid store name'),
    ('thunder://st%2Fore/' + VOL, 'invalid store name'),
    ('thunder://' + VOL + '/', 'volume id is not a UUID'),
    ('thunder://' + VOL + '?x=1', 'query or fragment'),
    ('cinder://' + VOL + '#frag', 'query or fragment'),
    ('rbd://%s/p/i/s?x' % FSID, 'query or fragment'),
    ('rbd://%s/p/i/s#x' % FSID, 'query or fragment'),
    ('rbd://', 'got 1 components'),
    ('rbd://%s/p/i' % FSID, 'got 3 components'),
    ('rbd://%s/p/i/s/' % FSID, 'got 5 components'),
    ('rbd://%s/p/i/s/x' % FSID, 'got 5 components'),
    ('rbd://%s//i/s' % FSID, 'empty component'),
    ('rbd://%s/p/i/' % FSID, 'empty component'),
    ('rbd:///p/i/s', 'empty component'),
    ('rbd://%s/p/%s/s' % (FSID, 'x' * 256), 'longer than 255'),
    ('rbd://%s/p/%s/s' % (FSID, '%41' * 256), 'longer than 255'),
    ('rbd://%s/p/i%%ff/s' % FSID, 'invalid percent-encoding'),
    ('rbd://%s/p/i%%C3/s' % FSID, 'invalid percent-encoding'),
    ('rbd://not-a-fsid/p/i/s', 'fsid is not a UUID'),
    ('rbd://%s%%0A/p/i/s' % FSID, 'fsid is not a UUID'),
    ('rbd://%s/p/i%%2Fj/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i@j/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i%%40j/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i%%00/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i%%20j/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i j/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i\tj/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i%%7F/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i\x85/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i\u2028/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i%%E2%%80%%AE/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/\ud800/s' % FSID, 'forbidden character'),
    ('rbd://%s/p/i/s\n' % FSID, 'forbidden character'),
])
def test_invalid_locations(location, reason):
    with pytest.raises(locations.InvalidLocation) as info:
        locations.parse(location)
    assert reason in info.value.reason
    assert reason in str(info.value)
    assert str(info.value).startswith('Invalid image location ')
    assert isinstance(info.value, ValueError)


def test_invalid_location_message_is_truncated():
    with pytest.raises(locations.InvalidLocation) as info:
        locations.parse(LONG)
    assert info.value.location == LONG
    message = str(info.value)
    assert len(message) < 300
    assert "...'" in message


def test_location_objects_are_immutable():
    loc = locations.parse('thunder://' + VOL)
    with pytest.raises(AttributeError):
        loc.volume_id = 'other'


# -- fuzzing ------------------------------------------------------------------

SEEDS = [
    'thunder://' + VOL,
    'cinder://store/' + VOL,
    'thunder://' + VOL.replace('-', ''),
    'rbd://%s/volumes/volume-%s/thunder-clone-0123456789abcdef' % (FSID, VOL),
    'rbd://%s/images/%s/snap' % (FSID, VOL),
    'rbd://%s/p%%3Aq/%%C3%%A9/s' % FSID,
]
# Characters a hostile or broken location is likely to carry.
ALPHABET = ('/:@%?#.-_ aF0\t\n\r\x00\x7f\x85\u00e9\u2028\u202e\ud800'
            '\U0001f600' + '%2F%00%ff%C3%E2%80%AE%41')


def _mutate(rng, text):
    op = rng.randrange(8)
    pos = rng.randrange(len(text) + 1)
    if op == 0 and text:  # delete a character
        return text[:pos] + text[pos + 1:]
    if op == 1:  # insert a character
        return text[:pos] + rng.choice(ALPHABET) + text[pos:]
    if op == 2 and text:  # replace a character
        return text[:pos] + rng.choice(ALPHABET) + text[pos + 1:]
    if op == 3:  # truncate
        return text[:pos]
    if op == 4:  # duplicate a slice
        end = rng.randrange(pos, len(text) + 1)
        return text[:end] + text[pos:end] + text[end:]
    if op == 5:  # percent-encode one character
        if pos < len(text):
            return (text[:pos] + '%%%02X' % (ord(text[pos]) & 0xff) +
                    text[pos + 1:])
        return text
    if op == 6:  # swap the scheme
        scheme = rng.choice(['rbd', 'thunder', 'cinder', 'RBD', '', 'x'])
        return scheme + text[text.find(':'):] if ':' in text else text
    return text * rng.randrange(1, 40)  # blow up the length


def _check_one(location):
    try:
        parsed = locations.parse(location)
    except locations.InvalidLocation as e:
        assert e.reason and str(e).startswith('Invalid image location ')
        return False
    assert isinstance(parsed, (locations.VolumeLocation,
                               locations.RbdLocation))
    fields = [getattr(parsed, f) for f in parsed.__dataclass_fields__]
    for value in fields:
        if value is None:
            continue
        assert isinstance(value, str) and value
        assert value.isprintable(), value
        value.encode('utf-8')  # what librbd will be handed
    if isinstance(parsed, locations.RbdLocation):
        for name in (parsed.pool, parsed.image, parsed.snapshot):
            assert '/' not in name and '@' not in name
    assert locations.parse(parsed.url) == parsed
    return True


def _fuzz(seeds, seed, rounds):
    """{parsed: count} over ``rounds`` mutations of the seeds."""
    rng = random.Random(seed)
    outcomes = {True: 0, False: 0}
    for _ in range(rounds):
        text = rng.choice(seeds)
        for _ in range(rng.randrange(1, 4)):
            text = _mutate(rng, text)
        outcomes[_check_one(text)] += 1
    return outcomes


def test_fuzz_mutated_locations():
    """Every mutation parses to a sane object or raises InvalidLocation."""
    outcomes = _fuzz(SEEDS, 20240611, 6000)
    # The fuzzing is meaningful only if both outcomes happen often.
    assert outcomes[True] > 300, outcomes
    assert outcomes[False] > 3000, outcomes


def test_fuzz_random_garbage():
    rng = random.Random(7)
    for _ in range(2000):
        length = rng.randrange(0, 80)
        text = ''.join(rng.choice(ALPHABET + 'rbdthunercinz')
                       for _ in range(length))
        for prefix in ('', 'rbd://', 'thunder://', 'cinder://'):
            _check_one(prefix + text)


# -- thunder:// with the image id ------------------------------------------

IMG = '9c2e4b6d-1a3f-4e5b-8d7c-6b5a4f3e2d10'


def test_location_with_the_image_id():
    url = 'thunder://store1/%s?image_id=%s' % (VOL, IMG)
    parsed = locations.parse(url)
    assert parsed == locations.VolumeLocation('thunder', VOL, 'store1', IMG)
    assert parsed.url == url
    assert locations.thunder_location(VOL.upper(), 'store1', IMG).url == url
    # The image id is kept as Glance wrote it, to be compared exactly.
    upper = locations.parse('thunder://%s?image_id=%s' % (VOL, IMG.upper()))
    assert upper.image_id == IMG.upper()
    assert locations.parse('thunder://' + VOL).image_id is None


@pytest.mark.parametrize('image_id', [
    '', IMG.replace('-', ''), IMG + '\n', IMG[:-1], '{%s}' % IMG, 42,
    b'x', 'x&image_id=' + IMG])
def test_thunder_location_helper_refuses_bad_image_ids(image_id):
    with pytest.raises(ValueError):
        locations.thunder_location(VOL, image_id=image_id)


@pytest.mark.parametrize('location, reason', [
    ('thunder://%s?image_id=' % VOL, 'image id is not a dashed UUID'),
    ('thunder://%s?image_id=%s' % (VOL, IMG.replace('-', '')),
     'image id is not a dashed UUID'),
    ('thunder://%s?image_id=%s&a=b' % (VOL, IMG),
     'image id is not a dashed UUID'),
    ('thunder://%s?image_id=%s%%0A' % (VOL, IMG),
     'image id is not a dashed UUID'),
    ('thunder://%s?image=%s' % (VOL, IMG), 'but ?image_id=IMAGE_ID'),
    ('thunder://%s?image_id' % VOL, 'but ?image_id=IMAGE_ID'),
    ('cinder://%s?image_id=%s' % (VOL, IMG), 'but ?image_id=IMAGE_ID in a '
     'thunder:// location'),
    ('thunder://%s?image_id=%s#x' % (VOL, IMG), 'query or fragment'),
    ('thunder://a/b/%s?image_id=%s' % (VOL, IMG),
     'expected thunder://[STORE/]VOLUME_ID'),
])
def test_invalid_locations_with_an_image_id(location, reason):
    # Next to a valid one: the parser tells them apart.
    assert locations.parse('thunder://%s?image_id=%s' % (VOL, IMG))
    with pytest.raises(locations.InvalidLocation) as info:
        locations.parse(location)
    assert reason in info.value.reason


def test_fuzz_mutated_locations_with_an_image_id():
    """Mutations parse to a sane, stable object or raise InvalidLocation."""
    seeds = ['thunder://%s?image_id=%s' % (VOL, IMG),
             'thunder://fast/%s?image_id=%s' % (VOL.upper(), IMG)]
    outcomes = _fuzz(seeds, 20260801, 4000)
    assert outcomes[True] > 100, outcomes
    assert outcomes[False] > 2000, outcomes


@pytest.mark.parametrize('name, template, expected', [
    ('volume-%s' % VOL, 'volume-%s', VOL),
    ('volume-%s' % VOL.upper(), 'volume-%s', VOL),
    ('v-%s.img' % VOL, 'v-%s.img', VOL),
    ('volume-%s' % VOL, 'other-%s', None),
    ('volume-', 'volume-%s', None),
    ('volume-not-a-uuid', 'volume-%s', None),
    ('volume-%s' % VOL, 'no-placeholder', None),
])
def test_volume_id_from_name(name, template, expected):
    assert locations.volume_id_from_name(name, template) == expected
