"""Fuzzing: mutated real JPEG/PNG/GIF/WebP files end as a hash or a typed error, within budget.

A seeded sample runs here (~10 s); ``just fuzz`` runs 20,000 cases (see the README).
"""

from __future__ import annotations

from phash_trio.testing import fuzz


def test_cases_are_deterministic_and_varied() -> None:
    """A case is a function of (seed, index); different indices give different bytes."""
    assert fuzz.make_case(7, 3) == fuzz.make_case(7, 3)
    cases = {fuzz.make_case(7, i) for i in range(50)}
    assert len(cases) == 50
    kinds = {case[:3] for case in cases}
    assert {b"\xff\xd8\xff", b"\x89PN", b"GIF", b"RIF"} & kinds == {
        b"\xff\xd8\xff",
        b"\x89PN",
        b"GIF",
        b"RIF",
    }


def test_seeded_sample_has_no_findings() -> None:
    """300 mutated files in a 1 GB child: no crash, hang, foreign exception, slow case or
    memory blow-up; both hashes and typed errors occur."""
    report = fuzz.run_fuzz(seed=20261202, cases=300, batch=150)
    assert report.findings == []
    assert report.counts.get("hashed", 0) > 20
    assert report.counts.get("CorruptImage", 0) > 100
    assert sum(report.counts.values()) == 300
    assert report.peak_rss_bytes < 1 << 30


def test_seeded_sample_through_the_pdq_path_has_no_findings() -> None:
    """The PDQ path (compute_signals: gray + PDQ in one pass of the compiled core) on 150 other
    mutated files: the same guarantees."""
    report = fuzz.run_fuzz(seed=77, cases=150, batch=150, target=fuzz.signals_case)
    assert report.findings == []
    assert report.counts.get("hashed", 0) > 10 and sum(report.counts.values()) == 150


def test_a_crash_names_its_case() -> None:
    """The harness itself: a child that segfaults mid-batch becomes a finding for the case it
    was on, and the run goes on after it (a target that crashes on GIF input)."""
    gifs = [i for i in range(40) if fuzz.make_case(5, i).startswith(b"GIF")]
    assert gifs
    report = fuzz.run_fuzz(seed=5, cases=40, batch=40, target=fuzz.segfault_on_gif)
    assert [f.index for f in report.findings] == gifs
    assert all("signalled by signal 11" in f.problem for f in report.findings)
    assert sum(report.counts.values()) == 40
