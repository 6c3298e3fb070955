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


"""thunder_cache.volumes.fusefs: importing it."""

import os
import subprocess
import sys

from tests import cache_helpers

REPO = cache_helpers.REPO


def test_import_takes_libfuse3_and_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('FUSE_LIBRARY')}
    out = subprocess.run(
        [sys.executable, '-c',
         'import os\n'
         'from thunder_cache.volumes import fusefs\n'
         'print(fusefs.mfusepy.fuse_version_major,'
         ' os.environ.get("FUSE_LIBRARY_NAME"))'],
        cwd=REPO, env=env, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ['3', 'None']
