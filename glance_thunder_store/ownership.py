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

"""Whether a location may read or delete the image-volume it names.

Glance hands the store a location URI and the request context, never the
image the location belongs to (glance_store's ``Location.image_id`` is not
set on any of Glance's read, size or delete paths). Two checks follow
(``doc/source/store.rst`` explains what each is worth):

* the volume must hold an image: its Cinder metadata records a
  ``glance_image_id``, which must be the image the location names (the
  ``image_id`` of a ``thunder://`` location, and ``Location.image_id``
  when a caller sets it). Refused as :class:`ImageVolumeRefused`, a
  NotFound: Glance then tries the image's other locations, reports a
  location it validates as invalid, and drops one it deletes, deleting
  nothing;
* a size (what Glance asks when a location is added) or a delete must come
  from the project recorded in the volume's ``image_owner``, an admin or a
  service. Refused as :class:`ImageVolumeRefused` for a size and as
  :class:`ImageVolumeDeleteForbidden`, a Forbidden, for a delete: Glance
  answers 403 and keeps the image.

Messages never quote the volume's metadata: they reach the caller.
"""

from glance_store import exceptions
from glance_store.i18n import _
from oslo_log import log as logging

from glance_thunder_store import upload
from thunder_common import locations

LOG = logging.getLogger(__name__)

# The role Glance's location API treats as a service (service_api rule).
SERVICE_ROLE = 'service'


class ImageVolumeRefused(exceptions.NotFound):
    """The location does not name an image-volume this request may use."""


class ImageVolumeDeleteForbidden(exceptions.Forbidden):
    """The request may not delete the image-volume the location names."""


def _metadata(volume):
    """The volume's Cinder metadata, or {} if it has none (or not a dict)."""
    metadata = getattr(volume, 'metadata', None)
    return metadata if isinstance(metadata, dict) else {}


def _describe(location):
    return location.store_location.get_uri()


def _refuse(error_class, location, volume, action, reason, context):
    LOG.warning('Refusing to %(action)s volume %(volume)s through location '
                '%(url)s for project %(project)s: %(reason)s.',
                {'action': action, 'volume': volume.id,
                 'url': _describe(location),
                 'project': getattr(context, 'project_id', None),
                 'reason': reason})
    raise error_class(
        message=_('Cannot %(action)s volume %(volume)s through location '
                  '%(location)s: %(reason)s.') % {
                      'action': action, 'volume': volume.id,
                      'location': _describe(location), 'reason': reason})


def images_named(location):
    """The image ids a location names: its URI's and Location.image_id."""
    named = [location.store_location.image_id,
             getattr(location, 'image_id', None)]
    return [image_id for image_id in named if image_id is not None]


def check_holds_image(volume, location, action, context=None):
    """Refuse unless the volume holds the image(s) the location names.

    :raises ImageVolumeRefused: if the volume records no Glance image, or
        another image than the location names.
    """
    held = _metadata(volume).get(upload.META_IMAGE_ID)
    if not isinstance(held, str) or not held:
        _refuse(ImageVolumeRefused, location, volume, action,
                'it is not an image-volume (it records no Glance image)',
                context)
    for image_id in images_named(location):
        if image_id != held:
            _refuse(ImageVolumeRefused, location, volume, action,
                    'it does not hold image %s' % _shown(image_id), context)


def _shown(value):
    """An image id as given, anything else quoted and cut short."""
    return value if locations.is_image_id(value) else repr(value)[:64]


def is_privileged(context):
    """True for an admin or a service (Glance's own test for a service)."""
    if context is None:
        return False
    if getattr(context, 'is_admin', False) is True:
        return True
    roles = []
    for attr in ('roles', 'service_roles'):
        value = getattr(context, attr, None)
        if isinstance(value, (list, tuple, set, frozenset)):
            roles.extend(value)
    return SERVICE_ROLE in roles


def check_owner(volume, location, action, context, error_class):
    """Refuse unless the request is the volume's image owner's project.

    Admins and services pass. A request without a context, or a volume
    that records no ``image_owner``, passes only as admin or service.
    """
    if is_privileged(context):
        return
    owner = _metadata(volume).get(upload.META_IMAGE_OWNER)
    project = getattr(context, 'project_id', None)
    if not owner or not isinstance(project, str) or project != owner:
        _refuse(error_class, location, volume, action,
                'it belongs to another project than the request\'s (only '
                'the project that stored the image, an admin or a service '
                'may add a location of it or delete it)', context)
