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
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from node import __version__, config, log
from node.deid import Deidentifier, Pseudonymizer, load_or_create_key
from node.deid.guard import Guard
from node.deid.pseudonyms import KeyFileError
from node.forward import Forwarder
from node.pipeline import Held, Pipeline, Rejected, Safeguards
from node.spool import Quarantine, Spool
from node.store import Store

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
    logger = log.get("node")
    deidentifier = _deidentifier(settings)
    store = _store(settings)
    spool = Spool(settings.spool_dir)
    spool.cleanup_tmp()
    forwarders = [Forwarder(d, store, spool, settings.ae_title) for d in settings.destinations]
    pipeline = Pipeline(deidentifier, store, spool, [d.name for d in settings.destinations],
                        on_queued=lambda: [f.wake() for f in forwarders],
                        safeguards=_safeguards(settings), quarantine=Quarantine(settings.quarantine_dir))
    from node import scp  # imported here: it switches pynetdicom to chunked, unrestricted storage

    try:
        server = scp.start(settings, pipeline)
    except OSError as exc:
        store.close()
        raise Fatal(f"telenode: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", 1) from None
    for forwarder in forwarders:
        forwarder.start()
    store.audit("node_started", ae_title=settings.ae_title, port=settings.port, version=__version__)
    logger.info("node_started", version=__version__, destinations=[d.name for d in settings.destinations])
    while not stop.wait(1.0):
        pass
    logger.info("node_stopping")
    server.shutdown()  # no new associations; those in flight finish their C-STOREs
    deadline = time.monotonic() + 30
    # Only associations that are established have C-STOREs in flight; a bare TCP connection
    # (a load balancer's health check) would otherwise hold the stop until its ACSE timeout.
    while any(a.is_established for a in server.ae.active_associations) and time.monotonic() < deadline:
        time.sleep(0.1)
    for assoc in server.ae.active_associations:  # idle connections, or past the deadline: don't hold the exit
        assoc.abort()
    for forwarder in forwarders:
        forwarder.stop()
    store.audit("node_stopped")
    store.close()
    logger.info("node_stopped")
    return 0


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
        queues.setdefault(destination.name, {"pending": 0, "sent": 0, "failed": 0,
                                             "oldest_pending_age_s": None, "last_error": None})
    if args.json:
        print(json.dumps({"destinations": queues, "quarantine": quarantined, "quarantine_by_kind": by_kind},
                         indent=2, sort_keys=True))
        return 0
    print(f"{'destination':<20} {'pending':>8} {'sent':>8} {'failed':>8} {'oldest':>9}  last error")
    for name, row in sorted(queues.items()):
        age = row.get("oldest_pending_age_s")
        print(f"{name:<20} {row['pending']:>8} {row['sent']:>8} {row['failed']:>8} "
              f"{'-' if age is None else f'{age:.0f}s':>9}  {row.get('last_error') or ''}")
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(by_kind.items()))
    print(f"quarantine: {quarantined} instance(s) in {settings.quarantine_dir}" + (f" ({kinds})" if kinds else ""))
    return 0


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
