"""The `telenode` command line: serve, anonymize, reidentify, status.

Wires the modules together and owns process concerns: exit statuses (2 for a
configuration problem), signals (SIGTERM/SIGINT stop gracefully), and what is
printed on stdout (results) versus stderr (structured logs).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from node import __version__, config, log, serve
from node.deid import Deidentifier, Pseudonymizer, load_or_create_key
from node.deid.guard import Guard
from node.deid.pseudonyms import KeyFileError
from node.pipeline import Held, Pipeline, Rejected, Safeguards
from node.routing import Router
from node.spool import Quarantine, Spool, copier
from node.store import Store, empty_status

EXIT_CONFIG = 2


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


def _store(settings: config.Settings) -> Store:
    try:
        return Store(settings.database)
    except OSError as exc:
        raise Fatal(f"telenode: cannot open mapping store {settings.database}: {exc.strerror}", 1) from None


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
    tempfile.tempdir = str(settings.incoming_dir)
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


def cmd_reidentify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    log.configure(settings.log_format, settings.log_level)
    operator = args.operator or os.environ.get("TELENODE_OPERATOR") or getpass.getuser()
    reason = args.reason or os.environ.get("TELENODE_REASON") or ""
    store = _store(settings)
    try:
        found = store.lookup(args.value)
        # Audited before anything is answered, found or not.
        store.audit("reidentify", operator=operator, reason=reason, pseudonym=args.value, found=found is not None)
    finally:
        store.close()
    if found is None:
        print(f"telenode: unknown pseudonym {args.value!r}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in found.items() if v not in (None, "")}, indent=2, sort_keys=True))
    return 0


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
    if args.json:
        print(json.dumps({"destinations": queues, "quarantine": quarantined, "quarantine_by_kind": by_kind},
                         indent=2, sort_keys=True))
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
    return getattr(args, "operator", None) or os.environ.get("TELENODE_OPERATOR") or getpass.getuser()


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
    reid.add_argument("--operator", help="who asks (default: $TELENODE_OPERATOR or the OS user)")
    reid.add_argument("--reason", help="why (default: $TELENODE_REASON)")
    reid.set_defaults(func=cmd_reidentify)
    stat = command("status", "queue per destination: pending, sent, failed")
    stat.add_argument("--json", action="store_true", help="machine-readable output")
    stat.set_defaults(func=cmd_status)
    for name, text in (("pause", "stop sending to a destination (instances are still accepted and queued)"),
                       ("resume", "send to a paused destination again")):
        sub = command(name, text)
        sub.add_argument("destination", metavar="NAME")
        sub.add_argument("--operator", help="who (default: $TELENODE_OPERATOR or the OS user)")
        sub.set_defaults(func=cmd_pause)
    quarantine = commands.add_parser("quarantine", help="instances held back: list them, retry them")
    actions = quarantine.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="what is held and why")
    listing.add_argument("--config", "-c", metavar="FILE")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_quarantine_list)
    retry = actions.add_parser("retry", help="queue failed sends again; re-run held originals through the pipeline")
    retry.add_argument("--config", "-c", metavar="FILE")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every entry")
    retry.add_argument("--operator", help="who (default: $TELENODE_OPERATOR or the OS user)")
    retry.set_defaults(func=cmd_quarantine_retry)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Fatal as exc:
        print(str(exc), file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
