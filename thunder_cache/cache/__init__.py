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

"""The image caches of a node and where their chunks come from.

:mod:`.node` holds the images of one node (registration, descriptors, the
requests of peers and local readers), :mod:`.image_cache` one image's
verified chunks with :mod:`.chunkmap` (which chunks are there),
:mod:`.upstream` picks the source of a missing chunk, :mod:`.origins` the
origins a descriptor may name, :mod:`.eviction` keeps the cache bounded.
"""
