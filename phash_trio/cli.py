"""``phash-trio run | serve | hash FILE… | rules check FILE | api-keys add|list | banks … |
dead-letters list|retry|purge | log tail|show|export | webhooks list|redeliver|purge|verify``.

Exit codes: 0 success; 1 some input failed (``hash``, ``rules check``); 2 bad configuration or
rule file at start-up (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phash_trio.config import Settings
    from phash_trio.rules.index import RuleIndex

__all__ = ["main"]


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of the file, or :class:`ImageTooLarge` (never reads more than
    one byte past the cap: ``hash /dev/zero`` ends at once)."""
    from phash_trio.image.meanhash import ImageTooLarge

    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"larger than {max_bytes} bytes (see --max-bytes)")
    return data


def _cmd_hash(args: argparse.Namespace) -> int:
    """One line per file: the hash on stdout, or the error on stderr; nothing else."""
    from phash_trio.image.allocator import tune_allocator
    from phash_trio.image.meanhash import ImageError, format_hash, mean_hash
    from phash_trio.image.quiet import quiet_stderr
    from phash_trio.image.signals import compute_signals

    tune_allocator()
    status = 0
    for name in args.files:
        pdq = None
        try:
            data = _read_capped(Path(name), args.max_bytes)
            with quiet_stderr():
                if args.pdq:
                    signals = compute_signals(data, max_pixels=args.max_pixels)
                    hex_hash, pdq = format_hash(signals.mean), signals.pdq
                else:
                    hex_hash = format_hash(mean_hash(data, max_pixels=args.max_pixels))
        except (ImageError, OSError) as exc:
            status = 1
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if args.json:
                print(json.dumps({"file": name, "error": message}))
            else:
                print(f"error: {name}: {message}", file=sys.stderr)
            continue
        if pdq is not None:
            if args.json:
                print(
                    json.dumps(
                        {"file": name, "phash": hex_hash, "pdq": pdq.hex, "quality": pdq.quality}
                    )
                )
            else:
                print(f"{hex_hash}  {pdq.hex}  {pdq.quality:3d}  {name}")
        elif args.json:
            print(json.dumps({"file": name, "phash": hex_hash}))
        else:
            print(f"{hex_hash}  {name}")
    return status


def _cmd_rules_check(args: argparse.Namespace) -> int:
    from phash_trio.config import ConfigError, Settings, load_settings
    from phash_trio.rules.bankcli import known_banks
    from phash_trio.rules.check import rules_check

    try:
        settings = load_settings()
    except ConfigError:
        settings = Settings()
    threshold = settings.phash_hamming_threshold if args.threshold is None else args.threshold
    status = rules_check(
        Path(args.file),
        default_threshold=threshold,
        pdq_threshold=settings.pdq_hamming_threshold,
        known_banks=lambda: known_banks(settings.redis_url),
    )
    if status != 0 or not args.ozone:
        return status
    return _rules_check_ozone(Path(args.file))


def _rules_check_ozone(path: Path) -> int:
    """``--ozone``: can the automod account do what the (valid) rule file asks?"""
    import trio

    from phash_trio.config import ConfigError, load_settings
    from phash_trio.net.ozone.check import print_ozone_check
    from phash_trio.rules.model import load_rules

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"phash-trio: configuration error: {exc}", file=sys.stderr)
        return 2
    if not settings.has_credentials or not settings.labeler_did:
        print(
            "phash-trio: --ozone needs AUTOMOD_HANDLE, AUTOMOD_PASSWORD, OZONE_PDS and LABELER_DID",
            file=sys.stderr,
        )
        return 2
    rules = load_rules(path).rules
    return trio.run(print_ozone_check, settings, rules, sys.stdout)


def _load_or_exit() -> tuple[object, object]:
    """Settings and rule index, or exit 2 with one line."""
    from phash_trio.config import ConfigError, load_settings
    from phash_trio.rules.index import RuleIndex
    from phash_trio.rules.model import RuleFileError, load_rules

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"phash-trio: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        ruleset = load_rules(settings.rules_file)
    except RuleFileError as exc:
        first = exc.errors[0] if exc.errors else str(exc)
        first = first.removeprefix(f"{settings.rules_file}: ")
        more = (
            f" (and {len(exc.errors) - 1} more; run 'phash-trio rules check')"
            if len(exc.errors) > 1
            else ""
        )
        print(f"phash-trio: rule file {settings.rules_file}: {first}{more}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings, RuleIndex(ruleset, settings.phash_hamming_threshold)


def _cmd_run(args: argparse.Namespace) -> int:
    from phash_trio.service import StartupError, run_service

    return _serve_until_stopped(run_service, StartupError)


def _serve_until_stopped(
    main: Callable[[Settings, RuleIndex], Awaitable[int]], startup_error: type[Exception]
) -> int:
    """Load settings and rules (exit 2 on a bad one), run ``main(settings, rules)`` under Trio;
    a ``startup_error`` (alone or in a nursery group) is one line and exit 2."""
    import trio

    from phash_trio.config import Settings
    from phash_trio.rules.index import RuleIndex
    from phash_trio.runtime.logs import configure_logging, flush_logs

    settings, rules = _load_or_exit()
    assert isinstance(settings, Settings) and isinstance(rules, RuleIndex)
    configure_logging(settings.log_format, settings.log_level)
    try:
        result: int = trio.run(main, settings, rules)
        return result
    except (startup_error, BaseExceptionGroup) as exc:
        reason = _startup_reason(exc, startup_error)
        if reason is None:
            raise
        flush_logs()  # the log writer thread first, so the reason is the last line
        print(f"phash-trio: cannot start: {reason}", file=sys.stderr)
        return 2


def _startup_reason(exc: BaseException, kind: type[Exception]) -> str | None:
    """The message of ``exc`` if it is (a nursery group of nothing but) ``kind``."""
    if isinstance(exc, kind):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(kind)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return str(leaf)
    return None


def _cmd_dead_letters(args: argparse.Namespace) -> int:
    import trio

    from phash_trio.config import Settings
    from phash_trio.rules.index import RuleIndex
    from phash_trio.runtime.logs import configure_logging
    from phash_trio.state.deadletters import dead_letters_command

    settings, rules = _load_or_exit()
    assert isinstance(settings, Settings) and isinstance(rules, RuleIndex)
    configure_logging(settings.log_format, settings.log_level)
    return trio.run(dead_letters_command, settings, rules, args.action, args.limit)


def _settings_or_exit() -> object:
    from phash_trio.config import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        print(f"phash-trio: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_log(args: argparse.Namespace) -> int:
    import trio

    from phash_trio.config import Settings
    from phash_trio.state.logcli import log_command

    settings = _settings_or_exit()
    assert isinstance(settings, Settings)
    return trio.run(
        lambda: log_command(
            settings,
            args.action,
            limit=args.limit,
            target=args.target or "",
            since=args.since or "",
            follow=args.follow,
        )
    )


def _cmd_webhooks(args: argparse.Namespace) -> int:
    import trio

    from phash_trio.config import Settings
    from phash_trio.webhooks.cli import verify_command, webhooks_command

    if args.action == "verify":
        if args.body is None:
            print("phash-trio: webhooks verify needs --body FILE", file=sys.stderr)
            return 2
        return verify_command(
            Path(args.body), args.header, args.secret_env, args.scheme, args.tolerance
        )
    settings = _settings_or_exit()
    assert isinstance(settings, Settings)
    if args.action in ("redeliver", "purge") and not args.id:
        print(f"phash-trio: webhooks {args.action} needs a subscription id", file=sys.stderr)
        return 2
    return trio.run(lambda: webhooks_command(settings, args.action, args.id or "", args.limit))


def _cmd_serve(args: argparse.Namespace) -> int:
    from phash_trio.api.serve import ApiStartupError, serve_command

    return _serve_until_stopped(serve_command, ApiStartupError)


def _cmd_api_keys(args: argparse.Namespace) -> int:
    from phash_trio.api.auth import KeyFileError, add_key, load_keys
    from phash_trio.config import ConfigError, load_settings

    try:
        path = Path(args.file) if args.file else load_settings().api_keys_file
    except ConfigError as exc:
        print(f"phash-trio: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "add":
            if not args.name:
                print("phash-trio: api-keys add needs a NAME", file=sys.stderr)
                return 2
            key = add_key(path, args.name, args.scope or ["check"])
            print(key)
            print(
                f"key {args.name!r} added to {path} (only its hash is stored: keep it now)",
                file=sys.stderr,
            )
            return 0
        for item in load_keys(path):
            print(f"{item.name}\t{','.join(sorted(item.scopes))}")
        return 0
    except KeyFileError as exc:
        print(f"phash-trio: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phash-trio", description="Perceptual-hash moderation for Bluesky."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the service (Jetstream -> hash -> rules -> Ozone)")
    run.set_defaults(func=_cmd_run)

    hash_ = sub.add_parser("hash", help="print the 8x8 mean hash of image files")
    hash_.add_argument("files", nargs="+", metavar="FILE")
    hash_.add_argument("--json", action="store_true", help="one JSON object per line")
    hash_.add_argument(
        "--pdq", action="store_true", help="also the PDQ hash and its quality (0-100)"
    )
    hash_.add_argument("--max-pixels", type=int, default=50_000_000)
    hash_.add_argument(
        "--max-bytes",
        type=int,
        default=2_000_000,
        help="refuse larger files without reading them whole (default: the service's"
        " MAX_BLOB_BYTES default, 2000000)",
    )
    hash_.set_defaults(func=_cmd_hash)

    rules = sub.add_parser("rules", help="rule file tools")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a rule file and summarise it")
    check.add_argument("file", metavar="FILE")
    check.add_argument(
        "--threshold", type=int, default=None, help="default threshold (PHASH_HAMMING_THRESHOLD)"
    )
    check.add_argument(
        "--ozone",
        action="store_true",
        help="also ask Ozone (credentials from the environment) whether the automod account's"
        " role and the labeler's service record allow every rule",
    )
    check.set_defaults(func=_cmd_rules_check)

    serve = sub.add_parser(
        "serve", help="run the hash-and-match API alone (no firehose) at API_ADDR"
    )
    serve.set_defaults(func=_cmd_serve)

    keys = sub.add_parser("api-keys", help="add or list API keys (API_KEYS_FILE)")
    keys.add_argument("action", choices=["add", "list"])
    keys.add_argument("name", nargs="?", metavar="NAME")
    keys.add_argument(
        "--scope",
        action="append",
        choices=["check", "curate", "read"],
        help="a scope of the new key (repeat for several; default check)",
    )
    keys.add_argument("--file", help="the key file (default API_KEYS_FILE)")
    keys.set_defaults(func=_cmd_api_keys)

    dead = sub.add_parser("dead-letters", help="inspect or reprocess failed jobs (jobs:dead)")
    dead.add_argument("action", choices=["list", "retry", "purge"])
    dead.add_argument("--limit", type=int, default=100, help="at most this many (list, retry)")
    dead.set_defaults(func=_cmd_dead_letters)

    from phash_trio.rules.bankcli import add_banks_parser

    add_banks_parser(sub)

    log = sub.add_parser("log", help="read the decision log (JSON lines)")
    log.add_argument("action", choices=["tail", "show", "export"])
    log.add_argument("target", nargs="?", help="show: an entry id, a blob CID or a post URI")
    log.add_argument("--limit", type=int, default=20, help="tail: this many last entries")
    log.add_argument("--follow", "-f", action="store_true", help="tail: keep printing new ones")
    log.add_argument("--since", help="export: ISO 8601 time, 2h, 7d or Unix ms (default: all)")
    log.set_defaults(func=_cmd_log)

    hooks = sub.add_parser("webhooks", help="webhook subscriptions and their dead letters")
    hooks.add_argument("action", choices=["list", "redeliver", "purge", "verify"])
    hooks.add_argument("id", nargs="?", help="redeliver, purge: the subscription id")
    hooks.add_argument("--limit", type=int, default=100, help="redeliver: at most this many")
    hooks.add_argument("--body", help="verify: file with the raw request body")
    hooks.add_argument(
        "--header", action="append", default=[], help="verify: 'Name: value' (repeat)"
    )
    hooks.add_argument(
        "--secret-env", default="WEBHOOK_SECRET", help="verify: variable holding the secret"
    )
    hooks.add_argument("--scheme", choices=["phash", "hma"], default="phash")
    hooks.add_argument("--tolerance", type=float, default=300, help="verify: seconds of skew")
    hooks.set_defaults(func=_cmd_webhooks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return result
