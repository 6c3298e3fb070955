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

"""Sphinx configuration of the VMThunder documentation."""

# -- General configuration ---------------------------------------------------

extensions = [
    # ".. show-options::" documents the driver's options from the code.
    'oslo_config.sphinxext',
    # Writes _static/cinder-thunder-driver.conf.sample at build time.
    'oslo_config.sphinxconfiggen',
]

config_generator_config_file = [
    ('../../etc/oslo-config-generator/cinder-thunder-driver.conf',
     '_static/cinder-thunder-driver'),
]

project = 'VMThunder'
copyright = '2026, VMThunder developers'

source_suffix = '.rst'
master_doc = 'index'
exclude_patterns = ['_build']
add_module_names = False

# -- Options for HTML output -------------------------------------------------

# Sphinx's own theme: openstackdocstheme would brand the pages as
# docs.openstack.org (its navigation, search widget and analytics), which
# this project is not published on.
html_theme = 'alabaster'
html_static_path = ['_static']
