"""Stand-in for transformers' CI helper that maps test-data URLs to pre-downloaded files (tests run offline here).

Image URLs map to one locally drawn image; other URLs (video, audio) are returned as they are: Florence-VL takes
neither, so the tests that would read them do not apply.
"""

import os
import tempfile

from PIL import Image

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_LOCAL_IMAGE = os.path.join(tempfile.gettempdir(), f"florence_vl_common_tests_{os.getpid()}.png")


def url_to_local_path(url: str, **kwargs) -> str:
    """A local file for an image URL (a 640x480 RGB gradient, drawn once per process); other URLs unchanged."""
    if not url.lower().endswith(_IMAGE_SUFFIXES):
        return url
    if not os.path.isfile(_LOCAL_IMAGE):
        image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
        image.save(_LOCAL_IMAGE)
    return _LOCAL_IMAGE
