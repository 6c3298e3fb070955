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

"""Chunk sources and an upstream made up for the image cache's tests."""

import threading
import time

from thunder_cache.cache import image_cache
from thunder_cache.peer import sources


class FakeSource(sources.Origin):

    def __init__(self, image, name='fake', kind='origin', corrupt=(),
                 fail=(), delay=0.0, url=None):
        self.image = image
        self.name = name
        self.kind = kind
        self.url = url
        self.corrupt = set(corrupt)
        self.fail = set(fail)
        self.delay = delay
        self.calls = []
        self.lock = threading.Lock()

    def read_chunk(self, index, offset, length, via=(), ticket=None):
        with self.lock:
            self.calls.append(index)
        if self.delay:
            time.sleep(self.delay)
        if index in self.fail or 'all' in self.fail:
            raise IOError('%s cannot read %d' % (self.name, index))
        data = bytearray(self.image[offset:offset + length])
        if index in self.corrupt or 'all' in self.corrupt:
            data[0] ^= 0xff
        return data


class GatedSource(FakeSource):
    """A FakeSource whose reads wait while their chunk is held.

    ``started`` lists the chunks asked for, in order, as the reads begin;
    ``active`` and ``max_active`` count the reads in progress.
    """

    def __init__(self, image, hold=None, **kwargs):
        super().__init__(image, **kwargs)
        self.changed = threading.Condition()
        # Chunks held: every chunk when None.
        self.hold = hold
        self.released = set()
        self.started = []
        self.active = 0
        self.max_active = 0

    def _held(self, index):
        if index in self.released:
            return False
        return self.hold is None or index in self.hold

    def release(self, index=None):
        """Let reads of ``index`` (of every chunk if None) proceed."""
        with self.changed:
            if index is None:
                self.hold = set()
            else:
                self.released.add(index)
            self.changed.notify_all()

    def wait_for(self, predicate, timeout=30):
        """Wait until ``predicate()`` (which may look beyond the source)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                assert time.monotonic() < deadline, 'timed out'
                self.changed.wait(0.01)

    def read_chunk(self, index, offset, length, via=(), ticket=None):
        with self.changed:
            self.started.append(index)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.changed.notify_all()
            released = self.changed.wait_for(lambda: not self._held(index),
                                             30)
        try:
            if not released:
                raise IOError('chunk %d held for too long' % index)
            return super().read_chunk(index, offset, length, via, ticket)
        finally:
            with self.changed:
                self.active -= 1
                self.changed.notify_all()


class FakeUpstream:

    def __init__(self, *sources_):
        self.sources = list(sources_)
        self.reports = []

    def candidates(self, via=(), index=None):
        for source in self.sources:
            if getattr(source, 'url', None) not in via or source.url is None:
                yield source

    def report(self, source, ok, error=None):
        self.reports.append((source.name, ok, error))

    forgiven = 0

    def forgive(self):
        self.forgiven += 1


def cache_over(tmp_path, manifest, *sources_, **kwargs):
    """An ImageCache of ``manifest`` in ``tmp_path`` over these sources."""
    return image_cache.ImageCache(str(tmp_path / 'img'), 'img', manifest,
                                  FakeUpstream(*sources_), **kwargs)
