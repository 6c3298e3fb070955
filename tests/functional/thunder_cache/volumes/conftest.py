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

"""Fixtures of the volume tests: an image and a started :class:`Env`."""

import os

import pytest

from tests.functional.thunder_cache.volumes import fuse_env


@pytest.fixture(scope='module')
def image():
    return os.urandom(fuse_env.SIZE)


@pytest.fixture
def env(tmp_path, image):
    env = fuse_env.Env(tmp_path, image)
    try:
        yield env.start()
    finally:
        env.close()
