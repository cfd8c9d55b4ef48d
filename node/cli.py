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
import json
import os
import resource
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from node import __version__, backup, config, datadir, health, log, privileged, returnpath, serve, settle
from node.deid import Deidentifier, Pseudonymizer, load_or_create_key
from node.deid.guard import Guard
from node.deid.pseudonyms import KeyFileError
from node.keys import MappingKeyError, check_private
from node.lock import DataDirInUse, DataDirLock
from node.pipeline import Held, Pipeline, Rejected, Safeguards
from node.release import Releaser
from node.routing import Router
from node.spool import Quarantine, QuarantineEntry, Spool, atomic_write, copier
from node.store import Store, empty_status

EXIT_CONFIG = 2
EXIT_UNKNOWN = 1  # reidentify: no such pseudonym
EXIT_REFUSED = 3  # a privileged act refused by [security] operators
EXIT_NO_STORE = 4  # a command that reads, on a data_dir no node has used


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
        return Deidentifier(Pseudonymizer(key, settings.organization), settings.profile_options, settings.overrides,
                            unlisted=settings.unlisted)
    except ValueError as exc:
        raise Fatal(f"telenode: configuration error: {settings.path}: anonymization.profile_options: {exc}") from None


def _safeguards(settings: config.Settings) -> Safeguards:
    return Safeguards(
        burned_in=settings.burned_in,
        clean_pixels="clean_pixel_data" in settings.profile_options,
        pixel_rules=settings.pixel_rules,
        guard=Guard() if settings.leak_guard else None,
        ocr_all_images=settings.ocr_all_images,
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
    except sqlite3.Error as exc:  # not a database, corrupt, newer schema: SQLite's words carry no PHI
        raise Fatal(f"telenode: cannot open mapping store {settings.database}: {exc}: restore it from a "
                    "backup (README: Backup and restore) or move it away to start a new one", 1) from None


def _used(settings: config.Settings) -> None:
    """A command that reads: exit 4 (creating nothing) on a data_dir no node has used."""
    try:
        datadir.require_used(settings.data_dir, settings.database, settings.path)
    except datadir.DataDirError as exc:
        raise Fatal(f"telenode: {exc}", EXIT_NO_STORE) from None


def _reader(settings: config.Settings) -> Store:
    """The store for a command that reads: never creates a data_dir, a database or a mapping key."""
    _used(settings)
    if not settings.mapping_key.exists():
        raise Fatal(f"telenode: configuration error: {settings.path}: security.mapping_key_file: "
                    f"{settings.mapping_key} is missing: restore it from the backup (without it the stored "
                    "originals cannot be decrypted)")
    return _store(settings)


def _writable(settings: config.Settings) -> None:
    """serve and anonymize: data_dir created if missing, and writable."""
    try:
        datadir.prepare(settings.data_dir)
    except datadir.DataDirError as exc:
        raise Fatal(f"telenode: configuration error: {settings.path}: node.data_dir: {exc}") from None


def _lock(settings: config.Settings) -> DataDirLock:
    """One node per data_dir, taken before anything touches the store, the spool or incoming/."""
    try:
        return DataDirLock(settings.data_dir).acquire()
    except DataDirInUse as exc:
        raise Fatal(f"telenode: {exc}") from None
    except OSError as exc:
        raise Fatal(f"telenode: configuration error: {settings.path}: node.data_dir: "
                    f"cannot lock {settings.data_dir}: {exc.strerror}") from None


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
    stop = serve.stop_on([signal.SIGTERM, signal.SIGINT])
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    _writable(settings)
    held = _lock(settings)
    try:
        _deidentifier(settings)  # a missing, unreadable or exposed key stops the node here, not in a worker
        try:
            datadir.private_incoming(settings.incoming_dir)
        except OSError as exc:
            raise Fatal(f"telenode: configuration error: {settings.path}: node.data_dir: "
                        f"{settings.incoming_dir}: {exc.strerror}") from None
        store = _store(settings)
        try:
            serve.run(serve.Parts(settings, store, open_worker), stop)
        except serve.StartError as exc:
            raise Fatal(f"telenode: {exc}", 1) from None
        finally:
            store.close()
    finally:
        held.release()
    return 0


def open_worker(settings: config.Settings, on_queued: Callable[[], None]) -> tuple[Pipeline, Store]:
    """One SCP worker's pipeline and store connection (runs in the worker process)."""
    store = _store(settings)
    pipeline = Pipeline(_deidentifier(settings), store, Spool(settings.spool_dir),
                        [d.name for d in settings.destinations], on_queued=on_queued,
                        safeguards=_safeguards(settings), quarantine=Quarantine(settings.quarantine_dir),
                        router=Router(settings.routes, settings.destinations))
    return pipeline, store


def _inputs(paths: Sequence[str]) -> Iterator[tuple[Path, Path]]:
    """(source file, path relative to the output folder) for every file under the inputs."""
    for raw in paths:
        root = Path(raw)
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                yield path, path.relative_to(root)
        else:
            yield root, Path(root.name)


def _progress(items: list[tuple[Path, Path]], settings: config.Settings) -> Iterator[tuple[Path, Path]]:
    """The items, with a progress bar (count, rate, ETA) on stderr when it is a terminal; log lines
    print above the bar. Not on a terminal: the items alone, so stdout stays one JSON line."""
    if not sys.stderr.isatty() or not items:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:.1f} files/s")

    with Progress("anonymizing", BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                  redirect_stderr=True) as bar:
        log.configure(settings.log_format, settings.log_level, stream=sys.stderr)  # rich's proxy: above the bar
        task = bar.add_task("anonymize", total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def cmd_anonymize(args: argparse.Namespace) -> int:
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    logger = log.get("anonymize")
    _writable(settings)
    deidentifier = _deidentifier(settings)
    store = _store(settings)
    output = Path(args.output)
    pipeline = Pipeline(deidentifier, store, None, [], safeguards=_safeguards(settings),
                        quarantine=Quarantine(settings.quarantine_dir))
    done = failed = 0
    try:
        for source, relative in _progress(list(_inputs(args.inputs)), settings):
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


def _privileged(args: argparse.Namespace, settings: config.Settings, store: Store, event: str,
                **facts: Any) -> dict[str, Any]:
    """node/privileged.py decides and audits a refusal (exit 3); returns the audit facts of the act."""
    request = _request(args)
    try:
        who = privileged.authorize(store, settings.operators, event, request, **facts)
    except privileged.Refused as exc:
        raise Fatal(f"telenode: {exc}", EXIT_REFUSED) from None
    _warn_no_reason(request, event)
    return who


def _request(args: argparse.Namespace) -> privileged.Request:
    return privileged.Request.from_environment(args.operator, args.reason)


def _warn_no_reason(request: privileged.Request, event: str) -> None:
    if request.reason is None:
        print(f"telenode: warning: no reason given for {event} (--reason or TELENODE_REASON); "
              "recorded as not given", file=sys.stderr)


def cmd_reidentify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    _check_keys(settings)
    try:
        _used(settings)
    except Fatal as exc:  # nothing was ever recorded here: the value is unknown (exit 1, as for any unknown value)
        raise Fatal(f"{exc}; {args.value!r} is not a known pseudonym", 1) from None
    store = _reader(settings)
    request = _request(args)
    try:
        found = privileged.reidentify(store, settings.operators, settings.organization, request, args.value)
    except privileged.Refused as exc:
        raise Fatal(f"telenode: {exc}", EXIT_REFUSED) from None
    except MappingKeyError as exc:
        raise Fatal(f"telenode: cannot decrypt the originals of {args.value!r}: {exc}", 1) from None
    finally:
        store.close()
    _warn_no_reason(request, "reidentify")
    if found is None:
        print(f"telenode: unknown pseudonym {args.value!r}", file=sys.stderr)
        return EXIT_UNKNOWN
    print(json.dumps({k: v for k, v in found.items() if v not in (None, "")}, indent=2, sort_keys=True))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        _used(settings)
    except Fatal as exc:  # no node has run here yet: its queues are empty; say so, create nothing
        print(exc, file=sys.stderr)
        queues: dict[str, dict] = {}
    else:
        store = _reader(settings)
        try:
            queues = store.status()
        finally:
            store.close()
    held = Quarantine(settings.quarantine_dir).entries() if settings.quarantine_dir.exists() else []
    quarantined = len(held)
    by_kind: dict[str, int] = {}
    for entry in held:
        by_kind[entry.kind or "other"] = by_kind.get(entry.kind or "other", 0) + 1
    for destination in settings.destinations:
        queues.setdefault(destination.name, empty_status())
    returning = _return_queues(settings)
    for name in returning:
        queues.setdefault(name, empty_status())
    batches = _batch_summary(settings)
    waiting = settle.waiting(settings.received_dir)
    if args.json:
        print(json.dumps({"destinations": queues, "quarantine": quarantined, "quarantine_by_kind": by_kind,
                          "return_destinations": returning, "batches": batches, "received": waiting},
                         indent=2, sort_keys=True))
        return 0
    print(f"{'destination':<20} {'state':<7} {'pending':>8} {'sending':>8} {'sent':>8} {'failed':>8} "
          f"{'oldest':>9}  last error")
    for name, row in sorted(queues.items()):
        age = row.get("oldest_pending_age_s")
        state = "paused" if row.get("paused") else "active"
        print(f"{name:<20} {state:<7} {row['pending']:>8} {row['inflight']:>8} {row['sent']:>8} {row['failed']:>8} "
              f"{'-' if age is None else f'{age:.0f}s':>9}  {row.get('last_error') or ''}")
    if returning:
        print(f"return path (re-identified, to the hospital): {', '.join(returning)}")
    if waiting or settings.ack == "received":
        print(f"received (ack = received), not de-identified yet: {waiting}")
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


def _return_queues(settings: config.Settings) -> list[str]:
    """The queues of [return]: its destinations, and the RIS when [return.hl7] is on."""
    ret = settings.return_path
    if ret is None:
        return []
    return [d.name for d in ret.destinations] + ([config.HL7_QUEUE] if ret.hl7 is not None else [])


def _destination_name(settings: config.Settings, name: str) -> str:
    names = [d.name for d in settings.destinations] + _return_queues(settings)
    if name not in names:
        known = ", ".join(names)
        raise Fatal(f"telenode: no destination named {name!r} (configured: {known})", 1)
    return name


def cmd_pause(args: argparse.Namespace) -> int:
    """Pause or resume one destination's queue; the running node follows within a second."""
    settings = _settings(args)
    name = _destination_name(settings, args.destination)
    paused = args.command == "pause"
    store = _reader(settings)
    try:
        store.set_paused(name, paused)
        store.audit("destination_paused" if paused else "destination_resumed", destination=name, operator=_operator(args))
    finally:
        store.close()
    print(f"{name}: {'paused' if paused else 'resumed'}")
    return 0


def _operator(args: argparse.Namespace) -> str:
    return privileged.operator_name(getattr(args, "operator", None))


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    entries = Quarantine(settings.quarantine_dir).entries() if settings.quarantine_dir.exists() else []
    if args.json:
        print(json.dumps([entry.as_dict() for entry in entries], indent=2, sort_keys=True))
        return 0
    print(f"{'id':<26} {'time':<21} {'kind':<12} {'destination':<14} reason")
    for entry in entries:
        print(f"{entry.id:<26} {entry.time:<21} {entry.kind:<12} "
              f"{entry.destination or '-':<14} {entry.reason}")
    print(f"{len(entries)} instance(s) in quarantine")
    return 0


def _held(settings: config.Settings, qid: str) -> tuple[Quarantine, QuarantineEntry]:
    _used(settings)  # Quarantine() would create the folder
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
    store = _reader(settings)
    try:
        who = _privileged(args, settings, store, "quarantine_show", quarantine_id=args.id)
        store.audit("quarantine_show", **who, quarantine_id=args.id, kind=entry.kind)
    finally:
        store.close()
    print(json.dumps({"entry": entry.as_dict(), "attributes": _attributes(quarantine.file(args.id))}, indent=2,
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
    store = _reader(settings)
    try:
        who = _privileged(args, settings, store, "quarantine_export", quarantine_id=args.id)
        store.audit("quarantine_export", **who, quarantine_id=args.id, kind=entry.kind, output=str(target))
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
    store = _reader(settings)
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
    store = _reader(settings)
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
    store = _reader(settings)
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
    store = _reader(settings)
    try:
        records = store.audit_log(args.event, args.limit)
    finally:
        store.close()
    for record in records:
        print(json.dumps(record, sort_keys=True))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """A consistent copy of the mapping store while the node runs (audited: who took a copy, where)."""
    settings = _settings(args)
    output = Path(args.output).resolve()
    store = _reader(settings)
    try:
        store.audit("backup", operator=_operator(args), output=str(output))  # in the copy too
    finally:
        store.close()
    try:
        made = backup.backup(settings.database, output)
    except backup.BackupError as exc:
        raise Fatal(f"telenode: backup: {exc}", 1) from None
    print(json.dumps({"backup": str(made.path), "bytes": made.bytes, "schema": made.schema,
                      "audit_records": made.audit_records,
                      "not_included": [str(settings.key_file), str(settings.mapping_key)]}, sort_keys=True))
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO to the node's own listener: exit 0 when it answers (the container's HEALTHCHECK)."""
    settings = _settings(args)
    try:
        result = health.echo(settings, args.timeout)
    except ValueError as exc:
        raise Fatal(f"telenode: echo: {exc}", 1) from None
    print(json.dumps({"healthy": result.healthy, "detail": result.detail}))
    return 0 if result.healthy else 1


def cmd_quarantine_retry(args: argparse.Namespace) -> int:
    """Release held instances: failed sends are queued again; held originals go through the pipeline again
    (with today's configuration: a new pixel rule, another burned-in policy) and stay held if still refused."""
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    _used(settings)  # Quarantine() would create the folder
    quarantine = Quarantine(settings.quarantine_dir)
    ids = [e.id for e in quarantine.entries()] if args.all else args.ids
    if not ids:
        raise Fatal("telenode: quarantine retry needs IDs or --all", 1)
    store = _reader(settings)
    spool = Spool(settings.spool_dir)
    pipeline = Pipeline(_deidentifier(settings), store, spool, [d.name for d in settings.destinations],
                        safeguards=_safeguards(settings), router=Router(settings.routes, settings.destinations))
    queues = _return_queues(settings)  # a re-identified result goes back to its own spool
    returning = dict.fromkeys(queues, Spool(returnpath.spool_dir(settings))) if queues else {}
    releaser = Releaser(quarantine, store, spool, pipeline, [d.name for d in settings.destinations], returning)
    try:
        results = releaser.release_all(ids, _operator(args))
    finally:
        store.close()
    for result in results:
        if result.why == "not in quarantine":
            print(f"{result.quarantine_id}: not in quarantine", file=sys.stderr)
        else:
            print(f"{result.quarantine_id}: {'released' if result.released else 'still held: ' + result.why}")
    released = sum(r.released for r in results)
    print(json.dumps({"released": released, "held": len(results) - released}))
    return 0 if released == len(results) else 1


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

    copy = command("backup", "a consistent copy of the mapping store, also while the node runs")
    copy.add_argument("--output", "-o", required=True, metavar="FILE", help="a new file (never overwritten)")
    _operator_option(copy)
    copy.set_defaults(func=cmd_backup)
    check = command("echo", "C-ECHO the node's own listener; exit 0 if it answers (health check)")
    check.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds (default 10)")
    check.set_defaults(func=cmd_echo)
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
