"""The report in a real browser: headless Chromium runs the page's JavaScript, then its DOM is read back.

`make test` installs Debian's chromium when it is missing; only a machine without apt skips this, saying why.
The screenshot is kept as a test artifact in build/test-artifacts/.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from raylign.report import write_report
from tests.unit.report_fixture import write_run

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build/test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=(
    "no chromium on PATH: run `make test`, which installs it with apt" if shutil.which("apt-get")
    else "no chromium and no apt-get to install it: the browser test cannot run on this machine"))


def _chromium(*args: str, cwd: Path) -> str:
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--allow-file-access-from-files", f"--user-data-dir={cwd / 'profile'}",
                           "--virtual-time-budget=8000", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    # 3 steps x 20 prompts x 2 samples = 120 rollouts: three pages of 50
    return write_report([write_run(tmp_path_factory.mktemp("browser") / "run", steps=3, prompts=20, group=2,
                                   kind="rag")])


def _rows(dom: str) -> list[tuple[str, str, str]]:
    return re.findall(r'<tr class="rollout" data-step="(\d+)" data-correct="(\w+)" data-id="(\w+)">', dom)


def test_plots_and_the_rollout_table_render(report):
    dom = _chromium("--dump-dom", report.as_uri(), cwd=report.parent)
    assert 'data-rendered="1"' in dom
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images == len(re.findall(r"<img ", dom)) >= 6  # every plot decoded
    rows = _rows(dom)
    assert len(rows) == 50 and rows[0] == ("1", "false", "p0")
    assert 'data-matches="120"' in dom and "120 of 120 rollouts match; page 1 of 3" in dom
    marked = re.findall(r'<mark class="tool" title="tool output: loss mask 0, not trained on">(.*?)</mark>', dom, re.S)
    assert len(marked) == 50 and set(marked) == {"\n&lt;results&gt;[d1] Paris is the capital.&lt;/results&gt;\n"}


def test_filters_from_the_url_hash(report):
    # links in the older form (#step=2&correct=false, no "rollouts?" prefix) still open the filtered table
    # step 2, incorrect only: p0 is right from step 2 on, p1 wrong (2 rows); p2..p19 one sample of two (18 rows)
    dom = _chromium("--dump-dom", report.as_uri() + "#step=2&correct=false", cwd=report.parent)
    rows = _rows(dom)
    assert {(s, c) for s, c, _ in rows} == {("2", "false")} and len(rows) == 20 and 'data-matches="20"' in dom
    assert "p0" not in {i for _, _, i in rows} and [i for _, _, i in rows][:2] == ["p1", "p1"]
    dom = _chromium("--dump-dom", report.as_uri() + "#prompt=p13", cwd=report.parent)
    assert [(s, i) for s, _, i in _rows(dom)] == [(s, "p13") for s in "112233"]
    dom = _chromium("--dump-dom", report.as_uri() + "#prompt=p1", cwd=report.parent)  # p1, p10..p19: 11 x 6
    assert 'data-matches="66"' in dom and {i for _, _, i in _rows(dom)} <= {"p1", *(f"p1{k}" for k in range(10))}
    dom = _chromium("--dump-dom", report.as_uri() + "#rollouts?page=3", cwd=report.parent)
    assert len(_rows(dom)) == 20 and "page 3 of 3" in dom
    dom = _chromium("--dump-dom", report.as_uri() + "#rollouts?step=3&correct=true", cwd=report.parent)
    assert {(s, c) for s, c, _ in _rows(dom)} == {("3", "true")} and 'data-matches="20"' in dom


# Clicks in the page itself: set the step and correctness filters through their <select>s, then click the nav's
# link to the accuracy section; record what the table shows before and after, the hash, and where the section is.
CLICKS = """<script>
const pick = (id, value) => { const s = document.getElementById(id); s.value = value; s.dispatchEvent(new Event('change')); };
const seen = (key) => { document.body.dataset[key] = document.getElementById('rollout-count').dataset.matches; };
setTimeout(() => pick('f-step', '2'), 100);
setTimeout(() => pick('f-correct', 'false'), 200);
setTimeout(() => { seen('before'); document.querySelector('nav a[href="#accuracy"]').click(); }, 300);
setTimeout(() => {
  seen('after');
  document.body.dataset.hash = location.hash;
  document.body.dataset.top = Math.round(document.getElementById('accuracy').getBoundingClientRect().top);
  location.hash = 'timing';  // a section hash typed or opened directly leaves the filter alone too
}, 500);
setTimeout(() => seen('typed'), 700);
</script>"""


def _with_script(report: Path, name: str, script: str) -> str:
    """The DOM of a copy of the page (beside it, so its PNGs load) that runs ``script`` after its own."""
    copy = report.parent / name
    copy.write_text(report.read_text().replace("</body>", script + "</body>"))
    return _chromium("--dump-dom", copy.as_uri(), cwd=report.parent)


def test_a_section_link_keeps_the_rollout_filter(report):
    dom = _with_script(report, "clicked.html", CLICKS)
    attrs = dict(re.findall(r'data-(before|after|typed|hash|top)="([^"]*)"', dom))
    # step 2, incorrect only: 20 rows (as in test_filters_from_the_url_hash), before and after the click
    assert (attrs["before"], attrs["after"], attrs["typed"]) == ("20", "20", "20")
    assert attrs["hash"] == "#rollouts?step=2&amp;correct=false"  # the link scrolled; the URL kept the filter
    assert abs(int(attrs["top"])) <= 1  # the accuracy section is at the top of the window
    rows = _rows(dom)
    assert len(rows) == 20 and {(s, c) for s, c, _ in rows} == {("2", "false")}
    assert 'data-matches="20"' in dom and "20 of 120 rollouts match; page 1 of 1" in dom


def test_paging_keeps_the_filter(report):
    # correct=false: 60 rows, two pages; next, next (clamped at the last page), prev
    dom = _with_script(report, "paged.html", """<script>
const hashes = [];
const press = (id) => { document.getElementById(id).click(); hashes.push(location.hash); };
setTimeout(() => press('next'), 100);
setTimeout(() => press('next'), 200);
setTimeout(() => { document.body.dataset.page = document.getElementById('rollout-count').textContent; }, 300);
setTimeout(() => { press('prev'); document.body.dataset.hashes = hashes.join(' '); }, 400);
</script>""".replace("<script>", "<script>location.hash = 'rollouts?correct=false';", 1))
    assert re.search(r'data-page="60 of 120 rollouts match; page 2 of 2"', dom)
    assert re.search(r'data-hashes="([^"]*)"', dom).group(1) == (
        "#rollouts?correct=false&amp;page=2 #rollouts?correct=false&amp;page=2 #rollouts?correct=false")
    assert "60 of 120 rollouts match; page 1 of 2" in dom and len(_rows(dom)) == 50


def test_screenshot_is_saved(report):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-browser.png"
    shot.unlink(missing_ok=True)
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri(), cwd=report.parent)
    assert shot.stat().st_size > 20_000  # a page with plots, not a blank one
