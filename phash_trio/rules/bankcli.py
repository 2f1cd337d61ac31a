"""``phash-trio banks list | import NAME FILE | export NAME | remove NAME | enable | disable``.

Imports report every bad line with its number and import nothing from a file with errors
unless ``--skip-bad``; the bank is created if needed. Every change goes through the change log,
so running services pick it up within ``BANKS_POLL_SECS``. Exit codes: 0 done, 1 bad input or
no such bank, 2 configuration or Redis unreachable (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import redis

from phash_trio.rules.banks import BankError, BankStore, check_bank_name
from phash_trio.rules.formats import FORMATS, MAX_FILE_BYTES, detect_format, export_lines
from phash_trio.rules.formats import parse_text as parse_bank_text

__all__ = ["add_banks_parser", "known_banks"]

#: Most bad lines printed one by one (the count is always printed).
_SHOW_ERRORS = 200


def known_banks(redis_url: str) -> set[str] | str:
    """The bank names in Redis, or one line saying why they could not be read."""
    try:
        store = BankStore.from_url(redis_url, timeout=2.0)
    except ValueError as exc:
        return f"REDIS_URL is invalid ({exc})"
    try:
        return set(store.bank_names())
    except (redis.RedisError, OSError) as exc:
        return f"Redis unreachable ({type(exc).__name__}), unknown banks not reported"
    finally:
        store.close()


def add_banks_parser(sub: Any) -> None:
    banks = sub.add_parser("banks", help="hash banks in Redis: list, import, export, remove")
    banks_sub = banks.add_subparsers(dest="banks_command", required=True)
    banks_sub.add_parser("list", help="banks with their flag and hash counts")
    imp = banks_sub.add_parser("import", help="add the hashes of FILE to bank NAME")
    imp.add_argument("name", metavar="NAME")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--format", choices=FORMATS, default=None, help="default: from the file")
    imp.add_argument(
        "--type", default="pdq", help="signal type of bare hashes (pdq, phash, md5, sha256)"
    )
    imp.add_argument("--skip-bad", action="store_true", help="import the good lines anyway")
    exp = banks_sub.add_parser("export", help="print '<signal_type> <hash>' lines of bank NAME")
    exp.add_argument("name", metavar="NAME")
    for verb in ("remove", "enable", "disable"):
        one = banks_sub.add_parser(verb, help=f"{verb} bank NAME")
        one.add_argument("name", metavar="NAME")
    banks.set_defaults(func=_cmd_banks)


def _cmd_banks(args: argparse.Namespace) -> int:
    from phash_trio.config import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"phash-trio: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        store = BankStore.from_url(settings.redis_url, log_maxlen=settings.banks_log_maxlen)
    except ValueError as exc:
        print(f"phash-trio: REDIS_URL: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, store)
    except (redis.RedisError, OSError) as exc:
        print(f"phash-trio: Redis unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except BankError as exc:
        print(f"phash-trio: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _run(args: argparse.Namespace, store: BankStore) -> int:
    command = args.banks_command
    if command == "list":
        banks = store.list_banks()
        if not banks:
            print("no banks")
        for info in banks:
            counts = ", ".join(f"{n} {kind}" for kind, n in info.counts.items() if n) or "empty"
            flag = "enabled" if info.enabled else "disabled"
            print(f"{info.name}\t{flag}\t{counts}")
        return 0
    name = check_bank_name(args.name)
    if command == "import":
        return _import(args, store, name)
    exists = name in store.bank_names()
    if not exists:
        print(f"phash-trio: no such bank: {name}", file=sys.stderr)
        return 1
    if command == "export":
        for entry in _sorted(store, name):
            sys.stdout.write(entry + "\n")
    elif command == "remove":
        store.remove_bank(name)
        print(f"{name}: removed")
    else:
        store.set_bank(name, enabled=command == "enable")
        print(f"{name}: {command}d")
    return 0


def _sorted(store: BankStore, name: str) -> list[str]:
    return sorted(export_lines(e for e in store.entries(name) if e.enabled))


def _import(args: argparse.Namespace, store: BankStore, name: str) -> int:
    path = Path(args.file)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            print(f"{path}: {size} bytes, more than {MAX_FILE_BYTES}: split it", file=sys.stderr)
            return 1
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{path}: cannot read: {exc}", file=sys.stderr)
        return 1
    fmt = args.format or detect_format(path, text[:4096])
    parsed = parse_bank_text(text, fmt, path=path, default_type=args.type)
    for error in parsed.errors[:_SHOW_ERRORS]:
        print(f"{path}: {error}", file=sys.stderr)
    if len(parsed.errors) > _SHOW_ERRORS:
        print(f"{path}: ... and {len(parsed.errors) - _SHOW_ERRORS} more", file=sys.stderr)
    if parsed.errors and not args.skip_bad:
        print(
            f"{path}: {len(parsed.errors)} bad line(s), nothing imported (--skip-bad imports"
            f" the {len(parsed.entries)} good ones)",
            file=sys.stderr,
        )
        return 1
    if name not in store.bank_names():
        store.set_bank(name, enabled=True)
    count = store.put(name, parsed.entries)
    skipped = f", {len(parsed.errors)} bad line(s) skipped" if parsed.errors else ""
    print(f"{name}: imported {count} hashes from {path} ({fmt}){skipped}")
    return 1 if parsed.errors else 0
