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

"""Sphinx configuration of the VMThunder release notes."""

# -- General configuration ---------------------------------------------------

extensions = [
    'reno.sphinxext',
]

project = 'VMThunder Release Notes'
copyright = '2026, VMThunder developers'

source_suffix = '.rst'
master_doc = 'index'
exclude_patterns = []

# Release notes do not need a version of their own.
version = ''
release = ''

# -- Options for HTML output -------------------------------------------------

# Sphinx's own theme: openstackdocstheme would brand the pages as
# docs.openstack.org (its navigation, search widget and analytics), which
# this project is not published on.
html_theme = 'alabaster'
html_static_path = ['_static']

# -- Options for Internationalization output ---------------------------------

locale_dirs = ['locale/']
