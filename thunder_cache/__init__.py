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

"""The node cache of the peer mode and its peer-to-peer protocol.

A ``thunder-cache`` daemon per node (:mod:`thunder_cache.daemon`; options
in :mod:`thunder_cache.options`, operator commands in
:mod:`thunder_cache.manage`) is made of:

:mod:`thunder_cache.cache`
    The origin-shaped, read-only cache of each image the node uses, with
    its persistent presence map; every chunk is verified against the
    image's manifest (:mod:`thunder_common.manifest`) before it is stored.
:mod:`thunder_cache.peer`
    Where missing chunks come from (the image-volume or peer nodes), the
    peer protocol, the server of the chunks a node holds, and the
    advertisement of holders in the image-volume's Cinder metadata.
:mod:`thunder_cache.volumes`
    For the Cinder driver's peer mode, each volume as a file: a
    copy-on-write layer over the image cache, served by FUSE or by the
    native volume server.
:mod:`thunder_cache.control`
    The control socket through which the driver manages images and
    volumes, and the clients of the daemon.
:mod:`thunder_cache.boot`
    Boot traces: recorded when an image is first used, replayed as
    prefetch by the next nodes.

:mod:`thunder_cache.metrics`, :mod:`thunder_cache.fsutil` and
:mod:`thunder_cache.errors` are shared by all of them.
"""
