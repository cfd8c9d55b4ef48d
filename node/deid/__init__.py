"""De-identification: the PS3.15 Annex E rule engine and its keyed pseudonyms."""

from node.deid.pseudonyms import KeyFileError, Pseudonymizer, load_or_create_key
from node.deid.record import DeidRecord
from node.deid.rules import SUPPORTED_OPTIONS, DeidError, Deidentifier

__all__ = [
    "DeidError",
    "DeidRecord",
    "Deidentifier",
    "KeyFileError",
    "Pseudonymizer",
    "SUPPORTED_OPTIONS",
    "load_or_create_key",
]
