"""The pipeline's own steps: parsing refuses truncated data, the spool writer streams pixels unchanged."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node import pipeline
from node.deid import Deidentifier, Pseudonymizer

DEID = Deidentifier(Pseudonymizer(bytes(range(32)), "ORG"))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "ExplVR_BigEnd.dcm", "MR_small_RLE.dcm", "image_dfl.dcm", "JPEG2000.dcm"])
def test_streamed_pixel_data_gives_the_bytes_pydicom_would_write(name, monkeypatch):
    """Native pixel data copied from the received file equals pydicom's own encoding, every syntax."""
    monkeypatch.setattr(pipeline, "DEFER_SIZE", 1024)  # defer the test files' pixel data like a large one
    source = get_testdata_file(name)
    streamed = pipeline.read(source)
    DEID.apply(streamed)
    native = name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "ExplVR_BigEnd.dcm")
    assert (pipeline._deferred_pixels(streamed) is not None) == native
    out = io.BytesIO()
    pipeline.writer(streamed)(out)
    reference = pydicom.dcmread(source)
    DEID.apply(reference)
    expected = io.BytesIO()
    pipeline.writer(reference)(expected)
    assert out.getvalue() == expected.getvalue()


def test_element_longer_than_the_file_is_refused(tmp_path):
    """An element claiming more bytes than were received is 0xC210, not a short copy forwarded."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    path = tmp_path / "cut.dcm"
    source.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(pipeline.Rejected) as caught:
        pipeline.read(path)
    assert caught.value.status == pipeline.CANNOT_UNDERSTAND
