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

"""INI files the way devstack's ``iniset``/``iniget`` edit them.

The local stack writes its base configuration with :func:`write` and then
lets ``devstack/lib/thunder`` add the VMThunder parts through the shell
shim ``thunder_stack/devstack-shim.sh``, whose ``iniset`` and ``iniget``
call this module::

    python -m thunder_stack.ini set FILE SECTION OPTION VALUE
    python -m thunder_stack.ini get FILE SECTION OPTION

Sections and options keep their case; values are stored verbatim (no
interpolation), as oslo.config reads them.
"""

import configparser
import os
import sys


def _parser():
    parser = configparser.RawConfigParser(strict=False,
                                          default_section='\x00none')
    parser.optionxform = str
    return parser


def load(path):
    parser = _parser()
    if os.path.exists(path):
        with open(path) as f:
            parser.read_file(f)
    return parser


def save(parser, path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        parser.write(f)
    os.replace(tmp, path)


def write(path, sections):
    """Write ``{section: {option: value}}`` to ``path`` (replacing it)."""
    parser = _parser()
    for section, options in sections.items():
        parser.add_section(section)
        for option, value in options.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = 'True' if value else 'False'
            parser.set(section, option, str(value))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save(parser, path)


def iniset(path, section, option, value):
    parser = load(path)
    if not parser.has_section(section):
        parser.add_section(section)
    parser.set(section, option, value)
    save(parser, path)


def iniget(path, section, option):
    parser = load(path)
    if parser.has_option(section, option):
        return parser.get(section, option)
    return ''


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 5 and argv[0] == 'set':
        iniset(*argv[1:])
        return 0
    if len(argv) == 4 and argv[0] == 'get':
        print(iniget(*argv[1:]))
        return 0
    print('usage: python -m thunder_stack.ini set FILE SECTION OPTION VALUE'
          '\n       python -m thunder_stack.ini get FILE SECTION OPTION',
          file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
