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

"""Background flattening with bounded concurrency.

A volume cloned deeper than ``thunder_max_clone_depth`` is handed out at
once and queued here; a fixed number of workers flatten the queue, so a
burst of deep clones never turns into a flatten storm and never blocks an
API call. After a flatten the old parent is released (its snapshot may now
be childless, a deferred parent may now be removable).
"""

import queue
import threading

from oslo_log import log as logging

from cinder_thunder_driver import clones
from cinder_thunder_driver.cluster import rbd

LOG = logging.getLogger(__name__)


class Flattener:
    """A queue of RBD images to flatten and the workers draining it."""

    def __init__(self, cluster, workers):
        self._cluster = cluster
        self._queue = queue.Queue()
        self._pending = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._workers = [threading.Thread(target=self._work,
                                          name='thunder-flatten-%d' % i,
                                          daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def flatten_later(self, pool, name):
        """Queue ``pool/name`` for flattening (once, however often asked)."""
        with self._lock:
            if (pool, name) in self._pending:
                return
            self._pending.add((pool, name))
        LOG.info('Queued %(pool)s/%(name)s for background flattening.',
                 {'pool': pool, 'name': name})
        self._queue.put((pool, name))

    def pending(self):
        with self._lock:
            return len(self._pending)

    def wait_idle(self, timeout=None):
        """Block until the queue is empty; for tests and shutdown."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def stop(self):
        for _ in self._workers:
            self._queue.put(None)

    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.flatten_now(*item)
            except Exception:
                LOG.exception('Background flatten of %s/%s failed; it will '
                              'stay a clone.', *item)
            finally:
                with self._idle:
                    self._pending.discard(item)
                    self._idle.notify_all()

    def flatten_now(self, pool, name):
        """Flatten one image and release its former parent."""
        cluster = self._cluster
        with cluster.ioctx(pool) as ioctx:
            try:
                with cluster.image(ioctx, name, read_only=True) as image:
                    image_id = image.id()
                with clones.image_lock(image_id):
                    with cluster.image(ioctx, name) as image:
                        parent = clones.parent_of(image)
                        if parent is None:
                            return
                        LOG.info('Flattening %(pool)s/%(name)s.',
                                 {'pool': pool, 'name': name})
                        image.flatten()
            except rbd.ImageNotFound:
                LOG.debug('%s/%s is gone; nothing to flatten.', pool, name)
                return
        LOG.info('Flattened %(pool)s/%(name)s.', {'pool': pool, 'name': name})
        clones.release_parent(cluster, parent)
