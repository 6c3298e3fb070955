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

"""A stand-in for cinderclient's Client, for the store's tests.

It keeps volumes in memory and behaves like the Cinder API the store uses:
statuses, metadata, the read-only flag, extend, connections, delete. What
happens to the data is left to a *backend*: the unit tests use one that
only hands out ``rbd`` connection info, the functional tests one that
creates and deletes real RBD images through ThunderDriver.

``FakeCinder.faults`` injects failures: ``faults['create'] = exc`` makes
the next create raise, ``faults['create_status'] = 'error'`` leaves new
volumes in that status, ``faults['extend_status'] = 'error_extending'``
likewise for extend, and so on (see each method).
"""

import uuid

from cinderclient import exceptions as cinder_exceptions


class FakeVolume:
    def __init__(self, manager, size, name, metadata, volume_type):
        self.manager = manager
        self.id = str(uuid.uuid4())
        self.name = name
        self.size = size
        self.metadata = dict(metadata or {})
        self.volume_type = volume_type or 'default'
        self.status = 'creating'
        self.readonly = False
        self.attachments = []
        self.multiattach = False
        self.encryption_key_id = None
        self.connections = 0

    def snapshot(self):
        """A copy, as a GET would return (later changes do not show)."""
        copy = FakeVolume.__new__(FakeVolume)
        copy.__dict__.update(self.__dict__)
        copy.metadata = dict(self.metadata)
        return copy


class NullBackend:
    """Volumes without data; connection info names them in pool 'volumes'."""

    def create_volume(self, volume):
        pass

    def extend_volume(self, volume, new_size):
        pass

    def delete_volume(self, volume):
        pass

    def initialize_connection(self, volume, connector):
        return {'driver_volume_type': 'rbd',
                'data': {'name': 'volumes/volume-%s' % volume.id,
                         'hosts': ['127.0.0.1'], 'ports': ['6789'],
                         'auth_enabled': False, 'auth_username': None,
                         'cluster_name': 'ceph', 'volume_id': volume.id}}


class FakeVolumeManager:
    def __init__(self, cinder):
        self.cinder = cinder

    def _fault(self, name):
        fault = self.cinder.faults.pop(name, None)
        if fault is not None:
            raise fault

    def _find(self, volume):
        volume_id = getattr(volume, 'id', volume)
        try:
            return self.cinder.db[volume_id]
        except KeyError:
            raise cinder_exceptions.NotFound(
                404, 'Volume %s could not be found.' % volume_id)

    def create(self, size, name=None, metadata=None, volume_type=None,
               **kwargs):
        self.cinder.calls.append(('create', size))
        self._fault('create')
        volume = FakeVolume(self, size, name, metadata, volume_type)
        self.cinder.db[volume.id] = volume
        status = self.cinder.faults.pop('create_status', None)
        if status:
            volume.status = status
        else:
            # Like cinder-volume: a driver failure leaves the volume in
            # error, the API call itself succeeds.
            try:
                self.cinder.backend.create_volume(volume)
                volume.status = 'available'
            except Exception as e:
                self.cinder.driver_errors.append(e)
                volume.status = 'error'
        return volume.snapshot()

    def get(self, volume_id):
        self._fault('get')
        return self._find(volume_id).snapshot()

    def list(self, detailed=True, search_opts=None, **kwargs):
        name = (search_opts or {}).get('name')
        return [v.snapshot() for v in self.cinder.db.values()
                if name is None or v.name == name]

    def extend(self, volume, new_size):
        self.cinder.calls.append(('extend', new_size))
        self._fault('extend')
        volume = self._find(volume)
        if volume.status != 'available':
            raise cinder_exceptions.BadRequest(400, 'volume is %s'
                                               % volume.status)
        status = self.cinder.faults.pop('extend_status', None)
        if status:
            volume.status = status
            return
        try:
            self.cinder.backend.extend_volume(volume, new_size)
            volume.size = new_size
        except Exception as e:
            self.cinder.driver_errors.append(e)
            volume.status = 'error_extending'

    def set_metadata(self, volume, metadata):
        self._fault('set_metadata')
        self._find(volume).metadata.update(metadata)

    def update_readonly_flag(self, volume, flag):
        self._fault('update_readonly_flag')
        volume = self._find(volume)
        if volume.status != 'available':
            raise cinder_exceptions.BadRequest(400, 'volume is %s'
                                               % volume.status)
        volume.readonly = flag

    def delete(self, volume, cascade=False):
        self.cinder.calls.append(('delete', getattr(volume, 'id', volume)))
        self._fault('delete')
        volume = self._find(volume)
        if volume.status in ('in-use', 'creating', 'extending',
                             'deleting'):
            raise cinder_exceptions.BadRequest(
                400, 'Invalid volume: volume status must be available or '
                'error, but current status is: %s' % volume.status)
        try:
            self.cinder.backend.delete_volume(volume)
            del self.cinder.db[volume.id]
        except Exception as e:
            self.cinder.driver_errors.append(e)
            volume.status = 'error_deleting'

    def initialize_connection(self, volume, connector):
        self.cinder.calls.append(('initialize_connection', connector))
        self._fault('initialize_connection')
        volume = self._find(volume)
        info = self.cinder.backend.initialize_connection(volume, connector)
        info['data']['access_mode'] = 'ro' if volume.readonly else 'rw'
        volume.connections += 1
        return info

    def terminate_connection(self, volume, connector):
        self.cinder.calls.append(('terminate_connection', connector))
        self._find(volume).connections -= 1


class FakeVolumeType:
    def __init__(self, name):
        self.name = name


class FakeVolumeTypeManager:
    def __init__(self, cinder):
        self.cinder = cinder

    def default(self):
        return FakeVolumeType('default')

    def find(self, name):
        if name not in self.cinder.volume_type_names:
            raise cinder_exceptions.NotFound(404, 'no type %s' % name)
        return FakeVolumeType(name)


class FakeCinder:
    """The client: ``.volumes`` and ``.volume_types`` like cinderclient's."""

    def __init__(self, backend=None):
        self.backend = backend or NullBackend()
        self.db = {}
        self.faults = {}
        self.calls = []
        self.driver_errors = []
        self.volume_type_names = {'default', 'thunder'}
        self.volumes = FakeVolumeManager(self)
        self.volume_types = FakeVolumeTypeManager(self)

    def count(self):
        return len(self.db)

    def connections(self):
        return sum(v.connections for v in self.db.values())
