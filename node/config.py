"""Configuration: a TOML file → validated, typed, immutable settings.

Every problem is reported as one `ConfigError` whose message names the file and
the dotted key (``node.port``, ``destinations[1].ae_title``), so that
`telenode serve` can print it and exit with status 2. Relative paths resolve
against the folder of the config file, not the working directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydicom.datadict import tag_for_keyword

#: PS3.15 Annex E options, as named in ``[anonymization] profile_options``.
PROFILE_OPTIONS: tuple[str, ...] = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
    "clean_pixel_data",  # PS3.15 E.3.1 (113101): blank configured rectangles; not a Table E.1-1 column
)
BURNED_IN_POLICIES = ("reject", "quarantine", "pass", "ocr")
ACK_MODES = ("deidentified", "received")  # when a C-STORE is answered Success (README: "When Success is sent")
UNLISTED_POLICIES = ("keep", "remove")
TLS_VERSIONS = ("1.2", "1.3")


class ConfigError(Exception):
    """A configuration problem; the message names the file and the key."""


@dataclass(frozen=True)
class TLS:
    """DICOM TLS (PS3.15 Annex B secure transport) of the listener or of one destination.

    On the listener: `certificate` + `private_key` are the node's own, `ca_certificates` signs
    the clients it accepts. On a destination: `ca_certificates` verifies the remote (system store
    when omitted), `certificate` + `private_key` are the client certificate it may ask for.
    """

    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    min_version: str = "1.2"
    require_client_cert: bool = True  # listener: refuse clients without a certificate ca_certificates signed
    verify_hostname: bool = True  # destination: the remote's certificate must name host (or server_name)
    server_name: str = ""  # destination: the name to verify instead of host
    port: int = 0  # listener: the TLS port; equal to node.port makes the node TLS-only
    handshake_timeout: float = 10.0  # listener: seconds a client has to finish the handshake


@dataclass(frozen=True)
class Destination:
    """One remote C-STORE SCP that receives the anonymized instances."""

    name: str
    ae_title: str
    host: str
    port: int
    connect_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    max_pdu: int = 131072
    batch_size: int = 200
    retry_delay: float = 5.0
    retry_multiplier: float = 2.0
    max_retry_delay: float = 300.0
    max_failures: int = 3
    parallel: int = 1  # workers (associations) sending to this destination at once
    default: bool = True  # receives instances that no route sends elsewhere
    tls: TLS | None = None  # None: plain TCP
    # Destinations of other kinds (node/destinations/): "dicom" is C-STORE to ae_title@host:port.
    kind: str = "dicom"  # "dicom" | "dicomweb" | "s3" | "azure"
    url: str = ""  # dicomweb: the service root, STOW-RS posts to {url}/studies
    username: str = ""  # dicomweb: HTTP basic auth user ...
    password_env: str = ""  # ... whose password is read from this environment variable
    bearer_token_file: Path | None = None  # dicomweb: a bearer token kept in a 0600 file
    max_request_mb: int = 64  # dicomweb: bound of one STOW-RS request (an instance above it goes alone)
    bucket: str = ""  # s3
    prefix: str = ""  # s3, azure: key prefix of every object
    endpoint_url: str = ""  # s3: an S3-compatible server instead of AWS
    region: str = ""  # s3
    container: str = ""  # azure
    connection_string_env: str = "AZURE_STORAGE_CONNECTION_STRING"  # azure: the variable that holds it


#: Route priority names → queue priority (C-STORE HIGH is 1, MEDIUM 0, LOW -1).
PRIORITIES = {"stat": 1, "high": 1, "routine": 0, "medium": 0, "low": -1}


@dataclass(frozen=True)
class Route:
    """Sends matching instances to some destinations, maybe ahead of the queue. All given criteria
    must match (each list: any of its values), on the original data set, before de-identification."""

    name: str
    destinations: tuple[str, ...] = ()  # empty: the route only sets the priority
    calling_aets: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    match: tuple[tuple[int, str], ...] = ()  # (tag, case-insensitive glob) pairs
    priority: int | None = None


@dataclass(frozen=True)
class PixelRule:
    """Rectangles to blank (clean_pixel_data) in images that match every given criterion."""

    rectangles: tuple[tuple[int, int, int, int], ...]  # (x, y, width, height) in pixels
    modality: str = ""
    manufacturer: str = ""  # case-insensitive substring
    model: str = ""  # case-insensitive substring of Manufacturer's Model Name
    sop_class_uid: str = ""
    rows: int = 0
    columns: int = 0


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration of one node."""

    path: Path
    ae_title: str
    host: str
    port: int
    data_dir: Path
    allowed_calling_aets: tuple[str, ...]
    organization: str
    key_file: Path
    destinations: tuple[Destination, ...]
    profile_options: tuple[str, ...] = ()
    max_associations: int = 64
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    max_pdu: int = 131072
    log_format: str = "auto"
    log_level: str = "info"
    burned_in: str = "quarantine"
    leak_guard: bool = True
    overrides: tuple[tuple[int, str, Any], ...] = ()  # (tag, keep|remove|empty|set, value)
    pixel_rules: tuple[PixelRule, ...] = ()
    routes: tuple[Route, ...] = ()
    min_free_mb: int = 64  # below this free space on data_dir the SCP answers 0xA700
    stop_timeout: float = 30.0  # seconds SIGTERM waits for in-flight C-STOREs and sends
    workers: int = 1  # SCP worker processes accepting on one shared listening socket; "auto" = one per core
    tls: TLS | None = None  # the TLS listener ([node.tls]); None: plain only
    mapping_key_file: Path | None = None  # encrypts originals in the mapping store; None: beside key_file
    operators: tuple[str, ...] = ()  # who may re-identify; empty: anyone who can read the config and keys
    audit_file: Path | None = None  # audit records also appended here as JSON lines (for a SIEM)
    audit_syslog: str = ""  # audit records also sent to syslog: "/dev/log", "host:port" (UDP)
    stable_seconds: float = 30.0  # [studies]: a study's batch is complete after this long without an instance
    warnings: tuple[str, ...] = ()  # valid but risky settings, logged at start
    return_path: "ReturnPath | None" = None  # [return]: results from the reader, re-identified; None: off
    http: "HTTP | None" = None  # the HTTP gateway ([http]); None: no HTTP server
    unlisted: str = "keep"  # "remove": attributes neither in Table E.1-1 nor on the safe list go
    ocr_all_images: bool = False  # burned_in = "ocr": read every image, not only the suspect ones
    association_request_timeout: float = 5.0  # seconds from TCP connect to the A-ASSOCIATE-RQ
    max_pending_per_address: int = 8  # connections per peer address not yet associated
    ack: str = "deidentified"  # "received": Success once the original is durable; de-identified after (settle.py)
    retention_sent_days: float = 0.0  # [retention] sent_days: queue rows of delivered instances kept; 0 = forever
    retention_staging_days: float = 0.0  # [retention] staging_days: finished batch-prepare folders kept; 0 = forever

    @property
    def mapping_key(self) -> Path:
        return self.mapping_key_file or self.key_file.with_name("mapping.key")

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def received_dir(self) -> Path:
        return self.data_dir / "received"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def database(self) -> Path:
        return self.data_dir / "telenode.sqlite"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


@dataclass(frozen=True)
class HL7Return:
    """[return.hl7]: an MLLP listener for ORU^R01 reports, forwarded re-identified to the hospital RIS."""

    port: int
    forward_host: str
    forward_port: int
    host: str = "0.0.0.0"  # defaults to the [return] host
    timeout: float = 30.0  # seconds for a peer to send a frame, and for the RIS to answer with its ACK
    retry_delay: float = 5.0
    max_retry_delay: float = 300.0
    max_failures: int = 5  # negative ACKs (AE/AR) from the RIS before a message is failed


#: The queue's destination name for HL7 messages on their way to the RIS (no DICOM destination may take it).
HL7_QUEUE = "return.hl7"


@dataclass(frozen=True)
class ReturnPath:
    """[return]: the AE the teleradiology side sends results to; they leave re-identified, only to
    `destinations` (never an outbound destination)."""

    ae_title: str
    host: str
    port: int
    allowed_calling_aets: tuple[str, ...]
    destinations: tuple[Destination, ...]
    tls: TLS | None = None
    hl7: HL7Return | None = None


# A key's spec: (type(s) accepted, default or REQUIRED, extra check returning an error or None).
REQUIRED = object()
Check = Callable[[Any], str | None]


def _ae(value: str) -> str | None:
    if not value.strip() or len(value) > 16 or "\\" in value or not value.isascii():
        return "must be 1 to 16 ASCII characters without backslash (an AE title)"
    return None


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port between 1 and 65535"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than zero"


def _pdu(value: int) -> str | None:
    return None if value == 0 or 4096 <= value <= 2**32 - 1 else "must be 0 (unlimited) or at least 4096"


def _one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _aets(values: list) -> str | None:
    bad = [v for v in values if not isinstance(v, str) or _ae(v)]
    return f"holds values that are not AE titles: {bad!r}" if bad else None


def _options(values: list) -> str | None:
    unknown = [v for v in values if v not in PROFILE_OPTIONS]
    if unknown:
        return f"unknown option(s) {unknown!r}; known: {', '.join(PROFILE_OPTIONS)}"
    if {"retain_long_full_dates", "retain_long_modified_dates"} <= set(values):
        return "retain_long_full_dates and retain_long_modified_dates exclude each other (PS3.15 E.3.6)"
    return None


AUTO_WORKERS_MAX = 8  # each worker is an interpreter (~75 MB); past 8 the shared SQLite writer dominates


def auto_workers() -> int:
    """One worker per core this process may run on (CPU affinity, not the host's count), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, AUTO_WORKERS_MAX))


def _workers(value: str | int) -> str | None:
    if value == "auto" or (isinstance(value, int) and 1 <= value <= 64):
        return None
    return 'must be "auto" (one per core) or an integer between 1 and 64'


def _organization(value: str) -> str | None:
    if not value or len(value) > 40 or not all(c.isalnum() or c in "-_" for c in value) or not value.isascii():
        return "must be 1 to 40 ASCII letters, digits, '-' or '_' (it prefixes pseudonymous PatientIDs)"
    return None


NUMBER = (int, float)
NODE_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "ae_title": (str, "TELENODE", _ae),
    "host": (str, "0.0.0.0", None),
    "port": (int, 11112, _port),
    "data_dir": (str, "var", None),
    "allowed_calling_aets": (list, [], _aets),
    "max_associations": (int, 64, _positive),
    "acse_timeout": (NUMBER, 30.0, _positive),
    "dimse_timeout": (NUMBER, 120.0, _positive),
    "network_timeout": (NUMBER, 120.0, _positive),
    "max_pdu": (int, 131072, _pdu),
    "log_format": (str, "auto", _one_of("auto", "json", "console")),
    "log_level": (str, "info", _one_of("debug", "info", "warning", "error")),
    "min_free_mb": (int, 64, lambda v: None if v >= 0 else "must be 0 or more"),
    "stop_timeout": (NUMBER, 30.0, _positive),
    "workers": ((str, int), "auto", _workers),
    "tls": (dict, {}, None),
    "association_request_timeout": (NUMBER, 5.0, _positive),
    "max_pending_per_address": (int, 8, _positive),
    "ack": (str, "deidentified", _one_of(*ACK_MODES)),
}
ANON_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "profile_options": (list, [], _options),
    "organization": (str, "ORG", _organization),
    "key_file": (str, "var/pseudonym.key", None),
    "burned_in": (str, "quarantine", _one_of(*BURNED_IN_POLICIES)),
    "leak_guard": (bool, True, None),
    "overrides": (dict, {}, None),
    "pixel_rules": (list, [], None),
    "unlisted": (str, "keep", _one_of(*UNLISTED_POLICIES)),
    "ocr_all_images": (bool, False, None),
}
PIXEL_RULE_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "rectangles": (list, REQUIRED, None),
    "modality": (str, "", None),
    "manufacturer": (str, "", None),
    "model": (str, "", None),
    "sop_class_uid": (str, "", None),
    "rows": (int, 0, None),
    "columns": (int, 0, None),
}
DEST_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "name": (str, REQUIRED, lambda v: None if v.strip() else "must not be empty"),
    "ae_title": (str, REQUIRED, _ae),
    "host": (str, REQUIRED, lambda v: None if v.strip() else "must not be empty"),
    "port": (int, REQUIRED, _port),
    "connect_timeout": (NUMBER, 10.0, _positive),
    "acse_timeout": (NUMBER, 30.0, _positive),
    "dimse_timeout": (NUMBER, 120.0, _positive),
    "network_timeout": (NUMBER, 120.0, _positive),
    "max_pdu": (int, 131072, _pdu),
    "batch_size": (int, 200, _positive),
    "retry_delay": (NUMBER, 5.0, _positive),
    "retry_multiplier": (NUMBER, 2.0, lambda v: None if v >= 1 else "must be at least 1"),
    "max_retry_delay": (NUMBER, 300.0, _positive),
    "max_failures": (int, 3, _positive),
    "parallel": (int, 1, lambda v: None if 1 <= v <= 16 else "must be between 1 and 16"),
    "default": (bool, True, None),
    "tls": (dict, {}, None),
}
LISTENER_TLS_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "port": (int, REQUIRED, _port),
    "certificate": (str, REQUIRED, None),
    "private_key": (str, REQUIRED, None),
    "ca_certificates": (str, "", None),
    "require_client_cert": (bool, True, None),
    "min_version": (str, "1.2", _one_of(*TLS_VERSIONS)),
    "handshake_timeout": (NUMBER, 10.0, _positive),
}
DEST_TLS_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "ca_certificates": (str, "", None),
    "certificate": (str, "", None),
    "private_key": (str, "", None),
    "verify_hostname": (bool, True, None),
    "server_name": (str, "", None),
    "min_version": (str, "1.2", _one_of(*TLS_VERSIONS)),
}
SECURITY_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "mapping_key_file": (str, "", None),
    "operators": (list, [], lambda v: None if all(isinstance(o, str) and o.strip() for o in v)
                  else "must be a list of operator names"),
    "audit_file": (str, "", None),
    "audit_syslog": (str, "", None),
}
RETURN_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "ae_title": (str, REQUIRED, _ae),
    "host": (str, "", None),
    "port": (int, REQUIRED, _port),
    "allowed_calling_aets": (list, [], _aets),
    "tls": (dict, {}, None),
    "destinations": (list, [], None),
    "hl7": (dict, {}, None),
}
HL7_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "port": (int, REQUIRED, _port),
    "forward_host": (str, REQUIRED, lambda v: None if v.strip() else "must not be empty"),
    "forward_port": (int, REQUIRED, _port),
    "host": (str, "", None),
    "timeout": (NUMBER, 30.0, _positive),
    "retry_delay": (NUMBER, 5.0, _positive),
    "max_retry_delay": (NUMBER, 300.0, _positive),
    "max_failures": (int, 5, _positive),
}
RETENTION_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "sent_days": (NUMBER, 0, lambda v: None if v >= 0 else "must be 0 (keep forever) or a number of days"),
    "staging_days": (NUMBER, 0, lambda v: None if v >= 0 else "must be 0 (keep forever) or a number of days"),
}
ROUTE_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "name": (str, "", None),
    "destinations": (list, [], None),
    "calling_aets": (list, [], _aets),
    "modalities": (list, [], None),
    "sop_classes": (list, [], None),
    "match": (dict, {}, None),
    "priority": (str, "", _one_of("", *PRIORITIES)),
}
DESTINATION_KINDS = ("dicom", "dicomweb", "s3", "azure")


def _http_url(value: str) -> str | None:
    """An http(s) URL without credentials in it (they would reach logs and `status` with every error)."""
    if not value.startswith(("http://", "https://")):
        return "must be an http:// or https:// URL"
    if "@" in value.split("/")[2]:
        return "must not hold credentials (user:password@): use username and password_env, or the kind's own"
    return None

#: Keys every kind shares: the queue's delivery keys.
DELIVERY_KEYS = ("name", "kind", "batch_size", "retry_delay", "retry_multiplier", "max_retry_delay", "max_failures",
                 "parallel", "default", "connect_timeout", "network_timeout")
def _ENV_NAME(v: str) -> str | None:
    if v.replace("_", "").isalnum() and v.isascii() and not v[:1].isdigit():
        return None
    return "must be the name of an environment variable"

#: Keys of the other kinds, beside the delivery keys.
KIND_KEYS: dict[str, dict[str, tuple[Any, Any, Check | None]]] = {
    "dicomweb": {
        "url": (str, REQUIRED, lambda v: _http_url(v)),
        "username": (str, "", None),
        "password_env": (str, "", _ENV_NAME),
        "bearer_token_file": (str, "", None),
        "max_request_mb": (int, 64, _positive),
        "tls": (dict, {}, None),
    },
    "s3": {
        "bucket": (str, REQUIRED, lambda v: None if v.strip() else "must not be empty"),
        "prefix": (str, "", None),
        "endpoint_url": (str, "", lambda v: _http_url(v) if v else None),
        "region": (str, "", None),
    },
    "azure": {
        "container": (str, REQUIRED, lambda v: None if v.strip() else "must not be empty"),
        "prefix": (str, "", None),
        "connection_string_env": (str, "AZURE_STORAGE_CONNECTION_STRING", _ENV_NAME),
    },
}
STUDIES_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "stable_seconds": (NUMBER, 30.0, _positive),
}
TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", NUMBER: "a number", dict: "a table",
              bool: "true or false", (str, int): '"auto" or an integer'}


def _section(path: Path, name: str, raw: Any, spec: dict) -> dict[str, Any]:
    """Validate one TOML table against its spec; return values with defaults filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {name} must be a table")
    for key in raw:
        if key not in spec:
            raise ConfigError(f"{path}: {name}.{key}: unknown key (known: {', '.join(spec)})")
    values: dict[str, Any] = {}
    for key, (kind, default, check) in spec.items():
        dotted = f"{name}.{key}"
        if key not in raw:
            if default is REQUIRED:
                raise ConfigError(f"{path}: {dotted}: required key is missing")
            values[key] = default
            continue
        value = raw[key]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ConfigError(f"{path}: {dotted}: must be {TYPE_NAMES[kind]}, not {type(value).__name__}")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{path}: {dotted}: {problem}")
        values[key] = value
    return values


def _resolve(base: Path, value: str) -> Path:
    candidate = Path(os.path.expanduser(value))
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def _check_key_file(path: Path, key_file: Path) -> None:
    """A key file that exists must be a readable regular file; a missing one is created at start."""
    if not key_file.exists():
        if not key_file.parent.exists() and not key_file.parent.parent.exists():
            raise ConfigError(f"{path}: anonymization.key_file: folder {key_file.parent} does not exist")
        return
    if not key_file.is_file():
        raise ConfigError(f"{path}: anonymization.key_file: {key_file} is not a regular file")
    try:
        with open(key_file, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(f"{path}: anonymization.key_file: cannot read {key_file} ({exc.strerror})") from None


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a TOML config file; raise ConfigError naming file and key."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    known = {"node", "anonymization", "destinations", "routes", "security", "return", "http", "retention",
             "studies"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: {key}: unknown section (known: {', '.join(sorted(known))})")
    base = path.resolve().parent
    node = _section(path, "node", raw.get("node", {}), NODE_KEYS)
    anon = _section(path, "anonymization", raw.get("anonymization", {}), ANON_KEYS)
    security = _section(path, "security", raw.get("security", {}), SECURITY_KEYS)
    retention = _section(path, "retention", raw.get("retention", {}), RETENTION_KEYS)
    studies = _section(path, "studies", raw.get("studies", {}), STUDIES_KEYS)
    destinations = _destinations(path, raw.get("destinations"), base)
    routes = _routes(path, raw.get("routes", []), {d.name for d in destinations})
    key_file = _resolve(base, anon["key_file"])
    _check_key_file(path, key_file)
    return_path = _return(path, raw.get("return"), base, node, destinations)
    return Settings(
        path=path.resolve(),
        ae_title=node["ae_title"],
        host=node["host"],
        port=node["port"],
        data_dir=_resolve(base, node["data_dir"]),
        allowed_calling_aets=tuple(node["allowed_calling_aets"]),
        organization=anon["organization"],
        key_file=key_file,
        destinations=destinations,
        profile_options=tuple(anon["profile_options"]),
        max_associations=node["max_associations"],
        acse_timeout=float(node["acse_timeout"]),
        dimse_timeout=float(node["dimse_timeout"]),
        network_timeout=float(node["network_timeout"]),
        max_pdu=node["max_pdu"],
        log_format=node["log_format"],
        log_level=node["log_level"],
        burned_in=anon["burned_in"],
        leak_guard=anon["leak_guard"],
        overrides=_overrides(path, anon["overrides"]),
        pixel_rules=_pixel_rules(path, anon["pixel_rules"]),
        routes=routes,
        min_free_mb=node["min_free_mb"],
        stop_timeout=float(node["stop_timeout"]),
        workers=auto_workers() if node["workers"] == "auto" else node["workers"],
        tls=_listener_tls(path, node["tls"], base, node["port"]),
        mapping_key_file=_resolve(base, security["mapping_key_file"]) if security["mapping_key_file"] else None,
        operators=tuple(o.strip() for o in security["operators"]),
        audit_file=_resolve(base, security["audit_file"]) if security["audit_file"] else None,
        audit_syslog=security["audit_syslog"],
        warnings=_warnings(destinations) + _return_warnings(return_path),
        return_path=return_path,
        http=_http(path, raw.get("http"), base),
        unlisted=anon["unlisted"],
        ocr_all_images=anon["ocr_all_images"],
        association_request_timeout=float(node["association_request_timeout"]),
        max_pending_per_address=node["max_pending_per_address"],
        ack=node["ack"],
        retention_sent_days=float(retention["sent_days"]),
        retention_staging_days=float(retention["staging_days"]),
        stable_seconds=float(studies["stable_seconds"]),
    )


def _tls_file(path: Path, where: str, base: Path, value: str) -> Path | None:
    """A certificate or key path: resolved, and it must be a readable file."""
    if not value:
        return None
    resolved = _resolve(base, value)
    if not resolved.is_file() or not os.access(resolved, os.R_OK):
        raise ConfigError(f"{path}: {where}: {resolved} is not a readable file")
    return resolved


def _listener_tls(path: Path, raw: dict, base: Path, plain_port: int, where: str = "node.tls") -> TLS | None:
    """[node.tls]: a TLS listener beside (or, on node.port, instead of) the plain one."""
    if not raw:
        return None
    values = _section(path, where, raw, LISTENER_TLS_KEYS)
    files = {key: _tls_file(path, f"{where}.{key}", base, values[key])
             for key in ("certificate", "private_key", "ca_certificates")}
    if values["require_client_cert"] and files["ca_certificates"] is None:
        raise ConfigError(f"{path}: {where}.ca_certificates: required when require_client_cert = true "
                          "(the CA that signs the clients' certificates)")
    return TLS(certificate=files["certificate"], private_key=files["private_key"],
               ca_certificates=files["ca_certificates"], min_version=values["min_version"],
               require_client_cert=values["require_client_cert"],
               port=values["port"], handshake_timeout=float(values["handshake_timeout"]))


def _destination_tls(path: Path, where: str, raw: dict, base: Path) -> TLS | None:
    """[destinations.tls]: present (even empty) means the destination is reached over TLS."""
    if "tls" not in raw:
        return None
    values = _section(path, f"{where}.tls", raw["tls"], DEST_TLS_KEYS)
    files = {key: _tls_file(path, f"{where}.tls.{key}", base, values[key])
             for key in ("certificate", "private_key", "ca_certificates")}
    if (files["certificate"] is None) != (files["private_key"] is None):
        raise ConfigError(f"{path}: {where}.tls: certificate and private_key go together")
    return TLS(certificate=files["certificate"], private_key=files["private_key"],
               ca_certificates=files["ca_certificates"], min_version=values["min_version"],
               verify_hostname=values["verify_hostname"],
               server_name=values["server_name"])


LOOPBACK = ("127.", "::1", "localhost")


def _warnings(destinations: tuple[Destination, ...], where: str = "destinations") -> tuple[str, ...]:
    return tuple(
        f"{where}.{d.name}: TLS is off for {d.host}, which is not loopback: the anonymized data "
        "crosses the network in the clear (add a [destinations.tls] table)"
        for d in destinations if d.kind == "dicom" and d.tls is None and not d.host.startswith(LOOPBACK)
    ) + tuple(
        f"destinations.{d.name}: {d.url} is plain http to a host that is not loopback: the anonymized data "
        "and the credentials cross the network in the clear (use https://)"
        for d in destinations if d.kind == "dicomweb" and d.url.startswith("http://")
        and not d.url[len("http://"):].startswith(LOOPBACK)
    )


def _return_warnings(ret: ReturnPath | None) -> tuple[str, ...]:
    """Re-identified data in the clear, or a return AE anyone may send to."""
    if ret is None:
        return ()
    warnings = list(_warnings(ret.destinations, "return.destinations"))
    if not ret.allowed_calling_aets:
        warnings.append("return.allowed_calling_aets is empty: any calling AE may send results to be "
                        "re-identified and filed at the hospital (list the reader's AE titles)")
    if ret.hl7 is not None and not ret.hl7.forward_host.startswith(LOOPBACK):
        warnings.append(f"return.hl7: reports go to {ret.hl7.forward_host} as plain MLLP, re-identified, "
                        "in the clear (use a VPN or a TLS tunnel)")
    return tuple(warnings)


def _routes(path: Path, raw: Any, names: set[str]) -> tuple[Route, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: routes: must be an array of tables ([[routes]])")
    routes = []
    for index, item in enumerate(raw):
        where = f"routes[{index}]"
        values = _section(path, where, item, ROUTE_KEYS)
        unknown = [d for d in values["destinations"] if d not in names]
        if unknown:
            raise ConfigError(f"{path}: {where}.destinations: no destination named {', '.join(map(repr, unknown))}")
        match = []
        for key, pattern in values["match"].items():
            tag = _tag(key)
            if tag is None or not isinstance(pattern, str):
                raise ConfigError(f"{path}: {where}.match.{key}: must be KEYWORD or \"(gggg,eeee)\" = \"glob\"")
            match.append((tag, pattern))
        for key in ("modalities", "sop_classes", "destinations"):
            if not all(isinstance(v, str) for v in values[key]):
                raise ConfigError(f"{path}: {where}.{key}: must be a list of strings")
        routes.append(Route(
            name=values["name"] or f"route{index}",
            destinations=tuple(values["destinations"]),
            calling_aets=tuple(values["calling_aets"]),
            modalities=tuple(m.upper() for m in values["modalities"]),
            sop_classes=tuple(values["sop_classes"]),
            match=tuple(match),
            priority=PRIORITIES[values["priority"]] if values["priority"] else None,
        ))
    return tuple(routes)


def _tag(text: str) -> int | None:
    """A keyword (InstitutionName) or a tag written (0008,0080), 0008,0080 or 00080080."""
    tag = tag_for_keyword(text)
    if tag is not None:
        return tag
    digits = text.strip("()").replace(",", "")
    if len(digits) == 8 and all(c in "0123456789abcdefABCDEF" for c in digits):
        return int(digits, 16)
    return None


def _overrides(path: Path, raw: dict) -> tuple[tuple[int, str, Any], ...]:
    """[anonymization.overrides]: KEY = "keep" | "remove" | "empty" | { set = VALUE }."""
    result = []
    for key, value in raw.items():
        where = f"{path}: anonymization.overrides.{key}"
        tag = _tag(key)
        if tag is None:
            raise ConfigError(f"{where}: not a DICOM keyword or tag")
        if isinstance(value, dict):
            if set(value) != {"set"} or isinstance(value["set"], (dict, bool)):
                raise ConfigError(f"{where}: a table must be {{ set = VALUE }} with a string, number or list")
            result.append((tag, "set", value["set"]))
        elif value in ("keep", "remove", "empty"):
            result.append((tag, value, None))
        else:
            raise ConfigError(f"{where}: must be \"keep\", \"remove\", \"empty\" or {{ set = VALUE }}")
    return tuple(result)


def _pixel_rules(path: Path, raw: list) -> tuple[PixelRule, ...]:
    rules = []
    for index, item in enumerate(raw):
        name = f"anonymization.pixel_rules[{index}]"
        values = _section(path, name, item, PIXEL_RULE_KEYS)
        rectangles = values.pop("rectangles")
        if not rectangles or not all(
            isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                        for v in r) and r[2] > 0 and r[3] > 0 for r in rectangles
        ):
            raise ConfigError(f"{path}: {name}.rectangles: must be a non-empty list of [x, y, width, height] "
                              "non-negative integers")
        rules.append(PixelRule(rectangles=tuple(tuple(r) for r in rectangles), **values))
    return tuple(rules)


def _destinations(path: Path, raw: Any, base: Path, where: str = "destinations") -> tuple[Destination, ...]:
    if raw is None or raw == []:
        raise ConfigError(f"{path}: {where}: at least one [[{where}]] table is required")
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: {where}: must be an array of tables ([[{where}]])")
    result = []
    for index, item in enumerate(raw):
        kind = item.get("kind", "dicom") if isinstance(item, dict) else "dicom"
        if kind != "dicom":
            result.append(_other_destination(path, f"{where}[{index}]", item, base))
            continue
        values = _section(path, f"{where}[{index}]", {k: v for k, v in item.items() if k != "kind"}, DEST_KEYS)
        values["tls"] = _destination_tls(path, f"{where}[{index}]", item, base)
        for key in ("connect_timeout", "acse_timeout", "dimse_timeout", "network_timeout",
                    "retry_delay", "retry_multiplier", "max_retry_delay"):
            values[key] = float(values[key])
        result.append(Destination(**values))
    names = [d.name for d in result]
    for index, name in enumerate(names):
        if names.index(name) != index:
            raise ConfigError(f"{path}: {where}[{index}].name: duplicate destination name {name!r}")
    return tuple(result)


def _return(path: Path, raw: Any, base: Path, node: dict[str, Any],
            outbound: tuple[Destination, ...]) -> ReturnPath | None:
    """[return] with its [[return.destinations]] and optional [return.hl7]; None when absent."""
    if raw is None:
        return None
    values = _section(path, "return", raw, RETURN_KEYS)
    host = values["host"] or node["host"]
    destinations = _destinations(path, values["destinations"], base, "return.destinations")
    taken = {d.name for d in outbound} | {HL7_QUEUE}
    for index, destination in enumerate(destinations):
        if destination.kind != "dicom":  # the hospital PACS takes C-STORE; originals never go to a cloud
            raise ConfigError(f"{path}: return.destinations[{index}].kind: return destinations are C-STORE only")
        if destination.name in taken:  # one queue table: a shared name would mix outbound and return rows
            raise ConfigError(f"{path}: return.destinations[{index}].name: {destination.name!r} is already the "
                              "name of an outbound destination (or reserved); return destinations need their own")
    ports = {node["port"]} | ({node["tls"]["port"]} if node["tls"].get("port") else set())
    if values["port"] in ports:
        raise ConfigError(f"{path}: return.port: {values['port']} is already the node's port")
    hl7 = None
    if values["hl7"]:
        h = _section(path, "return.hl7", values["hl7"], HL7_KEYS)
        if h["port"] in ports | {values["port"]}:
            raise ConfigError(f"{path}: return.hl7.port: {h['port']} is already a DICOM port of the node")
        hl7 = HL7Return(port=h["port"], forward_host=h["forward_host"], forward_port=h["forward_port"],
                        host=h["host"] or host, timeout=float(h["timeout"]), retry_delay=float(h["retry_delay"]),
                        max_retry_delay=float(h["max_retry_delay"]), max_failures=h["max_failures"])
    return ReturnPath(ae_title=values["ae_title"], host=host, port=values["port"],
                      allowed_calling_aets=tuple(values["allowed_calling_aets"]), destinations=destinations,
                      tls=_listener_tls(path, values["tls"], base, values["port"], "return.tls"), hl7=hl7)


@dataclass(frozen=True)
class HTTP:
    """[http]: the HTTP gateway (anonymize-stream, batch-prepare, STOW-RS, metrics, status page)."""

    host: str = "127.0.0.1"
    port: int = 8080
    token_file: Path = Path("var/http.token")
    allowed_roots: tuple[Path, ...] = ()  # resolved (symlinks followed): the only folders batch-prepare reads
    certificate: Path | None = None  # TLS: both given, the gateway speaks HTTPS only
    private_key: Path | None = None
    max_request_mb: int = 2048  # larger bodies are answered 413 before they fill the disk
    batch_wait_seconds: float = 20.0  # batch-prepare answers 200 when done within this, else 202
    page_refresh_seconds: int = 10  # the status page reloads itself this often


HTTP_KEYS: dict[str, tuple[Any, Any, Check | None]] = {
    "host": (str, "127.0.0.1", None),
    "port": (int, 8080, _port),
    "token_file": (str, "var/http.token", None),
    "allowed_roots": (list, [], lambda v: None if all(isinstance(r, str) and r for r in v)
                      else "must be a list of folder paths"),
    "certificate": (str, "", None),
    "private_key": (str, "", None),
    "max_request_mb": (int, 2048, _positive),
    "batch_wait_seconds": (NUMBER, 20.0, lambda v: None if v >= 0 else "must be 0 or more"),
    "page_refresh_seconds": (int, 10, _positive),
}


def _http(path: Path, raw: Any, base: Path) -> HTTP | None:
    """[http]: absent means no HTTP server; an empty table serves on the defaults."""
    if raw is None:
        return None
    values = _section(path, "http", raw, HTTP_KEYS)
    files = {key: _tls_file(path, f"http.{key}", base, values[key]) for key in ("certificate", "private_key")}
    if (files["certificate"] is None) != (files["private_key"] is None):
        raise ConfigError(f"{path}: http: certificate and private_key go together")
    return HTTP(host=values["host"], port=values["port"], token_file=_resolve(base, values["token_file"]),
                allowed_roots=tuple(Path(os.path.realpath(_resolve(base, r))) for r in values["allowed_roots"]),
                max_request_mb=values["max_request_mb"], batch_wait_seconds=float(values["batch_wait_seconds"]),
                page_refresh_seconds=values["page_refresh_seconds"], **files)


def _other_destination(path: Path, where: str, raw: dict, base: Path) -> Destination:
    """A [[destinations]] table of kind dicomweb, s3 or azure: the delivery keys and the kind's own."""
    kind = raw["kind"]
    if kind not in KIND_KEYS:
        raise ConfigError(f"{path}: {where}.kind: must be one of {', '.join(DESTINATION_KINDS)}")
    spec = {key: DEST_KEYS[key] for key in DELIVERY_KEYS if key in DEST_KEYS} | KIND_KEYS[kind]
    values = _section(path, where, {k: v for k, v in raw.items() if k != "kind"}, spec)
    for key in ("connect_timeout", "network_timeout", "retry_delay", "retry_multiplier", "max_retry_delay"):
        values[key] = float(values[key])
    if kind == "dicomweb":
        values["tls"] = _destination_tls(path, where, raw, base)
        values["bearer_token_file"] = _token_file(path, where, values, base)
        if values["username"] and not values["password_env"]:
            raise ConfigError(f"{path}: {where}.password_env: required with username (the variable that holds "
                              "the password; never the password itself)")
    return Destination(kind=kind, ae_title="", host="", port=0, **values)


def _token_file(path: Path, where: str, values: dict[str, Any], base: Path) -> Path | None:
    """dicomweb bearer_token_file: a readable file only its owner may read (checked again at each use)."""
    if not values["bearer_token_file"]:
        return None
    if values["username"]:
        raise ConfigError(f"{path}: {where}.bearer_token_file: give either username/password_env or a bearer token")
    token = _tls_file(path, f"{where}.bearer_token_file", base, values["bearer_token_file"])
    assert token is not None
    if token.stat().st_mode & 0o077:
        raise ConfigError(f"{path}: {where}.bearer_token_file: {token} is readable by group or others (chmod 600)")
    return token
