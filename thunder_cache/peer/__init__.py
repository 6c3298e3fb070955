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

"""The peer protocol: how nodes fetch chunks from each other.

:mod:`.protocol` (requests, tokens, the wire format), :mod:`.sources` (the
chunk sources: origins and peers, and the client of the protocol),
:mod:`.server` and :mod:`.reply` (serving a node's chunks),
:mod:`.fanout` (children per image, upload rate), :mod:`.peerpolicy` (the
addresses a node may ask), :mod:`.tls`, and :mod:`.advertise` (holders
listed in Cinder).
"""
