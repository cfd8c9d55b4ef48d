"""The `telenode` command line: serve, anonymize, reidentify, status, quarantine, keys, audit.

Wires the modules together and owns process concerns: exit statuses (2 for a
configuration problem, 3 for a refused privileged act), signals (SIGTERM/SIGINT
stop gracefully), and what is printed on stdout (results) versus stderr
(structured logs). Re-identification and reading quarantined originals are
privileged acts: the operator and reason are checked against `[security]` and
audited (committed) before any original is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import json
import os
import resource
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from node import __version__, config, log, serve
from node.deid import Deidentifier, Pseudonymizer, load_or_create_key
from node.deid.guard import Guard
from node.deid.pseudonyms import KeyFileError
from node.keys import MappingKeyError, check_private
from node.pipeline import Held, Pipeline, Rejected, Safeguards
from node.routing import Router
from node.spool import Quarantine, Spool, atomic_write, copier
from node.store import Store, empty_status

EXIT_CONFIG = 2
EXIT_UNKNOWN = 1  # reidentify: no such pseudonym
EXIT_REFUSED = 3  # a privileged act refused by [security] operators


class Fatal(Exception):
    """Ends the command with a message on stderr and the given exit status."""

    def __init__(self, message: str, status: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.status = status


def _settings(args: argparse.Namespace) -> config.Settings:
    path = args.config or os.environ.get("TELENODE_CONFIG")
    if not path:
        raise Fatal("telenode: --config FILE is required (or set TELENODE_CONFIG)")
    try:
        return config.load(path)
    except config.ConfigError as exc:
        raise Fatal(f"telenode: configuration error: {exc}") from None


def _deidentifier(settings: config.Settings) -> Deidentifier:
    """Key and rule engine, built once per process (never per instance)."""
    _no_core_dumps()
    try:
        key = load_or_create_key(settings.key_file)
    except (KeyFileError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise Fatal(f"telenode: configuration error: {settings.path}: anonymization.key_file: "
                    f"{settings.key_file}: {reason}") from None
    try:
        return Deidentifier(Pseudonymizer(key, settings.organization), settings.profile_options, settings.overrides)
    except ValueError as exc:
        raise Fatal(f"telenode: configuration error: {settings.path}: anonymization.profile_options: {exc}") from None


def _safeguards(settings: config.Settings) -> Safeguards:
    return Safeguards(
        burned_in=settings.burned_in,
        clean_pixels="clean_pixel_data" in settings.profile_options,
        pixel_rules=settings.pixel_rules,
        guard=Guard() if settings.leak_guard else None,
    )


def _no_core_dumps() -> None:
    """A process holding keys and originals writes no core file (crash dumps would carry both)."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _store(settings: config.Settings) -> Store:
    """The mapping store with the mapping keyring (refused unless 0600) and the configured audit copies."""
    _no_core_dumps()
    try:
        return Store(settings.database, settings.mapping_key, audit_file=settings.audit_file,
                     audit_syslog=settings.audit_syslog)
    except KeyFileError as exc:
        raise Fatal(f"telenode: configuration error: {settings.path}: security.mapping_key_file: "
                    f"{settings.mapping_key}: {exc}") from None
    except ValueError as exc:
        raise Fatal(f"telenode: configuration error: {settings.path}: security.audit_syslog: {exc}") from None
    except OSError as exc:
        raise Fatal(f"telenode: cannot open mapping store {settings.database} or its audit file: "
                    f"{exc.strerror}", 1) from None


def _check_keys(settings: config.Settings) -> None:
    """Refuse key files group or others can read (the commands that open them check again)."""
    for what, path in (("anonymization.key_file", settings.key_file),
                       ("security.mapping_key_file", settings.mapping_key)):
        if path.is_file():
            try:
                check_private(path)
            except KeyFileError as exc:
                raise Fatal(f"telenode: configuration error: {settings.path}: {what}: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    # First of all: a SIGTERM that arrives while the node starts must still stop it gracefully.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    _deidentifier(settings)  # a missing, unreadable or exposed key stops the node here, not in a worker
    _private_tempdir(settings.incoming_dir)
    store = _store(settings)
    try:
        serve.run(serve.Parts(settings, store, open_worker), stop)
    except serve.StartError as exc:
        raise Fatal(f"telenode: {exc}", 1) from None
    finally:
        store.close()
    return 0


def open_worker(settings: config.Settings, on_queued: Callable[[], None]) -> tuple[Pipeline, Store]:
    """One SCP worker's pipeline and store connection (runs in the worker process)."""
    store = _store(settings)
    pipeline = Pipeline(_deidentifier(settings), store, Spool(settings.spool_dir),
                        [d.name for d in settings.destinations], on_queued=on_queued,
                        safeguards=_safeguards(settings), quarantine=Quarantine(settings.quarantine_dir),
                        router=Router(settings.routes, settings.destinations))
    return pipeline, store


def _private_tempdir(folder: Path) -> None:
    """Received data sets land in data_dir/incoming (0700), not /tmp: originals stay with the node's
    data, on the file system whose free space the node watches, and out of other users' reach."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    for leftover in folder.glob("*.dcm"):  # a killed node's half-received data sets, never acknowledged
        leftover.unlink(missing_ok=True)
    tempfile.tempdir = str(folder)


def _inputs(paths: Sequence[str]) -> Iterator[tuple[Path, Path]]:
    """(source file, path relative to the output folder) for every file under the inputs."""
    for raw in paths:
        root = Path(raw)
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                yield path, path.relative_to(root)
        else:
            yield root, Path(root.name)


def cmd_anonymize(args: argparse.Namespace) -> int:
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    logger = log.get("anonymize")
    deidentifier = _deidentifier(settings)
    store = _store(settings)
    output = Path(args.output)
    pipeline = Pipeline(deidentifier, store, None, [], safeguards=_safeguards(settings),
                        quarantine=Quarantine(settings.quarantine_dir))
    done = failed = 0
    try:
        for source, relative in _inputs(args.inputs):
            try:
                record = pipeline.anonymize(source, output / relative)
            except Rejected as exc:
                failed += 1
                logger.warning("file_refused", file=str(relative), status=f"0x{exc.status:04X}", reason=exc.comment)
            except Held as exc:
                failed += 1
                logger.warning("file_quarantined", file=str(relative), reason=exc.reason,
                               quarantine_id=exc.quarantine_id)
            except OSError as exc:
                failed += 1
                logger.warning("file_failed", file=str(relative), reason=exc.strerror or type(exc).__name__)
            else:
                done += 1
                logger.info("file_anonymized", file=str(relative), sop_instance_uid=record.pseudo_sop_instance_uid)
    finally:
        store.close()
    print(json.dumps({"anonymized": done, "failed": failed}))
    return 0 if failed == 0 and done > 0 else 1


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid {os.getuid()}"


def _privileged(args: argparse.Namespace, settings: config.Settings, store: Store, event: str,
                **facts: Any) -> dict[str, Any]:
    """Who asks and why, checked against [security] operators; a refusal is audited, then exits 3.

    Returns the audit facts (operator, where it came from, the OS user, reason) for the act's record."""
    given = args.operator or os.environ.get("TELENODE_OPERATOR")
    source = "flag" if args.operator else "env" if given else "os_user"
    operator = given or _os_user()
    reason = args.reason or os.environ.get("TELENODE_REASON") or None
    who = {"operator": operator, "operator_source": source, "os_user": _os_user(), "reason": reason,
           "reason_given": reason is not None}
    refusal = ""
    if settings.operators:
        if not given:
            refusal = "an operator must be named (--operator or TELENODE_OPERATOR)"
        elif operator not in settings.operators:
            refusal = f"operator {operator!r} is not in [security] operators"
        elif reason is None:
            refusal = "a reason is required (--reason or TELENODE_REASON)"
    if refusal:
        store.audit(f"{event}_refused", **who, **facts, refused=refusal)
        raise Fatal(f"telenode: {event} refused: {refusal}", EXIT_REFUSED)
    if reason is None:
        print(f"telenode: warning: no reason given for {event} (--reason or TELENODE_REASON); "
              "recorded as not given", file=sys.stderr)
    return who


def cmd_reidentify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    _check_keys(settings)
    store = _store(settings)
    try:
        who = _privileged(args, settings, store, "reidentify", **_asked(settings, args.value, None))
        found = _lookup(store, args.value)
        # Audited (committed) before anything is answered, found or not.
        store.audit("reidentify", **who, **_asked(settings, args.value, found is not None), found=found is not None)
    finally:
        store.close()
    if found is None:
        print(f"telenode: unknown pseudonym {args.value!r}", file=sys.stderr)
        return EXIT_UNKNOWN
    print(json.dumps({k: v for k, v in found.items() if v not in (None, "")}, indent=2, sort_keys=True))
    return 0


def _asked(settings: config.Settings, value: str, found: bool | None) -> dict[str, str]:
    """What the audit records of a re-identification request: the value when it is (or, before the
    lookup, looks like) one of our pseudonyms; otherwise — an original typed by mistake is PHI —
    only a digest, enough to correlate repeated attempts."""
    ours = value.startswith((f"{settings.organization}-", "2.25.")) if found is None else found
    if ours:
        return {"pseudonym": value}
    return {"value_sha256": hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:16]}


def _lookup(store: Store, value: str) -> dict[str, Any] | None:
    try:
        return store.lookup(value)
    except MappingKeyError as exc:
        raise Fatal(f"telenode: cannot decrypt the originals of {value!r}: {exc}", 1) from None


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings)
    try:
        queues = store.status()
    finally:
        store.close()
    held = Quarantine(settings.quarantine_dir).entries() if settings.quarantine_dir.exists() else []
    quarantined = len(held)
    by_kind: dict[str, int] = {}
    for entry in held:
        by_kind[entry.get("kind", "other")] = by_kind.get(entry.get("kind", "other"), 0) + 1
    for destination in settings.destinations:
        queues.setdefault(destination.name, empty_status())
    batches = _batch_summary(settings)
    if args.json:
        print(json.dumps({"destinations": queues, "quarantine": quarantined, "quarantine_by_kind": by_kind,
                          "batches": batches}, indent=2, sort_keys=True))
        return 0
    print(f"{'destination':<20} {'state':<7} {'pending':>8} {'sending':>8} {'sent':>8} {'failed':>8} "
          f"{'oldest':>9}  last error")
    for name, row in sorted(queues.items()):
        age = row.get("oldest_pending_age_s")
        state = "paused" if row.get("paused") else "active"
        print(f"{name:<20} {state:<7} {row['pending']:>8} {row['inflight']:>8} {row['sent']:>8} {row['failed']:>8} "
              f"{'-' if age is None else f'{age:.0f}s':>9}  {row.get('last_error') or ''}")
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(by_kind.items()))
    print(f"quarantine: {quarantined} instance(s) in {settings.quarantine_dir}" + (f" ({kinds})" if kinds else ""))
    for name, counts in sorted(batches.items()):
        print(f"batches to {name}: " + ", ".join(f"{state} {count}" for state, count in counts.items()))
    return 0


def _batch_summary(settings: config.Settings) -> dict[str, dict[str, int]]:
    """Study batches per destination of another kind, by state (open, sending, done, failed)."""
    from node.batches import Batches

    others = [d.name for d in settings.destinations if d.kind != "dicom"]
    if not others or not settings.database.exists():
        return {}
    batches = Batches(settings.database, settings.stable_seconds)
    try:
        summary = batches.summary()
    finally:
        batches.close()
    return {name: summary.get(name, {"open": 0, "sending": 0, "done": 0, "failed": 0}) for name in others}


def _queued(row: dict[str, int]) -> int:
    return row["pending"] + row["inflight"] + row["sent"] + row["failed"]


def cmd_studies(args: argparse.Namespace) -> int:
    """Recent studies by pseudonym: instances, priority, state per destination, batches."""
    from node.batches import Batches, recent_studies

    settings = _settings(args)
    store = _store(settings)  # opens (creates, migrates) the database the batches live in
    store.close()
    batches = Batches(settings.database, settings.stable_seconds)
    try:
        studies = recent_studies(batches, args.limit)
    finally:
        batches.close()
    if args.json:
        print(json.dumps({"studies": studies}, indent=2, sort_keys=True))
        return 0
    print(f"{'study (pseudonymous)':<46} {'cloud study id':<17} {'images':>6} {'priority':<8}  destinations")
    for study in studies:
        states = ", ".join(f"{name} {row['state']} ({row['sent']}/{_queued(row)} sent)"
                           for name, row in study["destinations"].items())
        print(f"{study['study_instance_uid']:<46} {study['cloud_study_id']:<17} {study['instances']:>6} "
              f"{study['priority']:<8}  {states}")
        for batch in study["batches"]:
            where = ", ".join(f"{name} {row['state']}" for name, row in batch["destinations"].items())
            print(f"    batch {batch['batch_id']}: {batch['instances']} image(s), {batch['priority']}, {where}")
    print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}")
    return 0


def _destination_name(settings: config.Settings, name: str) -> str:
    if name not in {d.name for d in settings.destinations}:
        known = ", ".join(d.name for d in settings.destinations)
        raise Fatal(f"telenode: no destination named {name!r} (configured: {known})", 1)
    return name


def cmd_pause(args: argparse.Namespace) -> int:
    """Pause or resume one destination's queue; the running node follows within a second."""
    settings = _settings(args)
    name = _destination_name(settings, args.destination)
    paused = args.command == "pause"
    store = _store(settings)
    try:
        store.set_paused(name, paused)
        store.audit("destination_paused" if paused else "destination_resumed", destination=name, operator=_operator(args))
    finally:
        store.close()
    print(f"{name}: {'paused' if paused else 'resumed'}")
    return 0


def _operator(args: argparse.Namespace) -> str:
    return getattr(args, "operator", None) or os.environ.get("TELENODE_OPERATOR") or _os_user()


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    entries = Quarantine(settings.quarantine_dir).entries() if settings.quarantine_dir.exists() else []
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True))
        return 0
    print(f"{'id':<26} {'time':<21} {'kind':<12} {'destination':<14} reason")
    for entry in entries:
        print(f"{entry['id']:<26} {entry.get('time', ''):<21} {entry.get('kind', ''):<12} "
              f"{entry.get('destination', '') or '-':<14} {entry.get('reason', '')}")
    print(f"{len(entries)} instance(s) in quarantine")
    return 0


def _held(settings: config.Settings, qid: str) -> tuple[Quarantine, dict]:
    quarantine = Quarantine(settings.quarantine_dir)
    entry = quarantine.get(qid)
    if entry is None or not quarantine.file(qid).is_file():
        raise Fatal(f"telenode: {qid}: not in quarantine", 1)
    return quarantine, entry


def cmd_quarantine_show(args: argparse.Namespace) -> int:
    """Print a held original's attributes (PHI): a privileged act, audited before anything is printed."""
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    _check_keys(settings)
    quarantine, entry = _held(settings, args.id)
    store = _store(settings)
    try:
        who = _privileged(args, settings, store, "quarantine_show", quarantine_id=args.id)
        store.audit("quarantine_show", **who, quarantine_id=args.id, kind=entry.get("kind"))
    finally:
        store.close()
    print(json.dumps({"entry": entry, "attributes": _attributes(quarantine.file(args.id))}, indent=2,
                     sort_keys=True))
    return 0


def _attributes(path: Path) -> dict[str, str]:
    """Top-level text attributes of a DICOM file (no pixel data, no binary, no sequences)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    binary = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}
    return {(elem.keyword or str(elem.tag)): str(elem.value) for elem in ds if elem.VR not in binary}


def cmd_quarantine_export(args: argparse.Namespace) -> int:
    """Copy a held original out (0600, never over an existing file): a privileged act, audited first."""
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    _check_keys(settings)
    quarantine, entry = _held(settings, args.id)
    target = Path(args.output)
    if target.exists():
        raise Fatal(f"telenode: {target} exists; not overwritten", 1)
    store = _store(settings)
    try:
        who = _privileged(args, settings, store, "quarantine_export", quarantine_id=args.id)
        store.audit("quarantine_export", **who, quarantine_id=args.id, kind=entry.get("kind"), output=str(target))
    finally:
        store.close()
    target.parent.mkdir(parents=True, exist_ok=True)
    size = atomic_write(target, copier(quarantine.file(args.id)))
    print(json.dumps({"exported": str(target), "bytes": size}))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """New mapping key, every original re-encrypted under it while the node runs, old keys retired."""
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    _check_keys(settings)
    store = _store(settings)
    try:
        result = store.rotate_mapping_key()
        store.audit("mapping_key_rotated", operator=_operator(args), **result)
    except (KeyFileError, MappingKeyError) as exc:
        raise Fatal(f"telenode: keys rotate: {settings.mapping_key}: {exc}", 1) from None
    finally:
        store.close()
    print(json.dumps(result, sort_keys=True))
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    """Key ids in the mapping keyring (never the keys) and how many stored originals each encrypts."""
    settings = _settings(args)
    _check_keys(settings)
    store = _store(settings)
    try:
        usage = store.key_usage()
        ring = [f"{kid:08x}" for kid in store.ring.ids]
    finally:
        store.close()
    print(json.dumps({"keyring": str(settings.mapping_key), "active": ring[0], "keys": ring, "values": usage},
                     sort_keys=True))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Walk the audit hash chain: 0 if intact, 1 naming the first bad record."""
    settings = _settings(args)
    store = _store(settings)
    try:
        verdict = store.verify_audit()
    finally:
        store.close()
    if not verdict.intact:
        print(f"audit trail broken at record {verdict.bad_id}: {verdict.problem} "
              f"({verdict.count} records before it intact)")
        return 1
    print(f"audit trail intact: {verdict.count} records")
    print(f"head: {verdict.head}")
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    """Audit records as JSON lines, oldest first (pseudonyms and operator facts only)."""
    settings = _settings(args)
    store = _store(settings)
    try:
        records = store.audit_log(args.event, args.limit)
    finally:
        store.close()
    for record in records:
        print(json.dumps(record, sort_keys=True))
    return 0


def cmd_quarantine_retry(args: argparse.Namespace) -> int:
    """Release held instances: failed sends are queued again; held originals go through the pipeline again
    (with today's configuration: a new pixel rule, another burned-in policy) and stay held if still refused."""
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    quarantine = Quarantine(settings.quarantine_dir)
    ids = [e["id"] for e in quarantine.entries()] if args.all else args.ids
    if not ids:
        raise Fatal("telenode: quarantine retry needs IDs or --all", 1)
    store = _store(settings)
    spool = Spool(settings.spool_dir)
    pipeline = Pipeline(_deidentifier(settings), store, spool, [d.name for d in settings.destinations],
                        safeguards=_safeguards(settings), router=Router(settings.routes, settings.destinations))
    released = held = 0
    try:
        for qid in ids:
            entry = quarantine.get(qid)
            if entry is None:
                print(f"{qid}: not in quarantine", file=sys.stderr)
                held += 1
                continue
            ok, why = _release(entry, quarantine, store, spool, pipeline, settings)
            store.audit("quarantine_retry", quarantine_id=qid, kind=entry.get("kind"), released=ok,
                        operator=_operator(args))
            if ok:
                quarantine.remove(qid)
                released += 1
            else:
                held += 1
            print(f"{qid}: {'released' if ok else 'still held: ' + why}")
    finally:
        store.close()
    print(json.dumps({"released": released, "held": held}))
    return 0 if held == 0 else 1


def _release(entry: dict, quarantine: Quarantine, store: Store, spool: Spool, pipeline: Pipeline,
             settings: config.Settings) -> tuple[bool, str]:
    source = quarantine.file(entry["id"])
    if entry.get("kind") == "send_failed":
        destination = entry.get("destination", "")
        if destination not in {d.name for d in settings.destinations}:
            return False, f"destination {destination!r} is no longer configured"
        target = spool.path_for(entry["sop_instance_uid"])
        size = spool.write(target, copier(source))
        store.requeue(destination, {**entry, "path": str(target), "size": size,
                                    "pseudo_sop_instance_uid": entry["sop_instance_uid"]})
        return True, ""
    outcome = pipeline.receive(source, calling_aet=entry.get("calling_aet", ""))
    return outcome.ok, outcome.comment


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="telenode", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"telenode {__version__}")
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", "-c", metavar="FILE", help="TOML config (default: $TELENODE_CONFIG)")
        return sub

    command("serve", "run the node until SIGTERM/SIGINT").set_defaults(func=cmd_serve)
    anon = command("anonymize", "de-identify files and folders offline with the node's rules and store")
    anon.add_argument("inputs", nargs="+", metavar="INPUT")
    anon.add_argument("--output", "-o", required=True, metavar="DIR")
    anon.set_defaults(func=cmd_anonymize)
    reid = command("reidentify", "print the originals behind a pseudonym (audited)")
    reid.add_argument("value", metavar="VALUE", help="pseudonymous PatientID, AccessionNumber or UID")
    _who_arguments(reid)
    reid.set_defaults(func=cmd_reidentify)
    stat = command("status", "queue per destination: pending, sent, failed")
    stat.add_argument("--json", action="store_true", help="machine-readable output")
    stat.set_defaults(func=cmd_status)
    studies = command("studies", "recent studies by pseudonym: instances, batches, state per destination, priority")
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.add_argument("--limit", type=int, default=50, metavar="N", help="at most N studies (default 50)")
    studies.set_defaults(func=cmd_studies)
    for name, text in (("pause", "stop sending to a destination (instances are still accepted and queued)"),
                       ("resume", "send to a paused destination again")):
        sub = command(name, text)
        sub.add_argument("destination", metavar="NAME")
        _operator_option(sub)
        sub.set_defaults(func=cmd_pause)
    def action(group: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> Any:
        """A sub-command of a group (`quarantine list`), with --config accepted on either level."""
        sub = group.add_parser(name, help=help_text, description=help_text)
        _config_option(sub)
        sub.set_defaults(func=func)
        return sub

    quarantine = _group(commands, "quarantine", "instances held back: list, show, export, retry")
    action(quarantine, "list", "what is held and why", cmd_quarantine_list).add_argument("--json", action="store_true")
    retry = action(quarantine, "retry", "queue failed sends again; re-run held originals through the pipeline",
                   cmd_quarantine_retry)
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every entry")
    _operator_option(retry)
    for name, text, func in (("show", "print a held original's attributes (PHI; audited)", cmd_quarantine_show),
                             ("export", "copy a held original to a file (PHI; audited)", cmd_quarantine_export)):
        sub = action(quarantine, name, text, func)
        sub.add_argument("id", metavar="ID")
        if name == "export":
            sub.add_argument("--output", "-o", required=True, metavar="FILE")
        _who_arguments(sub)
    keys = _group(commands, "keys", "the mapping keyring: rotate it, see which keys are in use")
    _operator_option(action(keys, "rotate", "new mapping key; re-encrypt every original; retire old keys",
                            cmd_keys_rotate))
    action(keys, "status", "key ids and how many stored values each encrypts", cmd_keys_status)
    trail = _group(commands, "audit", "the hash-chained audit trail: verify it, show it")
    action(trail, "verify", "exit 0 if the chain is intact, 1 naming the first bad record", cmd_audit_verify)
    show = action(trail, "show", "records as JSON lines, oldest first", cmd_audit_show)
    show.add_argument("--event", metavar="E", help="only this event")
    show.add_argument("--limit", type=int, metavar="N", help="only the last N records")
    return top


def _config_option(sub: argparse.ArgumentParser) -> None:
    """--config on a sub-command of a group (`quarantine list`), also accepted before it
    (`quarantine --config F list`): SUPPRESS keeps the group's value when it is not repeated."""
    sub.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS)


def _group(commands: Any, name: str, help_text: str) -> Any:
    """A command with sub-commands (`keys rotate`); --config may come before the sub-command."""
    group = commands.add_parser(name, help=help_text)
    group.add_argument("--config", "-c", metavar="FILE", help="TOML config (default: $TELENODE_CONFIG)")
    return group.add_subparsers(dest="action", required=True)


def _operator_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--operator", help="who (default: $TELENODE_OPERATOR or the OS user)")


def _who_arguments(sub: argparse.ArgumentParser) -> None:
    _operator_option(sub)
    sub.add_argument("--reason", help="why (default: $TELENODE_REASON)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Fatal as exc:
        print(str(exc), file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
