"""shopmtl.abtest.report: report.html is one self-contained file (nothing fetched) and renders
in a real headless Chromium (the system's, driven by playwright) with no console error and
every plot visible; a screenshot is kept as a test artifact ($SHOPMTL_TEST_ARTIFACTS, else the
test's tmp_path). results.json reads back as the analysis."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from shopmtl.abtest.analyze import analyze
from shopmtl.abtest.events import read_events
from shopmtl.abtest.report import write_report
from shopmtl.jsonsafe import json_safe
from tests.abtest import eventgen

CHROMIUM = "/usr/bin/chromium"  # the system package (.ci/run installs it); never downloaded
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

TRUTH = {"treatment": {"ctr": {"all": {"control": 0.0625, "value": 0.0875, "abs_lift": 0.025,
                                       "rel_lift": 0.4}}}}
OPE = {"treatment": {"ctr": {"ips": {"estimate": 0.086, "ci": [0.080, 0.093]},
                             "snips": {"estimate": 0.087, "ci": [0.082, 0.092]},
                             "dr": {"estimate": 0.0872, "ci": [0.084, 0.090]},
                             "online": 0.0875}}}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    work = tmp_path_factory.mktemp("report")
    events = eventgen.write(work / "events.db", eventgen.Spec(users=800, ctr_lift=0.4,
                                                              latency_shift=2.0, seed=7))
    results = analyze(read_events(events), n_boot=100)
    page, doc = write_report(results, work / "out", truth=TRUTH, ope=OPE)
    return page, doc, results


def test_report_is_self_contained_and_results_read_back(report):
    page, doc, results = report
    text = page.read_text()
    # nothing to fetch: no script, stylesheet link, image source or URL but the SVG namespace
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(", text, re.I)
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) == {"http://www.w3.org/2000/svg"}
    assert text.count("<svg") == 1 + 5 + 1  # lift, one sequential plot per metric, OPE
    assert "blocked" not in text and "better" in text and "+40.00%" in text  # the truth column
    back = json.loads(doc.read_text())
    assert back["truth"] == TRUTH and back["ope"] == OPE
    assert {k: back[k] for k in results} == json_safe(results)


def test_report_escapes_names(tmp_path: Path, report):
    _, _, results = report
    evil = {**results, "experiment": "<script>alert(1)</script>"}
    page, _ = write_report(evil, tmp_path)
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_report_renders_in_headless_chromium(report, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    page_path, _, _ = report
    artifacts = Path(os.environ.get("SHOPMTL_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "abtest_report.png"
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 900})
        try:
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            plots = page.locator("figure.plot svg")
            assert plots.count() == 7
            for i in range(plots.count()):
                box = plots.nth(i).bounding_box()
                assert box is not None and box["width"] > 100 and box["height"] > 100, i
                # each plot drew its marks, not just an empty frame
                assert plots.nth(i).locator("circle, polyline").count() > 0, i
            assert page.locator("h2").filter(has_text="Sample-ratio mismatch").count() == 1
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    assert errors == []
    assert requests == [page_path.resolve().as_uri()]  # the page fetched nothing else
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    print(f"screenshot: {shot}")
