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

from thunder_common import loops

OUTPUT = '''/dev/loop3 /mnt/thunder/volume-b
/dev/loop0 /srv/images/a.raw
/dev/loop12 /mnt/thunder/volume-a
/dev/loop7 /mnt/thunder-other/volume-a
/dev/loop9
not-a-loop /mnt/thunder/volume-a
/dev/loop1 /mnt/thunder/sub/volume-c
'''


def test_devices_on_one_file():
    assert loops.backed_by(OUTPUT, path='/mnt/thunder/volume-a') == [
        '/dev/loop12']
    assert loops.backed_by(OUTPUT, path='/mnt/thunder') == []


def test_devices_under_a_directory_not_its_siblings():
    assert loops.backed_by(OUTPUT, under='/mnt/thunder') == [
        '/dev/loop1', '/dev/loop12', '/dev/loop3']
    assert loops.backed_by(OUTPUT, under='/mnt/thunder/') == [
        '/dev/loop1', '/dev/loop12', '/dev/loop3']


def test_nothing_asked_or_nothing_listed():
    assert loops.backed_by(OUTPUT) == []
    assert loops.backed_by('', under='/mnt') == []
    assert loops.backed_by(None, path='/x') == []


def test_list_command_asks_for_raw_names_and_files():
    assert loops.LIST_COMMAND[0] == 'losetup'
    assert loops.LIST_COMMAND[-1] == 'NAME,BACK-FILE'
    assert '--raw' in loops.LIST_COMMAND
