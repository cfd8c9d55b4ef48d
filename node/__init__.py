"""telenode: an anonymizing DICOM store-and-forward node (PS3.15 Annex E).

The modules read as the path an instance takes: config → scp → pipeline →
deid (rules, pseudonyms) → store / spool → forward, wired by cli.
"""

__version__ = "0.1.0"
