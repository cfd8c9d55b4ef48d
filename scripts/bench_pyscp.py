#!/usr/bin/env python3
"""A bare pynetdicom Storage SCP that writes what it receives: the Python receive ceiling.

    python3 scripts/bench_pyscp.py PORT FOLDER [--max-pdu 131072]

Every storage SOP class, the default transfer syntaxes, TCP_NODELAY, each data set written as a
DICOM file (preamble, file meta, data set exactly as received) named by its SOP Instance UID,
Success answered after the write. No parsing, no fsync, no database: nothing but receiving.
"""

from __future__ import annotations

import argparse
import os
import socket

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("folder")
    parser.add_argument("--max-pdu", type=int, default=131072)
    args = parser.parse_args()
    os.makedirs(args.folder, exist_ok=True)

    def on_open(event):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_store(event):
        with open(os.path.join(args.folder, event.request.AffectedSOPInstanceUID), "wb") as handle:
            handle.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="PYSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = args.max_pdu
    ae.maximum_associations = 64
    ae.start_server(("127.0.0.1", args.port), block=True,
                    evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
