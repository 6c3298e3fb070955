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

"""Cinder clients for the store, authenticated like glance_store's cinder.

Either a configured service user (image-volumes then live in its internal
project), or the token of the request's user with Cinder's endpoint from the
request's service catalog (or an endpoint template). Both go through
keystoneauth.
"""

import threading

from cinderclient import api_versions
from cinderclient.v3 import client as cinderclient
from glance_store import exceptions
from glance_store.i18n import _
from keystoneauth1.access import service_catalog
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import identity
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

API_VERSION = '3.0'


class CinderClientFactory:
    """Builds cinderclient instances for one store's configuration."""

    def __init__(self, conf, store_name='thunder'):
        self.conf = conf
        self.store_name = store_name
        self._session = None
        self._lock = threading.Lock()

    @property
    def uses_service_user(self):
        """True when the four service-user options are all set."""
        return all(getattr(self.conf, 'thunder_store_' + name) for name in
                   ('auth_address', 'user_name', 'password',
                    'project_name'))

    def _verify(self):
        if self.conf.thunder_store_api_insecure:
            return False
        return self.conf.thunder_store_ca_certificates_file or True

    def _service_session(self):
        with self._lock:
            if self._session is None:
                conf = self.conf
                auth = identity.V3Password(
                    auth_url=conf.thunder_store_auth_address,
                    username=conf.thunder_store_user_name,
                    password=conf.thunder_store_password,
                    user_domain_name=conf.thunder_store_user_domain_name,
                    project_name=conf.thunder_store_project_name,
                    project_domain_name=(
                        conf.thunder_store_project_domain_name))
                self._session = ks_session.Session(auth=auth,
                                                   verify=self._verify())
            return self._session

    def check_context(self, context):
        """Raise BadStoreConfiguration if no client can be made for it."""
        if self.uses_service_user:
            return
        if context is None:
            self._fail(_('the store has no service user configured, so it '
                         'needs the request context'))
        if (not self.conf.thunder_store_endpoint_template and
                not getattr(context, 'service_catalog', None)):
            self._fail(_('the request carries no service catalog to find '
                         'Cinder in; set thunder_store_endpoint_template or a '
                         'service user'))

    def _fail(self, reason):
        raise exceptions.BadStoreConfiguration(store_name=self.store_name,
                                               reason=reason)

    def _user_endpoint(self, context):
        conf = self.conf
        if conf.thunder_store_endpoint_template:
            return conf.thunder_store_endpoint_template % context.to_dict()
        try:
            service_type, service_name, interface = (
                conf.thunder_store_catalog_info.split(':'))
        except ValueError:
            self._fail(_('thunder_store_catalog_info must be '
                         '<service_type>:<service_name>:<interface>, not '
                         '%(catalog_info)r') % {
                             'catalog_info': conf.thunder_store_catalog_info})
        try:
            catalog = service_catalog.ServiceCatalogV2(
                context.service_catalog)
            return catalog.url_for(
                service_type=service_type,
                service_name=service_name or None,
                interface=interface,
                region_name=conf.thunder_store_os_region_name)
        except ks_exceptions.EndpointNotFound:
            self._fail(_('no %(catalog_info)s endpoint of Cinder in the '
                         'service catalog') % {
                             'catalog_info': conf.thunder_store_catalog_info})

    def client(self, context=None):
        """A cinderclient for the service user or the request's user."""
        self.check_context(context)
        if self.uses_service_user:
            session = self._service_session()
            auth = None
        else:
            # noauth deployments put user:project in place of a token.
            token = context.auth_token or '%s:%s' % (context.user_id,
                                                     context.project_id)
            auth = token_endpoint.Token(self._user_endpoint(context), token)
            session = ks_session.Session(auth=auth, verify=self._verify())
        return cinderclient.Client(
            session=session, auth=auth,
            region_name=self.conf.thunder_store_os_region_name,
            retries=self.conf.thunder_store_http_retries,
            api_version=api_versions.APIVersion(API_VERSION))
