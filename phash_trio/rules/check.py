"""``phash-trio rules check FILE``: validate a rule file before deploying it.

Prints what the service would do with the file (rules, hashes, thresholds, actions, ignored
authors, warnings) and returns 0, or prints every error, one per line, and returns 1.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from phash_trio.rules.model import Rule, RuleFileError, load_rules

__all__ = ["rules_check"]


def _plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word if count == 1 else words or word + 's'}"


def _describe_rule(index: int, rule: Rule, default_threshold: int) -> str:
    threshold = rule.threshold(default_threshold)
    parts = [
        _plural(len(rule.phashes), "hash", "hashes"),
        f"threshold {threshold}" + (" (default)" if rule.hamming_threshold is None else ""),
        "actions: " + (", ".join(rule.actions) if rule.actions else "none (log only)"),
    ]
    if rule.ignore_did:
        parts.append(f"ignores {_plural(len(rule.ignore_did), 'DID')}")
    if rule.max_actions_per_day is not None:
        parts.append(f"at most {rule.max_actions_per_day} actions/day")
    line = f"  rule {index} {rule.label!r}: " + ", ".join(parts)
    if rule.description:
        line += f"\n      {rule.description}"
    return line


def rules_check(path: Path, default_threshold: int = 3, out: TextIO | None = None) -> int:
    """Check the rule file at ``path``; print a summary (0) or every error (1) to ``out``."""
    stream = sys.stdout if out is None else out
    try:
        ruleset = load_rules(path)
    except RuleFileError as exc:
        print(
            f"{path}: {_plural(len(exc.errors), 'error')}, the service would refuse to start:",
            file=stream,
        )
        for error in exc.errors:
            print(error, file=stream)
        return 1

    rules = ruleset.rules
    hashes = _plural(ruleset.hash_count, "hash", "hashes")
    print(
        f"{path}: OK, {_plural(len(rules), 'rule')}, {hashes}"
        f" (PHASH_HAMMING_THRESHOLD {default_threshold})",
        file=stream,
    )
    for index, rule in enumerate(rules):
        print(_describe_rule(index, rule, default_threshold), file=stream)
    used = Counter(rule.threshold(default_threshold) for rule in rules)
    if used:
        summary = ", ".join(f"{t} ({_plural(n, 'rule')})" for t, n in sorted(used.items()))
        print(f"thresholds used: {summary}", file=stream)
    ignored = sum(len(rule.ignore_did) for rule in rules)
    if ignored:
        print(f"ignoreDID: {_plural(ignored, 'DID')} in total", file=stream)
    if ruleset.warnings:
        print(f"{_plural(len(ruleset.warnings), 'warning')}:", file=stream)
        for warning in ruleset.warnings:
            print(f"  warning: {warning}", file=stream)
    return 0
