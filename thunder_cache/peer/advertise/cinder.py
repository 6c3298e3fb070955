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

"""Advertisements in Cinder: volume metadata through python-cinderclient."""

import typing
import urllib.parse
import uuid

from cinderclient import api_versions
from cinderclient import exceptions as cinder_exceptions
from cinderclient.v3 import client as cinder_client
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import loading as ks_loading

from thunder_cache.peer.advertise import options
from thunder_cache.peer.advertise import records


class RecordsError(Exception):
    """Cinder (or Keystone) could not read or write an advertisement."""

    def __init__(self, message: str,
                 cause: typing.Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.cause = cause


class VolumeGone(RecordsError):
    """Cinder answered that the image-volume does not exist (404)."""


_ERRORS = (cinder_exceptions.ClientException,
           ks_exceptions.ClientException)


def check_volume_id(volume_id: typing.Any) -> str:
    """The canonical form of a Cinder volume id (a UUID); ValueError."""
    if not isinstance(volume_id, str) or len(volume_id) > 64:
        raise ValueError('volume id must be a UUID, not %r' % (volume_id,))
    return str(uuid.UUID(volume_id))


class CinderRecords:
    """Volume metadata through python-cinderclient v3."""

    def __init__(self, client: typing.Any) -> None:
        self.client = client

    @classmethod
    def from_conf(cls, conf: typing.Any,
                  group: str = options.GROUP) -> 'CinderRecords':
        """A client with the credentials and session of ``[group]``.

        :raises RecordsError: when the section names no usable auth.
        """
        section = conf[group]
        try:
            auth = ks_loading.load_auth_from_conf_options(conf, group)
        except ks_exceptions.ClientException as exc:
            raise RecordsError('[%s] has no usable credentials: %s'
                               % (group, exc), exc)
        if auth is None:
            raise RecordsError('[%s] auth_type is not set: the node needs '
                               'credentials to advertise in Cinder' % group)
        session = ks_loading.load_session_from_conf_options(conf, group,
                                                            auth=auth)
        client = cinder_client.Client(
            session=session,
            region_name=section.region_name,
            endpoint_type=section.interface,
            os_endpoint=section.cinder_endpoint_override,
            api_version=api_versions.APIVersion(section.api_version))
        return cls(client)

    def _call(self, what: str, volume_id: str,
              func: typing.Callable[..., typing.Any],
              *args: typing.Any) -> typing.Any:
        check_volume_id(volume_id)
        try:
            return func(*args)
        except cinder_exceptions.NotFound as exc:
            raise VolumeGone('Cinder: volume %s not found: %s'
                             % (volume_id, exc), exc)
        except _ERRORS as exc:
            raise RecordsError('Cinder: could not %s of volume %s: %s: %s'
                               % (what, volume_id, type(exc).__name__, exc),
                               exc)

    def get_metadata(self, volume_id: str) -> typing.Dict[str, str]:
        """The volume's metadata (a dict of strings)."""
        return self.get_volume(volume_id)[0]

    def get_volume(self, volume_id: str
                   ) -> typing.Tuple[typing.Dict[str, str],
                                     typing.Optional[float]]:
        """(metadata, created_at in unix seconds or None) of the volume."""
        volume = self._call('read the metadata', volume_id,
                            self.client.volumes.get, volume_id)
        return (dict(getattr(volume, 'metadata', None) or {}),
                records.unix_time(getattr(volume, 'created_at', None)))

    def set_metadata(self, volume_id: str,
                     metadata: typing.Mapping[str, str]) -> None:
        """Add or replace these items (others are kept)."""
        self._call('update the metadata', volume_id,
                   self.client.volumes.set_metadata, volume_id,
                   dict(metadata))

    def delete_metadata(self, volume_id: str,
                        keys: typing.Iterable[str]) -> None:
        """Delete these items, one request each; missing ones are fine.

        Per-key DELETE leaves concurrent writers' items alone (the 3.15+
        client rewrites the whole metadata instead).
        """
        volume_id = check_volume_id(volume_id)
        http = self.client.client
        for key in keys:
            try:
                http.delete('/volumes/%s/metadata/%s'
                            % (volume_id, urllib.parse.quote(key, safe='')))
            except cinder_exceptions.NotFound:
                continue
            except _ERRORS as exc:
                raise RecordsError(
                    'Cinder: could not delete %s of volume %s: %s: %s'
                    % (key, volume_id, type(exc).__name__, exc), exc)
