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

"""Byte copies between local files and RBD images, through librbd.

These are the slow paths (an image Cinder must download, a volume uploaded
to Glance); the fast path is a clone and copies nothing. No kernel mapping
is needed: data moves through librbd in bounded chunks.
"""

import os

from oslo_utils import units

CHUNK = 4 * units.Mi


def file_to_image(path, image, sparse=True):
    """Write a raw file into an open RBD image from offset 0.

    With ``sparse`` (the image is new, hence reads as zeros), all-zero
    chunks are skipped; otherwise they are written as zeroes so old
    contents never show through. Returns the number of bytes written.
    """
    written = 0
    zero = bytes(CHUNK)
    with open(path, 'rb') as src:
        offset = 0
        while True:
            data = src.read(CHUNK)
            if not data:
                break
            if data == zero[:len(data)]:
                if not sparse:
                    image.write_zeroes(offset, len(data))
            else:
                image.write(data, offset)
                written += len(data)
            offset += len(data)
    image.flush()
    return written


def image_to_file(image, path, length=None):
    """Copy the first ``length`` bytes (default: all) of an image to a file.

    Holes stay holes in the file. Returns the number of bytes copied.
    """
    length = image.size() if length is None else length
    zero = bytes(CHUNK)
    with open(path, 'wb') as dst:
        offset = 0
        while offset < length:
            size = min(CHUNK, length - offset)
            data = image.read(offset, size)
            if data == zero[:size]:
                dst.seek(size, os.SEEK_CUR)
            else:
                dst.write(data)
            offset += size
        dst.truncate(length)
    return length
