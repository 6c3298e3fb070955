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

"""Neutron's API (``neutron.wsgi.api``) as the local stack serves it.

The same application, with SQLAlchemy's mappers configured once it is
loaded. Neutron 29's ``get_ports`` names ``Port.port_forwardings``, a
backref that exists only once the mappers are configured, which the first
database query does: in a fresh API worker whose first request lists ports
(Nova's first ``server show``, ``--nic none`` or not), every port listing
fails with ``AttributeError: type object 'Port' has no attribute
'port_forwardings'`` (HTTP 500) until some other request has queried the
database. A deployment with agents or RPC workers in the same process
queries first; the stack's API-only Neutron does not.
"""

from neutron.wsgi import api
from sqlalchemy import orm

orm.configure_mappers()
application = api.application
