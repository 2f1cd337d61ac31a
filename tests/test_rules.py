"""Rule file loading, validation errors, warnings, and `rules check`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from phash_trio.rules.check import rules_check
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.model import (
    Rule,
    RuleFileError,
    RuleSet,
    format_phash,
    load_rules,
    parse_phash,
    parse_rules,
)

REPO = Path(__file__).resolve().parents[1]
H1 = "fefefee3221f0b0a"
H2 = "fcfcfdd9810181c3"
DID_A = "did:plc:ignoreauthorexample23456"
DID_B = "did:web:example.com"

SKYWATCH_FILE = """\
[
  {
    "phashes": ["fefefee3221f0b0a", "FCFCFDD9810181C3"],
    "label": "troll",
    "comment": "Known troll image",
    "reportAcct": true,
    "labelAcct": true,
    "reportPost": false,
    "toLabel": true,
    "takedownPost": false,
    "takedownAcct": false,
    "hammingThreshold": 2,
    "description": "Troll image campaign",
    "ignoreDID": ["did:plc:ignoreauthorexample23456", "did:web:example.com"]
  },
  {
    "phashes": ["410171d290c5cee7"],
    "label": "nsfw-test",
    "comment": "",
    "reportAcct": false,
    "labelAcct": false,
    "reportPost": true,
    "toLabel": false,
    "takedownPost": true,
    "takedownAcct": true
  }
]
"""


def rule(**fields: object) -> dict[str, object]:
    """A valid rule object with ``fields`` changed (a value of ... removes the key)."""
    data: dict[str, object] = {"phashes": [H1], "label": "spam-image", "toLabel": True}
    data.update(fields)
    return {key: value for key, value in data.items() if value is not ...}


def errors_of(data: object) -> list[str]:
    with pytest.raises(RuleFileError) as info:
        parse_rules(data)
    return info.value.errors


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "blobs.json"
    path.write_text(text, encoding="utf-8")
    return path


# --- accepted files -----------------------------------------------------------------------------


def test_skywatch_file_loads_unchanged(tmp_path: Path) -> None:
    """A skywatch-phash-rs rule file with every field loads with every value kept."""
    ruleset = load_rules(write(tmp_path, SKYWATCH_FILE))
    first, second = ruleset.rules
    assert first == Rule(
        label="troll",
        phashes=(0xFEFEFEE3221F0B0A, 0xFCFCFDD9810181C3),
        phashes_hex=("fefefee3221f0b0a", "FCFCFDD9810181C3"),
        comment="Known troll image",
        report_acct=True,
        label_acct=True,
        report_post=False,
        to_label=True,
        takedown_post=False,
        takedown_acct=False,
        hamming_threshold=2,
        description="Troll image campaign",
        ignore_did=frozenset({DID_A, DID_B}),
        max_actions_per_day=None,
    )
    assert second.actions == ("reportPost", "takedownPost", "takedownAcct")
    assert (second.hamming_threshold, second.description, second.ignore_did) == (
        None,
        None,
        frozenset(),
    )
    assert ruleset.warnings == ()
    assert ruleset.hash_count == 3


def test_optional_keys_default() -> None:
    """Only phashes and label are required; flags default to false, thresholds to None."""
    (only,) = parse_rules([{"phashes": [H1], "label": "x-y"}]).rules
    assert only.comment == ""
    assert only.actions == ()
    assert only.hamming_threshold is None and only.threshold(3) == 3
    assert only.ignore_did == frozenset() and only.max_actions_per_day is None
    assert only.description is None


def test_null_ignore_did_is_empty() -> None:
    """``ignoreDID: null`` (an Option in the Rust struct) means nobody is ignored."""
    (only,) = parse_rules([rule(ignoreDID=None)]).rules
    assert only.ignore_did == frozenset()


def test_max_actions_per_day_and_threshold_read() -> None:
    """Our maxActionsPerDay and a per-rule hammingThreshold (0 included) are read as ints."""
    (only,) = parse_rules([rule(maxActionsPerDay=0, hammingThreshold=0)]).rules
    assert only.max_actions_per_day == 0
    assert only.threshold(3) == 0


def test_hex_round_trip() -> None:
    """parse_phash reads the bytes big-endian and format_phash prints them back in lowercase."""
    assert parse_phash("0102030405060708") == 0x0102030405060708
    assert format_phash(parse_phash("FEFEFEE3221F0B0A")) == "fefefee3221f0b0a"
    assert format_phash(1) == "0000000000000001"
    for bad in ("01 02 03 04 05 06 07", "fefefee3221f0b0a\n", "0x01020304050607", ""):
        with pytest.raises(ValueError):
            parse_phash(bad)


def test_rule_built_in_code_gets_hex() -> None:
    """A Rule made in code fills phashes_hex itself and still refuses impossible hashes."""
    made = Rule(label="x", phashes=(1, 0xFF))
    assert made.phashes_hex == ("0000000000000001", "00000000000000ff")
    with pytest.raises(ValueError, match="at least one hash"):
        Rule(label="x", phashes=())
    with pytest.raises(ValueError, match="64-bit"):
        Rule(label="x", phashes=(1 << 64,))


# --- one error kind per test ----------------------------------------------------------------------


def test_error_bad_hex() -> None:
    """A hash with a non-hex digit names the rule, the list position and the value."""
    assert errors_of([rule(phashes=[H1, "fefefee3221f0b0g"])]) == [
        "rule 0 ('spam-image'): phashes[1]: 'fefefee3221f0b0g' is not hexadecimal"
        " (expected 16 digits 0-9a-f)"
    ]


def test_error_wrong_length() -> None:
    """A hash that is not exactly 16 digits says how long it is."""
    assert errors_of([rule(phashes=["fefefee3221f0b0"])]) == [
        "rule 0 ('spam-image'): phashes[0]: 'fefefee3221f0b0' has 15 characters,"
        " expected 16 hex digits"
    ]


def test_error_hash_not_a_string() -> None:
    """A hash written as a JSON number is refused (its digits would be misread)."""
    assert errors_of([rule(phashes=[1234])]) == [
        "rule 0 ('spam-image'): phashes[0]: expected 16 hex digits, got number 1234"
    ]


def test_error_unknown_key() -> None:
    """A misspelt key is an error (not silently ignored) and the likely key is suggested."""
    assert errors_of([rule(hamingThreshold=2)]) == [
        "rule 0 ('spam-image'): 'hamingThreshold': unknown key (did you mean 'hammingThreshold'?)"
    ]


def test_error_empty_label() -> None:
    """A blank label is refused: Ozone would get an empty label value."""
    assert errors_of([rule(label="  ")]) == ["rule 0: label: must not be empty"]


def test_error_missing_label() -> None:
    """A rule without a label names the missing key."""
    assert errors_of([rule(label=...)]) == ["rule 0: label: missing (required)"]


def test_error_label_wrong_type() -> None:
    """A label that is not a string is refused."""
    assert errors_of([rule(label=["spam"])]) == [
        "rule 0: label: expected a non-empty string, got an array"
    ]


def test_error_missing_phashes() -> None:
    """A rule without phashes (nor pdqHashes, nor banks) names the missing key."""
    assert errors_of([rule(phashes=...)]) == [
        "rule 0 ('spam-image'): phashes: missing (required unless pdqHashes or banks is given)"
    ]


def test_error_empty_phashes() -> None:
    """A rule with an empty hash list could never match, so it is an error."""
    assert errors_of([rule(phashes=[])]) == [
        "rule 0 ('spam-image'): phashes: must list at least one hash"
    ]


def test_error_phashes_not_a_list() -> None:
    """A single hash string instead of a list is refused, not split into characters."""
    assert errors_of([rule(phashes=H1)]) == [
        f"rule 0 ('spam-image'): phashes: expected an array, got string '{H1}'"
    ]


def test_error_negative_threshold() -> None:
    """A negative hammingThreshold is refused with its value."""
    assert errors_of([rule(hammingThreshold=-1)]) == [
        "rule 0 ('spam-image'): hammingThreshold: must be >= 0, got -1"
    ]


def test_error_threshold_not_whole_number() -> None:
    """Fractions, strings and booleans are not thresholds."""
    assert errors_of(
        [rule(hammingThreshold=2.5), rule(hammingThreshold="3"), rule(maxActionsPerDay=True)]
    ) == [
        "rule 0 ('spam-image'): hammingThreshold: expected a whole number >= 0, got number 2.5",
        "rule 1 ('spam-image'): hammingThreshold: expected a whole number >= 0, got string '3'",
        "rule 2 ('spam-image'): maxActionsPerDay: expected a whole number >= 0, got true",
    ]


def test_error_string_for_bool() -> None:
    """An action flag written as a string is refused ("false" would otherwise be truthy)."""
    assert errors_of([rule(takedownAcct="false")]) == [
        "rule 0 ('spam-image'): takedownAcct: expected true or false, got string 'false'"
    ]


def test_error_number_for_bool() -> None:
    """An action flag written as 1 is refused."""
    assert errors_of([rule(reportPost=1)]) == [
        "rule 0 ('spam-image'): reportPost: expected true or false, got number 1"
    ]


def test_error_null_for_string() -> None:
    """comment and description must be strings when present."""
    assert errors_of([rule(comment=None, description=5)]) == [
        "rule 0 ('spam-image'): comment: expected a string, got null",
        "rule 0 ('spam-image'): description: expected a string, got number 5",
    ]


def test_error_invalid_did() -> None:
    """Each malformed ignoreDID entry is named by its position."""
    assert errors_of([rule(ignoreDID=[DID_A, "did:plc:short", "alice.bsky.social"])]) == [
        "rule 0 ('spam-image'): ignoreDID[1]: 'did:plc:short' is not a valid did:plc or did:web",
        "rule 0 ('spam-image'): ignoreDID[2]: 'alice.bsky.social' is not a valid did:plc"
        " or did:web",
    ]


def test_error_ignore_did_not_a_list() -> None:
    """A single DID string instead of a list is refused."""
    assert errors_of([rule(ignoreDID=DID_A)]) == [
        f"rule 0 ('spam-image'): ignoreDID: expected an array, got string '{DID_A}'"
    ]


def test_error_not_a_json_array(tmp_path: Path) -> None:
    """A file holding one object instead of an array of rules is refused."""
    path = write(tmp_path, json.dumps(rule()))
    with pytest.raises(RuleFileError) as info:
        load_rules(path)
    assert info.value.errors == ["expected a JSON array of rules, got an object"]
    assert info.value.path == path


def test_error_rule_not_an_object() -> None:
    """An array element that is not an object is named by its index."""
    assert errors_of([rule(), "fefefee3221f0b0a"]) == [
        "rule 1: expected a JSON object, got string 'fefefee3221f0b0a'"
    ]


def test_error_json_syntax_with_line_and_column(tmp_path: Path) -> None:
    """A JSON syntax error points at its line and column."""
    path = write(tmp_path, '[\n  {"label": "a",\n   "phashes": ["fefefee3221f0b0a"],}\n]\n')
    with pytest.raises(RuleFileError) as info:
        load_rules(path)
    assert info.value.errors == [
        f"{path}: line 3, column 36: invalid JSON: Expecting property name enclosed in double"
        " quotes"
    ]


def test_error_file_not_found(tmp_path: Path) -> None:
    """A missing file is one clear error, not a traceback."""
    path = tmp_path / "nope.json"
    with pytest.raises(RuleFileError) as info:
        load_rules(path)
    assert info.value.errors == [f"{path}: file not found"]


def test_error_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is refused with the offending byte offset."""
    path = tmp_path / "blobs.json"
    path.write_bytes(b'[{"label": "caf\xe9"}]')
    with pytest.raises(RuleFileError) as info:
        load_rules(path)
    assert info.value.errors == [f"{path}: not UTF-8 text (byte 15)"]


def test_error_duplicate_key(tmp_path: Path) -> None:
    """A key given twice in one rule is an error: JSON parsers would silently keep only one."""
    text = '[{"label": "a", "phashes": ["fefefee3221f0b0a"], "phashes": ["410171d290c5cee7"]}]'
    with pytest.raises(RuleFileError) as info:
        load_rules(write(tmp_path, text))
    assert info.value.errors == ["rule 0 ('a'): 'phashes': key given more than once"]


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    """Every problem of every rule is reported together, in file order, with the file name."""
    data = [
        rule(phashes=["xyz", H2], label="", toLabel="yes"),
        rule(),
        rule(hammingThreshold=-2, ignoreDID=["nope"], colour="red"),
        7,
        rule(phashes=..., label=...),
    ]
    path = write(tmp_path, json.dumps(data))
    with pytest.raises(RuleFileError) as info:
        load_rules(path)
    assert info.value.errors == [
        "rule 0: phashes[0]: 'xyz' has 3 characters, expected 16 hex digits",
        "rule 0: label: must not be empty",
        "rule 0: toLabel: expected true or false, got string 'yes'",
        "rule 2 ('spam-image'): hammingThreshold: must be >= 0, got -2",
        "rule 2 ('spam-image'): ignoreDID[0]: 'nope' is not a valid did:plc or did:web",
        "rule 2 ('spam-image'): 'colour': unknown key",
        "rule 3: expected a JSON object, got number 7",
        "rule 4: phashes: missing (required unless pdqHashes or banks is given)",
        "rule 4: label: missing (required)",
    ]
    message = str(info.value)
    assert message.startswith(f"{path}: 9 errors in rule file:\n")
    assert message.endswith("rule 4: label: missing (required)")


# --- warnings -----------------------------------------------------------------------------------


def warnings_of(*rules: dict[str, object]) -> list[str]:
    return list(parse_rules(list(rules)).warnings)


def test_no_warning_for_an_ordinary_rule() -> None:
    """A rule with a normal hash, a valid label and an action loads without warnings."""
    assert warnings_of(rule(phashes=[H1, H2], hammingThreshold=5)) == []


def test_warning_all_zero_hash() -> None:
    """An all-zero hash (never produced by a mean hash) is flagged as a likely placeholder."""
    assert warnings_of(rule(phashes=["0000000000000000"])) == [
        "rule 0 ('spam-image'): phashes[0] 0000000000000000: all bits clear: a mean hash never"
        " looks like this (placeholder?)"
    ]


def test_warning_all_ones_hash() -> None:
    """The all-ones hash of every flat image is flagged."""
    assert warnings_of(rule(phashes=["ffffffffffffffff"])) == [
        "rule 0 ('spam-image'): phashes[0] ffffffffffffffff: all bits set: this is the hash of"
        " every flat (one-colour) image"
    ]


def test_warning_few_or_many_bits() -> None:
    """Hashes within 4 bits of all-zero or all-ones are flagged; 5 bits away are not."""
    got = warnings_of(
        rule(
            phashes=["0000000000000f00", "fffffff0ffffffff", "000000000000001f", "ffffffe0ffffffff"]
        )
    )
    assert got == [
        "rule 0 ('spam-image'): phashes[0] 0000000000000f00: only 4 bits differ from a flat"
        " image's hash: it matches near-flat images (blank, dark or washed-out pictures)",
        "rule 0 ('spam-image'): phashes[1] fffffff0ffffffff: only 4 bits differ from a flat"
        " image's hash: it matches near-flat images (blank, dark or washed-out pictures)",
    ]


def test_warning_duplicate_hashes() -> None:
    """A hash repeated in one rule, or listed again by a later rule, is flagged."""
    got = warnings_of(rule(phashes=[H1, H2, H1.upper()]), rule(label="other", phashes=[H2]))
    assert got == [
        f"rule 0 ('spam-image'): phashes[2] {H1.upper()}: duplicate of phashes[0]",
        f"rule 1 ('other'): phashes[0] {H2}: also in rule 0 (phashes[1]), which comes first"
        " and wins for authors it does not ignore",
    ]


def test_warning_rule_without_action() -> None:
    """A rule with no action flag set only logs its matches, which is worth a warning."""
    assert warnings_of(rule(toLabel=False)) == [
        "rule 0 ('spam-image'): no action flag is set: matches are only logged"
    ]


def test_warning_label_value_and_high_threshold() -> None:
    """A label Ozone may refuse and a threshold above 16 bits are flagged."""
    assert warnings_of(rule(label="Spam Image", hammingThreshold=17)) == [
        "rule 0 ('Spam Image'): label: 'Spam Image' is not an atproto label value (lowercase"
        " letters and '-', at most 128): Ozone may refuse or mangle it",
        "rule 0 ('Spam Image'): hammingThreshold: 17 lets more than 16 of 64 bits differ: it"
        " will match unrelated images",
    ]


def test_warning_empty_file() -> None:
    """An empty array loads (nothing to do) but is flagged."""
    assert parse_rules([]) == RuleSet((), ("the file has no rules: nothing will ever match",))


# --- the example file in the repo ---------------------------------------------------------------


_EXAMPLE_SUBJECTS = {
    "example-astronaut": {"astronaut.png", "astronaut"},
    "example-coffee": {"coffee.png", "coffee"},
    "example-chelsea": {"chelsea.png", "chelsea"},
    "example-spitfire": {"spitfire"},
}


def _example_rule_hits(golden_dir: Path) -> dict[str, set[str]]:
    """Label -> the subjects (file name up to its first ``_``) of the golden files it matches."""
    ruleset = load_rules(REPO / "rules" / "blobs.json")
    assert ruleset.warnings == ()
    index = RuleIndex(ruleset, default_threshold=3)
    other = "did:plc:someoneelseabcdefghijklm"
    hits: dict[str, set[str]] = {}
    for line in (golden_dir / "mean8.tsv").read_text().splitlines():
        name, hex16 = line.split("\t")
        found = index.match(parse_phash(hex16), other)
        if found is not None:
            hits.setdefault(found.rule.label, set()).add(name.rsplit("/", 1)[-1].split("_")[0])
    return hits


def test_example_rules_match_their_golden_images(full_golden_dir: Path) -> None:
    """rules/blobs.json loads cleanly and each demo rule matches only its own golden subject."""
    assert _example_rule_hits(full_golden_dir) == _EXAMPLE_SUBJECTS
    chelsea = parse_phash("410171d290c5cee7")
    index = RuleIndex(load_rules(REPO / "rules" / "blobs.json"), default_threshold=3)
    assert index.match(chelsea, "did:plc:ignoreauthorexample23456") is None


def test_example_rules_match_their_subset_images(golden_dir: Path) -> None:
    """On the in-repository subset every demo rule fires, and only on its own subject."""
    hits = _example_rule_hits(golden_dir)
    assert set(hits) == set(_EXAMPLE_SUBJECTS)
    for label, subjects in hits.items():
        assert subjects <= _EXAMPLE_SUBJECTS[label], label


# --- rules check --------------------------------------------------------------------------------


def test_rules_check_summary(tmp_path: Path) -> None:
    """A valid file prints rules, thresholds, actions, ignored DIDs and warnings, and returns 0."""
    data = [*json.loads(SKYWATCH_FILE), rule(phashes=["ffffffffffffffff"], maxActionsPerDay=50)]
    path = write(tmp_path, json.dumps(data))
    out = io.StringIO()
    assert rules_check(path, default_threshold=4, out=out) == 0
    assert out.getvalue().splitlines() == [
        f"{path}: OK, 3 rules, 4 hashes (PHASH_HAMMING_THRESHOLD 4)",
        "  rule 0 'troll': 2 hashes, threshold 2, actions: toLabel, labelAcct, reportAcct,"
        " ignores 2 DIDs",
        "      Troll image campaign",
        "  rule 1 'nsfw-test': 1 hash, threshold 4 (default), actions: reportPost, takedownPost,"
        " takedownAcct",
        "  rule 2 'spam-image': 1 hash, threshold 4 (default), actions: toLabel, at most 50"
        " actions/day",
        "thresholds used: 2 (1 rule), 4 (2 rules)",
        "ignoreDID: 2 DIDs in total",
        "1 warning:",
        "  warning: rule 2 ('spam-image'): phashes[0] ffffffffffffffff: all bits set: this is the"
        " hash of every flat (one-colour) image",
    ]


def test_rules_check_errors(tmp_path: Path) -> None:
    """An invalid file prints a header and each error on its own line, and returns 1."""
    path = write(tmp_path, json.dumps([rule(label=""), rule(toLabel="no")]))
    out = io.StringIO()
    assert rules_check(path, out=out) == 1
    assert out.getvalue().splitlines() == [
        f"{path}: 2 errors, the service would refuse to start:",
        "rule 0: label: must not be empty",
        "rule 1 ('spam-image'): toLabel: expected true or false, got string 'no'",
    ]


def test_rules_check_missing_file(tmp_path: Path) -> None:
    """A missing file is reported in one line with exit code 1."""
    path = tmp_path / "missing.json"
    out = io.StringIO()
    assert rules_check(path, out=out) == 1
    assert out.getvalue().splitlines()[1:] == [f"{path}: file not found"]


def test_rules_check_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """Without ``out`` the report goes to standard output (what the CLI shows)."""
    assert rules_check(REPO / "rules" / "blobs.json") == 0
    assert "OK, 5 rules, 6 hashes" in capsys.readouterr().out
