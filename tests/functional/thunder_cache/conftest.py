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

"""Fixtures of thunder_cache's functional tests."""

import shutil
import tempfile

import pytest


@pytest.fixture
def workdir():
    """A directory under /tmp, removed after the test.

    Short: the daemons' socket paths in it must fit in 108 bytes.
    """
    path = tempfile.mkdtemp(prefix='tc-', dir='/tmp')
    yield path
    shutil.rmtree(path, ignore_errors=True)
