"""telenode: an anonymizing DICOM store-and-forward node (PS3.15 Annex E).

The modules read as the path an instance takes: config → scp → pipeline →
deid (rules, pseudonyms) → store / spool → forward, wired by cli.
"""

import sys

__version__ = "0.1.0"

# An SCP worker process (multiprocessing's spawn marks its children's command line so) only
# receives and de-identifies: pydicom imports `requests` for downloading its test files if it is
# installed, which costs every worker ~6 MB of memory for nothing (issue 15: the node's process
# tree stays under 200 MB of PSS). The supervisor, which sends over DICOMweb, keeps it.
if "--multiprocessing-fork" in sys.orig_argv:
    sys.modules.setdefault("requests", None)  # type: ignore[arg-type]  # None: "import requests" fails
