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

"""Registration, options and authentication of the thunder store."""

from unittest import mock

import glance_store
from glance_store import capabilities
from glance_store import exceptions
from glance_store import location as gs_location
from oslo_config import cfg
import pytest
from stevedore import driver as stevedore_driver

from glance_thunder_store import cinder_client
from glance_thunder_store import options
from glance_thunder_store import store as store_mod
from tests.store_helpers import Context
from tests.store_helpers import make_store


@pytest.fixture(autouse=True)
def clean_scheme_maps():
    saved = (dict(gs_location.SCHEME_TO_CLS_MAP),
             dict(gs_location.SCHEME_TO_CLS_BACKEND_MAP))
    yield
    gs_location.SCHEME_TO_CLS_MAP = saved[0]
    gs_location.SCHEME_TO_CLS_BACKEND_MAP = saved[1]


def test_entry_point_loads_the_store():
    mgr = stevedore_driver.DriverManager('glance_store.drivers', 'thunder',
                                         invoke_on_load=False)
    assert mgr.driver is store_mod.Store


def test_single_store_registration():
    conf = cfg.ConfigOpts()
    conf([])
    glance_store.register_opts(conf)
    conf.set_override('stores', ['thunder'], 'glance_store')
    # glance_store's default_store only accepts its own schemes; "cinder"
    # is one of the schemes the thunder store serves.
    conf.set_override('default_store', 'cinder', 'glance_store')
    assert glance_store.create_stores(conf) == 1
    schemes = gs_location.SCHEME_TO_CLS_MAP
    assert {'thunder', 'cinder', 'rbd'} <= set(schemes)
    assert isinstance(schemes['cinder']['store'], store_mod.Store)
    assert schemes['thunder']['store'].url_prefix == 'thunder://'


def test_multi_store_registration_reads_each_backend_group():
    conf = cfg.ConfigOpts()
    conf([])
    conf.register_opt(cfg.DictOpt('enabled_backends'))
    conf.set_override('enabled_backends', {'fast': 'thunder',
                                           'slow': 'thunder'})
    glance_store.register_store_opts(conf)
    assert glance_store.create_multi_stores(conf) == 6
    stores = gs_location.SCHEME_TO_CLS_BACKEND_MAP['thunder']
    fast, slow = stores['fast']['store'], stores['slow']['store']
    conf.set_override('thunder_store_volume_type', 'gold', 'slow')
    assert fast.store_conf.thunder_store_volume_type is None
    assert slow.store_conf.thunder_store_volume_type == 'gold'
    assert fast.url_prefix == 'thunder://fast/'
    rbd_stores = set(gs_location.SCHEME_TO_CLS_BACKEND_MAP['rbd'])
    assert rbd_stores >= {'fast', 'slow'}


def test_alias_schemes_can_be_turned_off():
    store = make_store(thunder_store_alias_locations=False)
    assert store.get_schemes() == ('thunder',)
    assert make_store().get_schemes() == ('thunder', 'cinder', 'rbd')


def test_capabilities():
    store = make_store()
    assert store.is_capable(capabilities.BitMasks.WRITE_ACCESS,
                            capabilities.BitMasks.READ_RANDOM,
                            capabilities.BitMasks.DRIVER_REUSABLE)
    assert store.WRITE_CHUNKSIZE == store.READ_CHUNKSIZE == 4 * 1024 * 1024


def test_bad_manifest_chunk_size_disables_add():
    store = make_store(thunder_store_manifest_chunk_size=96)
    assert not store.is_capable(capabilities.BitMasks.WRITE_ACCESS)
    with pytest.raises(exceptions.StoreAddDisabled):
        store.add('id', None, 0, 'sha256', context=Context())


def test_list_opts():
    [(group, opts)] = options.list_opts()
    assert group == 'glance_store'
    names = [o.name for o in opts]
    assert all(n.startswith('thunder_store_') for n in names)
    assert all(o.help for o in opts)
    assert len(names) == len(set(names))
    for wanted in ('auth_address', 'user_name', 'password', 'project_name',
                   'user_domain_name', 'project_domain_name',
                   'catalog_info', 'endpoint_template', 'os_region_name',
                   'api_insecure', 'ca_certificates_file', 'volume_type',
                   'state_transition_timeout', 'http_retries',
                   'write_chunk_size'):
        assert 'thunder_store_' + wanted in names
    assert [o for o in opts if o.name == 'thunder_store_password'][0].secret


def test_volume_type_is_checked_with_the_service_user(caplog):
    fake = mock.Mock()
    fake.volume_types.find.side_effect = Exception('no such type')
    with mock.patch.object(cinder_client.CinderClientFactory, 'client',
                           return_value=fake):
        make_store(thunder_store_volume_type='gold',
                   thunder_store_auth_address='http://ks/v3',
                   thunder_store_user_name='glance',
                   thunder_store_password='secret',
                   thunder_store_project_name='service')
    fake.volume_types.find.assert_called_once_with(name='gold')
    assert 'Cannot check volume type gold' in caplog.text


# -- authentication --------------------------------------------------------


def _factory(**overrides):
    return make_store(**overrides).clients


SERVICE_USER = dict(thunder_store_auth_address='http://ks/v3',
                    thunder_store_user_name='glance',
                    thunder_store_password='secret',
                    thunder_store_project_name='service')


def test_service_user_session():
    factory = _factory(**SERVICE_USER)
    assert factory.uses_service_user
    with mock.patch.object(cinder_client.identity, 'V3Password') as pw, \
            mock.patch.object(cinder_client.ks_session,
                              'Session') as session, \
            mock.patch.object(cinder_client.cinderclient,
                              'Client') as client:
        factory.client(None)
        factory.client(Context())
    pw.assert_called_once_with(
        auth_url='http://ks/v3', username='glance', password='secret',
        user_domain_name='Default', project_name='service',
        project_domain_name='Default')
    session.assert_called_once_with(auth=pw.return_value, verify=True)
    kwargs = client.call_args.kwargs
    assert kwargs['session'] is session.return_value
    assert kwargs['auth'] is None
    assert kwargs['retries'] == 3


def test_partial_service_user_falls_back_to_the_user_token():
    factory = _factory(thunder_store_user_name='glance')
    assert not factory.uses_service_user
    with pytest.raises(exceptions.BadStoreConfiguration, match='context'):
        factory.client(None)


def test_user_token_and_service_catalog():
    factory = _factory(thunder_store_os_region_name='RegionOne',
                       thunder_store_http_retries=7)
    with mock.patch.object(cinder_client.cinderclient, 'Client') as client:
        factory.client(Context())
    kwargs = client.call_args.kwargs
    assert kwargs['auth'].endpoint == 'http://cinder.example/v3/p'
    assert kwargs['auth'].token == 'token-a'
    assert kwargs['retries'] == 7
    assert kwargs['region_name'] == 'RegionOne'


def test_endpoint_template():
    factory = _factory(
        thunder_store_endpoint_template='http://c/v3/%(tenant)s')
    ctx = Context(service_catalog=[])
    with mock.patch.object(cinder_client.cinderclient, 'Client') as client:
        factory.client(ctx)
    assert client.call_args.kwargs['auth'].endpoint == 'http://c/v3/project-a'


def test_no_catalog():
    factory = _factory()
    ctx = Context(service_catalog=[])
    ctx.service_catalog = None
    with pytest.raises(exceptions.BadStoreConfiguration, match='catalog'):
        factory.client(ctx)


def test_cinder_missing_from_the_catalog():
    factory = _factory(thunder_store_catalog_info='volumev3::internalURL')
    with pytest.raises(exceptions.BadStoreConfiguration, match='endpoint'):
        factory.client(Context())


def test_malformed_catalog_info():
    factory = _factory(thunder_store_catalog_info='volumev3')
    with pytest.raises(exceptions.BadStoreConfiguration, match='must be'):
        factory.client(Context())


@pytest.mark.parametrize('overrides, verify', [
    ({}, True),
    ({'thunder_store_api_insecure': True}, False),
    ({'thunder_store_ca_certificates_file': '/ca.pem'}, '/ca.pem'),
])
def test_tls_verification(overrides, verify):
    factory = _factory(**overrides)
    with mock.patch.object(cinder_client.ks_session, 'Session') as session, \
            mock.patch.object(cinder_client.cinderclient, 'Client'):
        factory.client(Context())
    assert session.call_args.kwargs['verify'] == verify


def test_noauth_token():
    factory = _factory()
    ctx = Context()
    ctx.auth_token = None
    with mock.patch.object(cinder_client.cinderclient, 'Client') as client:
        factory.client(ctx)
    assert client.call_args.kwargs['auth'].token == 'user-a:project-a'
