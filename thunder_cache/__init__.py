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

A ``thunder-cache`` daemon per node keeps an origin-shaped, read-only
cache of each image the node uses (:mod:`thunder_cache.image_cache`, with
its persistent presence map :mod:`thunder_cache.chunkmap`), fetches missing
chunks from peer nodes or from the image-volume
(:mod:`thunder_cache.sources`, :mod:`thunder_cache.upstream`), verifies
every chunk against the image's manifest (:mod:`thunder_common.manifest`)
and serves the chunks it holds to other nodes
(:mod:`thunder_cache.server`, :mod:`thunder_cache.protocol`).

For the Cinder driver's peer mode it also serves each volume as a file
(:mod:`thunder_cache.fusefs`): the volume's copy-on-write layer
(:mod:`thunder_cache.cow`, :mod:`thunder_cache.volumes`) over the image
cache, managed through a control socket (:mod:`thunder_cache.control`,
:mod:`thunder_cache.service`). Once an image is open
(:mod:`thunder_cache.lifecycle`) the node advertises itself in the
image-volume's Cinder metadata (:mod:`thunder_cache.advertise`), records
or replays its boot trace (:mod:`thunder_cache.trace`,
:mod:`thunder_cache.prefetch`) and may hydrate it.
"""
