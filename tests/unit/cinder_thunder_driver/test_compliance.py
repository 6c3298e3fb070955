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

"""Cinder's driver compliance check, applied to ThunderDriver.

Cinder's own test (cinder/tests/compliance/test_volume_drivers.py) builds
``cinder.interface.util.DriverInfo`` for every class registered by
``@interface.volumedriver`` and asserts
``issubclass(info.cls, volume_driver.VolumeDriverCore)``. That module
cannot be imported here (it needs cinder.tests.unit, which pulls in
Cinder's test-only dependencies and monkey-patches eventlet), and its
discovery walks Cinder's own source tree; so the same check runs on our
class directly.

On Python 3 the interfaces' ``__subclasshook__`` only sees classmethods
(``inspect.ismethod`` is false for plain functions of a class), which makes
that ``issubclass`` true for any class. The stricter checks below compare
the interfaces' methods and signatures with the driver's for real.
"""

import inspect
from unittest import mock

from cinder import interface
from cinder.interface import util
from cinder.interface import volume_driver
from cinder.interface import volume_manageable_driver
from cinder.interface import volume_snapshot_revert
from cinder.volume import driver as base_driver
import pytest

from cinder_thunder_driver import driver
from cinder_thunder_driver import options
from cinder_thunder_driver import peer

INTERFACES = [volume_driver.VolumeDriverCore,
              volume_manageable_driver.VolumeManagementDriver,
              volume_snapshot_revert.VolumeSnapshotRevertDriver]
CLS = driver.ThunderDriver
# Cinder's generic code serves these for a peer-mode backend: reverting
# through a temporary volume, and no manage/unmanage (volumes are files of
# the node's thunder-cache, not objects an operator can bring in).
PEER_MODE_LACKS = {'revert_to_snapshot', 'manage_existing',
                   'manage_existing_get_size', 'unmanage',
                   'get_manageable_volumes'}

# What Cinder requires every driver to implement (the "minimum features"),
# plus what ThunderDriver advertises: these must be the driver's own code,
# not a base class default.
IMPLEMENTED = [
    'do_setup', 'check_for_setup_error', 'get_volume_stats',
    'create_volume', 'delete_volume', 'extend_volume',
    'create_snapshot', 'delete_snapshot', 'create_volume_from_snapshot',
    'create_cloned_volume', 'clone_image', 'copy_image_to_volume',
    'copy_volume_to_image', 'initialize_connection', 'terminate_connection',
    'create_export', 'ensure_export', 'remove_export', 'revert_to_snapshot',
    'manage_existing', 'manage_existing_get_size', 'unmanage',
    'get_manageable_volumes',
]


def _interface_methods(iface):
    return {name: func for name, func in
            inspect.getmembers(iface, inspect.isfunction)
            if not name.startswith('_')}


def test_decorated_with_volumedriver():
    """@interface.volumedriver registered the class itself."""
    assert CLS in interface._volume_register


def test_cinder_compliance_check():
    """The body of Cinder's test_volume_driver_compliance, on our class.

    Without Cinder's discovery: it only walks cinder/volume/drivers.
    """
    with mock.patch.object(util, '_ensure_loaded',
                           side_effect=AssertionError('discovery used')), \
            mock.patch.object(util, 'get_volume_drivers',
                              side_effect=AssertionError('discovery used')):
        info = util.DriverInfo(CLS)
    assert issubclass(info.cls, volume_driver.VolumeDriverCore), (
        'Driver {} does not conform to minimum volume driver '
        'requirements!'.format(info.class_fqn))


def test_driver_info():
    info = util.DriverInfo(CLS)
    assert info.class_fqn == 'cinder_thunder_driver.driver.ThunderDriver'
    assert info.class_name == 'ThunderDriver'
    assert info.version == CLS.VERSION
    assert info.version.count('.') == 2
    assert info.ci_wiki_name
    assert info.supported is True
    assert info.desc and info.desc.strip()
    assert info.driver_options == options.thunder_opts


@pytest.mark.parametrize('iface', INTERFACES, ids=lambda i: i.__name__)
def test_interface_methods_exist_with_compatible_signatures(iface):
    for name, func in _interface_methods(iface).items():
        ours = getattr(CLS, name, None)
        assert ours is not None, '%s.%s is missing' % (CLS.__name__, name)
        if isinstance(inspect.getattr_static(CLS, name), property):
            continue
        # Every call the interface allows must bind to our method.
        required = [p for p in inspect.signature(func).parameters.values()
                    if p.default is p.empty and
                    p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        args = [object()] * len(required)
        try:
            inspect.signature(ours).bind(*args)
        except TypeError as e:
            pytest.fail('%s.%s%s cannot be called as %s.%s%s: %s' % (
                CLS.__name__, name, inspect.signature(ours),
                iface.__name__, name, inspect.signature(func), e))
        # Our own methods also take the interface's parameter names (base
        # class defaults are Cinder's business: some differ).
        if name in vars(CLS):
            kwargs = {p.name: None for p in required[1:]}
            inspect.signature(ours).bind(None, **kwargs)


def _own_methods(cls):
    """Names defined by this project's classes in ``cls``'s MRO."""
    return {name for klass in cls.__mro__
            if klass.__module__.startswith('cinder_thunder_driver.')
            for name in vars(klass)}


def test_implements_the_minimum_features_itself():
    missing = [name for name in IMPLEMENTED
               if name not in _own_methods(CLS)]
    assert not missing


def test_peer_mode_implements_the_minimum_features_itself():
    peer_features = [name for name in IMPLEMENTED
                     if name not in PEER_MODE_LACKS]
    missing = [name for name in peer_features
               if name not in _own_methods(peer.PeerDriver)]
    assert not missing
    assert not inspect.isabstract(peer.PeerDriver)


def test_not_abstract():
    assert not inspect.isabstract(CLS), CLS.__abstractmethods__


def test_base_classes():
    assert issubclass(CLS, base_driver.BaseVD)
    assert issubclass(CLS, base_driver.CloneableImageVD)
    assert issubclass(CLS, base_driver.ManageableVD)


def test_stricter_check_would_catch_a_missing_method():
    """The strict check is not vacuous like the subclass hook."""

    class Incomplete:
        def do_setup(self, context):
            pass

    assert issubclass(Incomplete, volume_driver.VolumeDriverCore)
    missing = [name for name in
               _interface_methods(volume_driver.VolumeDriverCore)
               if not hasattr(Incomplete, name)]
    assert 'create_volume' in missing
