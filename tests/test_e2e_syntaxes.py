"""Transfer syntaxes and SOP classes pass through end to end: pixels byte for byte, private classes too.

A pynetdicom SCU sends to telenode (storescu would need a context per class);
a pynetdicom Storage SCP with the unrestricted storage service receives.
"""

from __future__ import annotations

import copy

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from conftest import free_port, wait_for

#: (pydicom test file, transfer syntax it is in)
FILES = [
    ("CT_small.dcm", "1.2.840.10008.1.2.1"),
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("ExplVR_BigEnd.dcm", "1.2.840.10008.1.2.2"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
    ("SC_jpeg_no_color_transform.dcm", "1.2.840.10008.1.2.4.50"),
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("GDCMJ2K_TextGBR.dcm", "1.2.840.10008.1.2.4.90"),
    ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
]
PRIVATE_SOP_CLASS = "1.2.840.113619.4.2.99"  # a vendor's private storage class, unknown to pynetdicom


def prepared(name: str, folder, sop_class: str | None = None):
    ds = pydicom.dcmread(get_testdata_file(name))
    ds = copy.deepcopy(ds)
    ds.BurnedInAnnotation = "NO"  # secondary captures say so, or the burned-in policy holds them
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.PixelData = bytes(reversed(ds.PixelData))  # told apart from the standard-class copy by its pixels
    path = folder / f"{name}.{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def send(port: int, datasets: list) -> list[int]:
    ae = AE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="TELENODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def test_every_transfer_syntax_and_a_private_class_pass_through(tmp_path, make_node, make_scp, unrestricted):
    """Each syntax arrives in the same syntax (deflate as explicit VR LE), pixel data byte-identical; a private class too."""
    receiver = make_scp(unrestricted=True).start()
    node = make_node([("TELERAD", receiver.port)]).start()
    items = [prepared(name, tmp_path) for name, _ in FILES]
    items.append(prepared("CT_small.dcm", tmp_path, sop_class=PRIVATE_SOP_CLASS))
    datasets = [pydicom.dcmread(path) for path, _ in items]
    assert send(node.port, datasets) == [0] * len(datasets)
    assert wait_for(lambda: len(receiver.uids()) == len(datasets), 30), f"{len(receiver.uids())} arrived"

    arrived = {a.pixel_data: (a.sop_class_uid, a.transfer_syntax) for a in receiver.arrivals}
    for (name, syntax), original in zip(FILES + [("private", "1.2.840.10008.1.2.1")], datasets):
        assert original.PixelData in arrived, f"{name}: pixel data changed or missing"
        sop_class, arrived_syntax = arrived[original.PixelData]
        expected = ExplicitVRLittleEndian if syntax == DeflatedExplicitVRLittleEndian else syntax
        assert arrived_syntax == expected, name
        assert sop_class == str(original.SOPClassUID), name
    assert node.stop() == 0


def test_a_context_gets_a_syntax_the_node_stores_or_is_rejected(make_node):
    """Proposed [JPEG XL, explicit VR LE]: explicit VR LE is accepted; proposed [JPEG XL] alone: rejected (0x04)."""
    jpeg_xl = "1.2.840.10008.1.2.4.110"
    node = make_node([("TELERAD", free_port())]).start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [jpeg_xl, ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", [jpeg_xl])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TELENODE")
    assert assoc.is_established
    accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    assoc.release()
    assert accepted == {"1.2.840.10008.5.1.4.1.1.2": ExplicitVRLittleEndian}
    assert rejected == {"1.2.840.10008.5.1.4.1.1.4": 0x04}
    assert node.stop() == 0
