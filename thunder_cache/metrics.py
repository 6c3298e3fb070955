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

"""Counters and histograms, rendered in the Prometheus text format."""

import bisect
import threading

# Seconds; chunk fetches range from a page-cache hit on a peer (100 us) to
# a slow origin (seconds).
FETCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# name -> help text, for the counters of one image.
IMAGE_COUNTERS = {
    'chunk_hits': 'Chunk reads served from the local cache.',
    'chunk_misses': 'Chunk reads that started a fetch.',
    'inflight_joins': 'Chunk reads that waited for a fetch another reader '
                      'had already started (shared in-flight fetches).',
    'inflight_overdue': 'Chunk reads that stopped waiting for a fetch in '
                        'flight because it overran its source\'s time '
                        'limit.',
    'inflight_bypasses': 'Peer requests served by a fetch of their own '
                         'rather than by joining one whose ticket was '
                         'younger (which could have waited in a cycle).',
    'chunks_from_origin': 'Verified chunks fetched from the origin.',
    'chunks_from_peers': 'Verified chunks fetched from peer nodes.',
    'bytes_from_origin': 'Verified bytes fetched from the origin.',
    'bytes_from_peers': 'Verified bytes fetched from peer nodes.',
    'chunks_served_to_peers': 'Chunks sent to peer nodes.',
    'bytes_served_to_peers': 'Bytes sent to peer nodes.',
    'bytes_served_local': 'Bytes sent to local readers (the Unix socket).',
    'chunks_verified': 'Fetched chunks whose sha256 matched the manifest.',
    'chunks_rejected': 'Fetched chunks thrown away because their sha256 '
                       'did not match the manifest.',
    'chunks_reverified': 'Chunks found in the cache at start and verified '
                         'again before their first use.',
    'local_corrupt': 'Chunks of the cache file found corrupt on '
                     're-verification and fetched again.',
    'fetch_errors': 'Fetch attempts that failed (error, timeout, refused, '
                    'bad data) before another source was tried.',
    'fetch_failures': 'Chunk fetches that failed on every source.',
    'cache_full_errors': 'Fetched chunks not stored because the cache '
                         'filesystem was full (ENOSPC or EDQUOT); the read '
                         'is retried or fails, the chunk is never served '
                         'half-written.',
    'read_retries': 'Local reads retried after their chunk\'s fetch '
                    'failed on every source (see [cache] read_retry).',
    'chunks_prefetched': 'Chunks fetched ahead of the readers by the '
                         'replay of a boot trace.',
    'chunks_hydrated': 'Chunks fetched by the background hydration of '
                       'the whole image.',
    'prefetch_hits': 'Chunks whose first local read found them already '
                     'fetched by the prefetch or the hydration.',
    'prefetch_joins': 'Chunk reads that waited for a prefetch or '
                      'hydration fetch already in flight (the prefetch '
                      'was late).',
}


class Counters:
    """Named integer counters; thread-safe."""

    def __init__(self, names):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def inc(self, name, amount=1):
        with self._lock:
            self._values[name] += amount

    def get(self, name):
        return self._values[name]

    def snapshot(self):
        with self._lock:
            return dict(self._values)


class Histogram:
    """A cumulative histogram with fixed upper bounds; thread-safe."""

    def __init__(self, buckets=FETCH_BUCKETS):
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0

    def observe(self, value):
        slot = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[slot] += 1
            self._sum += value

    def snapshot(self):
        """(cumulative counts per bucket incl. +Inf, sum, count)."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative = []
        running = 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total, running


def _labels(labels):
    if not labels:
        return ''
    return '{%s}' % ','.join('%s="%s"' % (k, _escape(str(v)))
                             for k, v in sorted(labels.items()))


def _escape(value):
    return (value.replace('\\', '\\\\').replace('"', '\\"')
            .replace('\n', '\\n'))


def _number(value):
    if isinstance(value, float):
        return repr(value)
    return str(value)


class Exposition:
    """Builds a Prometheus text-format page, family by family."""

    def __init__(self):
        self._families = {}

    def add(self, name, kind, help_text, value, labels=None):
        family = self._families.setdefault(name, (kind, help_text, []))
        family[2].append('%s%s %s' % (name, _labels(labels),
                                      _number(value)))

    def add_histogram(self, name, help_text, histogram, labels=None):
        counts, total, count = histogram.snapshot()
        family = self._families.setdefault(name,
                                           ('histogram', help_text, []))
        labels = dict(labels or {})
        bounds = [repr(float(b)) for b in histogram.buckets] + ['+Inf']
        for bound, c in zip(bounds, counts):
            family[2].append('%s_bucket%s %d' % (
                name, _labels(dict(labels, le=bound)), c))
        family[2].append('%s_sum%s %r' % (name, _labels(labels), total))
        family[2].append('%s_count%s %d' % (name, _labels(labels), count))

    def render(self):
        lines = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append('# HELP %s %s' % (name, help_text))
            lines.append('# TYPE %s %s' % (name, kind))
            lines.extend(samples)
        return '\n'.join(lines) + '\n'
