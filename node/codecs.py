"""Pixel decoders: whether this installation can decode a compressed transfer syntax, and why not.

Pixel data is decoded only to blank rectangles (clean_pixel_data) or for a remote
that cannot take the instance's compression. The decoders come from pydicom's
plugins: RLE (pydicom itself), JPEG 2000 (pylibjpeg-openjpeg, MIT), 8-bit JPEG
baseline and extended (Pillow, HPND). JPEG lossless (process 14) and JPEG-LS need
pylibjpeg-libjpeg, which is GPL-3.0 and therefore an optional extra
(`pip install 'telenode[jpeg]'`); without it such an instance is never decoded
half-way: the caller gets `NoDecoderInstalled`, naming the syntax and the extra.
"""

from __future__ import annotations

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

JPEG_EXTRA = "pip install 'telenode[jpeg]' (pylibjpeg-libjpeg, GPL-3.0)"


class NoDecoderInstalled(ValueError):
    """No installed plugin decodes this transfer syntax; the message names it and the remedy."""


def missing(syntax: str) -> str | None:
    """Why pixel data in `syntax` cannot be decoded here, or None when it can (or is not compressed)."""
    uid = UID(syntax)
    if not uid.is_compressed:
        return None
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"no decoder exists for {uid.name}"
    if decoder.is_available:
        return None
    return f"no {uid.name} decoder installed: {JPEG_EXTRA}"


def require(syntax: str) -> None:
    """Raise NoDecoderInstalled unless pixel data in `syntax` can be decoded."""
    reason = missing(syntax)
    if reason:
        raise NoDecoderInstalled(reason)
