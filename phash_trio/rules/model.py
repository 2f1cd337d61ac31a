"""The rule file: a JSON array of rules in skywatch-phash-rs's ``rules/blobs.json`` format.

Each rule names hashes of known images and what to do when a post carries one of them. JSON
keys are skywatch-phash-rs's (camelCase), so its files load unchanged; ``maxActionsPerDay``,
``pdqHashes`` (64-hex PDQ hashes), ``pdqThreshold`` and ``banks`` (names of hash banks in
Redis) are ours. A rule needs ``phashes``, ``pdqHashes`` or ``banks``. A rule file is checked as a whole: :class:`RuleFileError` carries *every* problem found,
each naming the rule index, the key and what is wrong, so one edit-check cycle fixes them all.
Things that load but are probably mistakes (degenerate or duplicate hashes) become warnings.

Errors::

    Exception
    └── RuleFileError      -- .errors: list[str], one line each; .path when read from a file
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NewType

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn, override

from phash_trio.net.atproto.syntax import is_valid_did

__all__ = [
    "ACTION_KEYS",
    "Rule",
    "RuleFileError",
    "RuleSet",
    "format_phash",
    "load_rules",
    "parse_phash",
    "parse_rules",
]

#: Largest value a 64-bit hash can take.
PHASH_MAX = (1 << 64) - 1
#: A mean hash with this few (or, mirrored, this many) bits set comes from a flat-ish image.
FEW_BITS = 4
#: A threshold above this matches unrelated images (a quarter of all bits may differ).
HIGH_THRESHOLD = 16
#: A PDQ threshold above this matches unrelated images (HMA uses 31 of 256 bits).
HIGH_PDQ_THRESHOLD = 63

_HEX16_RE = re.compile(r"[0-9a-fA-F]{16}")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_BANK_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
# atproto custom label values: lowercase ASCII letters and '-'; '!' starts a global one.
_LABEL_VALUE_RE = re.compile(r"!?[a-z-]{1,128}")


class RuleFileError(Exception):
    """The rule file cannot be used; ``errors`` lists every problem, one line each."""

    def __init__(self, errors: list[str], path: Path | None = None) -> None:
        self.errors = errors
        self.path = path
        where = f"{path}: " if path is not None else ""
        count = f"{len(errors)} error{'s' if len(errors) != 1 else ''}"
        super().__init__(f"{where}{count} in rule file:\n" + "\n".join(errors))


def parse_phash(text: str) -> int:
    """16 hex digits (the hash's 8 bytes, first byte first) to an int; ValueError otherwise."""
    if not _HEX16_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not 16 hex digits")
    return int.from_bytes(bytes.fromhex(text), "big")


def format_phash(value: int) -> str:
    """The 16 lowercase hex digits of a hash, as image_hasher prints it."""
    return f"{value:016x}"


#: JSON keys of the action flags, in the order actions are taken.
ACTION_KEYS: tuple[str, ...] = (
    "toLabel",
    "labelAcct",
    "reportPost",
    "reportAcct",
    "takedownPost",
    "takedownAcct",
)


def _check_phashes(rule: Rule, attribute: attrs.Attribute[tuple[int, ...]], value: Any) -> None:
    if not value and not rule.pdq_hashes and not rule.banks:
        raise ValueError("a rule needs at least one hash (phashes, pdq_hashes) or a bank")
    for h in value:
        if not isinstance(h, int) or not 0 <= h <= PHASH_MAX:
            raise ValueError(f"{h!r} is not a 64-bit hash")


@attrs.frozen(kw_only=True)
class Rule:
    """One rule: hashes to look for, and what to do with a post that carries one."""

    label: str
    phashes: tuple[int, ...] = attrs.field(validator=_check_phashes)
    #: The hashes as written in the file, for display (same order as ``phashes``).
    phashes_hex: tuple[str, ...] = attrs.field()
    comment: str = ""
    report_acct: bool = False
    label_acct: bool = False
    report_post: bool = False
    to_label: bool = False
    takedown_post: bool = False
    takedown_acct: bool = False
    #: Largest Hamming distance that still matches; None means PHASH_HAMMING_THRESHOLD.
    hamming_threshold: int | None = None
    description: str | None = None
    #: Authors this rule never acts on.
    ignore_did: frozenset[str] = frozenset()
    #: Per-rule daily action cap; None means the service default MAX_ACTIONS_PER_DAY.
    max_actions_per_day: int | None = None
    #: PDQ hashes (64 lowercase hex digits) matched within ``pdq_threshold``.
    pdq_hashes: tuple[str, ...] = ()
    #: Largest PDQ distance that still matches; None means PDQ_HAMMING_THRESHOLD.
    pdq_threshold: int | None = None
    #: Hash banks (in Redis) whose entries this rule matches.
    banks: tuple[str, ...] = ()

    @phashes_hex.default
    def _hex_from_ints(self) -> tuple[str, ...]:
        return tuple(format_phash(h) for h in self.phashes)

    @phashes_hex.validator
    def _same_length(self, attribute: attrs.Attribute[tuple[str, ...]], value: Any) -> None:
        if len(value) != len(self.phashes):
            raise ValueError("phashes_hex must have one entry per hash")

    def threshold(self, default: int) -> int:
        """The distance this rule matches within, given the service default."""
        return default if self.hamming_threshold is None else self.hamming_threshold

    def pdq_limit(self, default: int) -> int:
        """The PDQ distance this rule matches within, given PDQ_HAMMING_THRESHOLD."""
        return default if self.pdq_threshold is None else self.pdq_threshold

    @property
    def actions(self) -> tuple[str, ...]:
        """JSON names of the action flags that are set, in ``ACTION_KEYS`` order."""
        flags = {
            "toLabel": self.to_label,
            "labelAcct": self.label_acct,
            "reportPost": self.report_post,
            "reportAcct": self.report_acct,
            "takedownPost": self.takedown_post,
            "takedownAcct": self.takedown_acct,
        }
        return tuple(key for key in ACTION_KEYS if flags[key])


@attrs.frozen
class RuleSet:
    """A whole rule file: the rules in file order (first match wins) and load-time warnings."""

    rules: tuple[Rule, ...]
    warnings: tuple[str, ...] = ()

    @property
    def hash_count(self) -> int:
        return sum(len(rule.phashes) for rule in self.rules)


# --- structuring -------------------------------------------------------------------------------
#
# cattrs turns each JSON object into a _RawRule whose field types are strict validating NewTypes;
# with detailed validation it collects every failing field (and every failing list element) of a
# rule in one ClassValidationError, which _describe() flattens into lines. _RawRule is then
# turned into the public Rule.

_Hex16 = NewType("_Hex16", str)
_Did = NewType("_Did", str)
_Label = NewType("_Label", str)
_Count = NewType("_Count", int)
_Hex64 = NewType("_Hex64", str)
_Bank = NewType("_Bank", str)
_PdqList = NewType("_PdqList", list[_Hex64])
_BankList = NewType("_BankList", list[_Bank])
_HashList = NewType("_HashList", list[_Hex16])
_DidList = NewType("_DidList", list[_Did])


@attrs.frozen(kw_only=True)
class _RawRule:
    phashes: _HashList | None = None
    label: _Label
    comment: str = ""
    report_acct: bool = False
    label_acct: bool = False
    report_post: bool = False
    to_label: bool = False
    takedown_post: bool = False
    takedown_acct: bool = False
    hamming_threshold: _Count | None = None
    description: str | None = None
    ignore_did: _DidList | None = None
    max_actions_per_day: _Count | None = None
    pdq_hashes: _PdqList | None = None
    pdq_threshold: _Count | None = None
    banks: _BankList | None = None


# Python attribute -> JSON key (the ones that differ).
_RENAMES = {
    "report_acct": "reportAcct",
    "label_acct": "labelAcct",
    "report_post": "reportPost",
    "to_label": "toLabel",
    "takedown_post": "takedownPost",
    "takedown_acct": "takedownAcct",
    "hamming_threshold": "hammingThreshold",
    "ignore_did": "ignoreDID",
    "max_actions_per_day": "maxActionsPerDay",
    "pdq_hashes": "pdqHashes",
    "pdq_threshold": "pdqThreshold",
}
_JSON_KEYS = tuple(_RENAMES.get(a.name, a.name) for a in attrs.fields(_RawRule))


class _BadValue(ValueError):
    """A value of the right JSON type that is still wrong; str() is the whole explanation."""


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {_short(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _want(what: str, value: object) -> _BadValue:
    return _BadValue(f"expected {what}, got {_json_type(value)}")


def _structure_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise _want("a string", value)
    return value


def _structure_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise _want("true or false", value)
    return value


def _structure_count(value: object, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _want("a whole number >= 0", value)
    if value < 0:
        raise _BadValue(f"must be >= 0, got {value}")
    return value


def _structure_label(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise _want("a non-empty string", value)
    if not value.strip():
        raise _BadValue("must not be empty")
    return value


def _structure_hex16(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise _want("16 hex digits", value)
    if len(value) != 16:
        raise _BadValue(f"{_short(value)} has {len(value)} characters, expected 16 hex digits")
    if not _HEX16_RE.fullmatch(value):
        raise _BadValue(f"{_short(value)} is not hexadecimal (expected 16 digits 0-9a-f)")
    return value


def _structure_hex64(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise _want("64 hex digits (a PDQ hash)", value)
    if not _HEX64_RE.fullmatch(value):
        raise _BadValue(f"{_short(value)} is not a PDQ hash (64 hex digits)")
    return value.lower()


def _structure_bank(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise _want("a bank name", value)
    if not _BANK_RE.fullmatch(value) or len(value) > 100:
        raise _BadValue(f"{_short(value)} is not a bank name ([A-Z_][A-Z0-9_]*)")
    return value


def _structure_did(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise _want("a DID string", value)
    if not is_valid_did(value):
        raise _BadValue(f"{_short(value)} is not a valid did:plc or did:web")
    return value


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _structure_list(item_type: Any) -> Callable[[object, type], list[str]]:
    """A JSON array only (cattrs alone would split a string into characters), item by item."""
    list_type: Any = list[item_type]

    def structure(value: object, _: type) -> list[str]:
        if not isinstance(value, list):
            raise _want("an array", value)
        result: list[str] = _converter.structure(value, list_type)
        return result

    return structure


def _structure_hash_list(value: object, cl: type) -> list[str]:
    if isinstance(value, list) and not value:
        raise _BadValue("must list at least one hash")
    return _structure_list(_Hex16)(value, cl)


_converter.register_structure_hook(str, _structure_str)
_converter.register_structure_hook(bool, _structure_bool)
_converter.register_structure_hook(_Count, _structure_count)
_converter.register_structure_hook(_Label, _structure_label)
_converter.register_structure_hook(_Hex16, _structure_hex16)
_converter.register_structure_hook(_Did, _structure_did)
_converter.register_structure_hook(_HashList, _structure_hash_list)
_converter.register_structure_hook(_DidList, _structure_list(_Did))
_converter.register_structure_hook(_Hex64, _structure_hex64)
_converter.register_structure_hook(_Bank, _structure_bank)


def _structure_nonempty(item_type: Any, what: str) -> Callable[[object, type], list[str]]:
    inner = _structure_list(item_type)

    def structure(value: object, cl: type) -> list[str]:
        if isinstance(value, list) and not value:
            raise _BadValue(f"must list at least one {what}")
        return inner(value, cl)

    return structure


_converter.register_structure_hook(_PdqList, _structure_nonempty(_Hex64, "hash"))
_converter.register_structure_hook(_BankList, _structure_nonempty(_Bank, "bank"))
_renames: dict[str, Any] = {name: override(rename=key) for name, key in _RENAMES.items()}
_converter.register_structure_hook(
    _RawRule,
    make_dict_structure_fn(
        _RawRule,
        _converter,
        _cattrs_forbid_extra_keys=True,
        _cattrs_detailed_validation=True,
        **_renames,
    ),
)


def _describe(exc: BaseException, path: str) -> Iterator[str]:
    """Flatten a cattrs validation error into ``key: problem`` lines."""
    if isinstance(exc, ClassValidationError):
        with_notes, others = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _describe(sub, _join(path, _attr_key(note)))
        for sub in others:
            yield from _describe(sub, path)
    elif isinstance(exc, IterableValidationError):
        items, others = exc.group_exceptions()
        for sub, inote in items:
            yield from _describe(sub, f"{path}[{inote.index}]")
        for sub in others:
            yield from _describe(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            close = difflib.get_close_matches(key, _JSON_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            yield f"{_join(path, repr(key))}: unknown key{hint}"
    elif isinstance(exc, KeyError):  # cattrs notes the attribute, so path names the key
        yield f"{path or exc.args[0]}: missing (required)"
    elif isinstance(exc, _BadValue):
        yield f"{path}: {exc}"
    else:  # a cattrs or attrs surprise: still one clear line, never a traceback
        yield f"{path}: {type(exc).__name__}: {exc}"


def _attr_key(note: AttributeValidationNote) -> str:
    return _RENAMES.get(note.name, note.name)


def _join(path: str, key: str) -> str:
    return f"{path}: {key}" if path else key


class _Object(dict[str, Any]):
    """A JSON object that remembers keys it saw more than once (json keeps only the last)."""

    duplicate_keys: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated: list[str] = []
        for key, _value in pairs:
            if key in seen and key not in repeated:
                repeated.append(key)
            seen.add(key)
        obj.duplicate_keys = tuple(repeated)
    return obj


def _rule_name(index: int, item: object) -> str:
    label = item.get("label") if isinstance(item, dict) else None
    if isinstance(label, str) and label.strip():
        return f"rule {index} ({_short(label)})"
    return f"rule {index}"


def _to_rule(raw: _RawRule) -> Rule:
    return Rule(
        label=raw.label,
        phashes=tuple(parse_phash(h) for h in raw.phashes or ()),
        phashes_hex=tuple(raw.phashes or ()),
        comment=raw.comment,
        report_acct=raw.report_acct,
        label_acct=raw.label_acct,
        report_post=raw.report_post,
        to_label=raw.to_label,
        takedown_post=raw.takedown_post,
        takedown_acct=raw.takedown_acct,
        hamming_threshold=raw.hamming_threshold,
        description=raw.description,
        ignore_did=frozenset(raw.ignore_did or ()),
        max_actions_per_day=raw.max_actions_per_day,
        pdq_hashes=tuple(raw.pdq_hashes or ()),
        pdq_threshold=raw.pdq_threshold,
        banks=tuple(dict.fromkeys(raw.banks or ())),
    )


def parse_rules(data: object) -> RuleSet:
    """Validate an already-decoded rule file; raise :class:`RuleFileError` with every error."""
    if not isinstance(data, list):
        raise RuleFileError([f"expected a JSON array of rules, got {_json_type(data)}"])
    errors: list[str] = []
    rules: list[Rule] = []
    for index, item in enumerate(data):
        name = _rule_name(index, item)
        if not isinstance(item, dict):
            errors.append(f"{name}: expected a JSON object, got {_json_type(item)}")
            continue
        for key in getattr(item, "duplicate_keys", ()):
            errors.append(f"{name}: {key!r}: key given more than once")
        hashless = not any(key in item for key in ("phashes", "pdqHashes", "banks"))
        if hashless:
            errors.append(f"{name}: phashes: missing (required unless pdqHashes or banks is given)")
        try:
            raw = _converter.structure(item, _RawRule)
        except Exception as exc:  # every structuring failure is reported, not raised
            errors.extend(f"{name}: {line}" for line in _describe(exc, ""))
            continue
        if not hashless:
            rules.append(_to_rule(raw))
    if errors:
        raise RuleFileError(errors)
    return RuleSet(tuple(rules), tuple(_warnings(rules)))


def load_rules(path: Path) -> RuleSet:
    """Read and validate a rule file; raise :class:`RuleFileError` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleFileError([f"{path}: file not found"], path) from None
    except UnicodeDecodeError as exc:
        raise RuleFileError([f"{path}: not UTF-8 text (byte {exc.start})"], path) from None
    except OSError as exc:
        raise RuleFileError([f"{path}: cannot read: {exc.strerror or exc}"], path) from None
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as exc:
        raise RuleFileError(
            [f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}"], path
        ) from None
    except RecursionError:
        raise RuleFileError([f"{path}: invalid JSON: nested too deeply"], path) from None
    try:
        return parse_rules(data)
    except RuleFileError as exc:
        raise RuleFileError(exc.errors, path) from None


def _warnings(rules: list[Rule]) -> Iterator[str]:
    """Things that load but probably do not do what the author meant."""
    if not rules:
        yield "the file has no rules: nothing will ever match"
    first_seen: dict[int, tuple[int, int]] = {}
    for index, rule in enumerate(rules):
        name = f"rule {index} ({_short(rule.label)})"
        if not _LABEL_VALUE_RE.fullmatch(rule.label):
            yield (
                f"{name}: label: {_short(rule.label)} is not an atproto label value (lowercase"
                " letters and '-', at most 128): Ozone may refuse or mangle it"
            )
        if not rule.actions:
            yield f"{name}: no action flag is set: matches are only logged"
        if rule.pdq_threshold is not None and rule.pdq_threshold > HIGH_PDQ_THRESHOLD:
            yield (
                f"{name}: pdqThreshold: {rule.pdq_threshold} lets more than"
                f" {HIGH_PDQ_THRESHOLD} of 256 bits differ: it will match unrelated images"
            )
        if rule.hamming_threshold is not None and rule.hamming_threshold > HIGH_THRESHOLD:
            yield (
                f"{name}: hammingThreshold: {rule.hamming_threshold} lets more than"
                f" {HIGH_THRESHOLD} of 64 bits differ: it will match unrelated images"
            )
        for pos, (value, text) in enumerate(zip(rule.phashes, rule.phashes_hex, strict=True)):
            where = f"{name}: phashes[{pos}] {text}"
            bits = value.bit_count()
            if bits == 0:
                yield f"{where}: all bits clear: a mean hash never looks like this (placeholder?)"
            elif bits == 64:
                yield f"{where}: all bits set: this is the hash of every flat (one-colour) image"
            elif bits <= FEW_BITS or bits >= 64 - FEW_BITS:
                yield (
                    f"{where}: only {min(bits, 64 - bits)} bits differ from a flat image's hash:"
                    " it matches near-flat images (blank, dark or washed-out pictures)"
                )
            if value in first_seen:
                other_rule, other_pos = first_seen[value]
                if other_rule == index:
                    yield f"{where}: duplicate of phashes[{other_pos}]"
                else:
                    yield (
                        f"{where}: also in rule {other_rule} (phashes[{other_pos}]), which comes"
                        " first and wins for authors it does not ignore"
                    )
            else:
                first_seen[value] = (index, pos)
