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

"""The options of ``[advertise]``: the switch, its timing and Cinder's
credentials and session (keystoneauth's)."""

import copy
import typing

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

from thunder_cache.peer.advertise import records

GROUP = 'advertise'
# Seconds a Cinder request may take unless [advertise] timeout says
# otherwise: the daemon must not hang on an unreachable Cinder.
DEFAULT_TIMEOUT = 10

opts = [
    cfg.BoolOpt('enabled', default=False,
                help='Advertise this node as a peer-cache location of the '
                     'images it holds, in the metadata of each image\'s '
                     'image-volume in Cinder, and read the other holders '
                     'from there. Needs the credentials of this section.'),
    cfg.IntOpt('ttl', default=300, min=30, max=records.MAX_TTL,
               help='Seconds an advertisement stays valid unless it is '
                    'refreshed. A node that dies without withdrawing stops '
                    'being listed after this long.'),
    cfg.IntOpt('refresh_interval', default=100, min=1,
               help='Seconds between refreshes of this node\'s '
                    'advertisements. Must be less than ttl; ttl / 3 '
                    'survives two failed refreshes.'),
    cfg.StrOpt('region_name',
               help='Region to look Cinder up in, in the service catalog.'),
    cfg.StrOpt('interface', default='internal',
               choices=['public', 'internal', 'admin'],
               help='Endpoint interface of Cinder in the service catalog.'),
    cfg.URIOpt('cinder_endpoint_override', schemes=['http', 'https'],
               help='Cinder endpoint to use instead of the service '
                    'catalog\'s, e.g. http://controller:8776/v3/'
                    '%(project_id)s.'),
    cfg.StrOpt('api_version', default='3.0', regex=r'^3\.[0-9]{1,3}$',
               help='Block Storage API microversion to request. Volume '
                    'metadata needs only 3.0.'),
]


def _session_opts() -> typing.List[typing.Any]:
    """keystoneauth's session options, with our default timeout."""
    result = []
    for opt in ks_loading.get_session_conf_options():
        if opt.dest == 'timeout':
            opt = copy.deepcopy(opt)
            opt.default = DEFAULT_TIMEOUT
        result.append(opt)
    return result


def register_opts(conf: cfg.ConfigOpts, group: str = GROUP) -> None:
    """Register the options of ``[advertise]``, its auth and session."""
    conf.register_opts(opts, group=group)
    ks_loading.register_session_conf_options(conf, group)
    ks_loading.register_auth_conf_options(conf, group)
    conf.set_default('timeout', DEFAULT_TIMEOUT, group=group)


def list_opts() -> typing.List[typing.Tuple[str, typing.List[typing.Any]]]:
    """Options for oslo-config-generator (auth shown for 'password')."""
    return [(GROUP, opts + _session_opts() +
             ks_loading.get_auth_common_conf_options() +
             ks_loading.get_auth_plugin_conf_options('password'))]
