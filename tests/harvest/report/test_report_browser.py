"""harvest report: the page opened in a real headless Chromium renders its charts (checked on
the screenshot's pixels) and shows the output's own counts (read from the browser's DOM)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from synthetic_output import failure, random_record, write_output

import harvest
from harvest.cli import main
from harvest.watch.status import EndpointStatus, JobStatus, write_status
from workers.storage import open_store

pytest.importorskip("matplotlib")
from PIL import Image

FLAGS = [
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
]
BLUE, RED, GREEN = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28), (0x2C, 0xA0, 0x2C)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed here when missing (CI runs as root)."""
    found = shutil.which("chromium")
    if found is None:
        cmd = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
            subprocess.run(cmd, capture_output=True, check=True)
        found = shutil.which("chromium")
    assert found, "chromium did not install"
    return found


def browse(chromium: str, page: Path, tmp: Path, *what: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", *what, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def build(out: Path) -> None:
    rng = np.random.default_rng(3)
    rows = [random_record(f"p{i}", rng) for i in range(60)]
    for i, r in enumerate(rows):
        r["finish_reason"] = "stop" if i % 3 == 0 else "length"
        r["endpoint"] = ["http://a:8000/v1", "http://b:8000/v1"][i % 2]
        r["latency_ms"] = float(10 + i)
    fails = [[failure("f1", "Timeout"), failure("f2", "InvalidInput")], [failure("f3", "Timeout")]]
    write_output(out, [rows[:30], rows[30:]], failures=fails)
    history = [{"t": 1000.0 + 5 * i, "prompts": 6 * i, "tokens": 40 * i + 3 * i * i,
                "p50": 0.1 + 0.01 * i, "p90": 0.3, "in_flight": 4,
                "ok": {"http://a:8000/v1": 3 * i, "http://b:8000/v1": 2 * i}}
               for i in range(12)]  # fmt: skip
    endpoints = {"http://a:8000/v1": EndpointStatus(requests={"200": 33}),
                 "http://b:8000/v1": EndpointStatus(requests={"200": 22, "503": 2})}  # fmt: skip
    write_status(out, JobStatus(job_id="j", state="done", prompts_total=63, prompts_done=63,
                                run_prompts=63, run_tokens=700, retries=2, endpoints=endpoints,
                                history=history))  # fmt: skip


def counts_in(dom: str) -> dict[str, str]:
    return dict(re.findall(r'id="n-([\w-]+)" data-n="([^"]*)"', dom))


def coloured(image: Image.Image, rgb: tuple[int, int, int], tol: int = 30) -> int:
    px = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(px - np.array(rgb)).max(axis=2) <= tol).sum())


def test_report_renders_charts_and_the_outputs_counts(chromium, tmp_path) -> None:
    out = tmp_path / "out"
    build(out)
    assert main(["report", str(out)]) == 0
    page = out / "report.html"
    html = page.read_text()
    # self-contained: nothing to fetch (xmlns names are not fetched)
    assert "<script" not in html and "<link" not in html
    assert not re.search(r'(src|href)="(https?:|//)', html)
    assert html.count('<div class="chart"') == 6

    dom = browse(chromium, page, tmp_path, "--dump-dom").stdout
    got = counts_in(dom)
    data = harvest.open_dataset(out).to_table()
    failed = harvest.open_dataset(out, "failed").to_table()
    prompts = set(data["prompt_id"].to_pylist()) | set(failed["prompt_id"].to_pylist())
    assert int(got["prompts"]) == len(prompts) == 63
    assert int(got["samples"]) == data.num_rows
    assert int(got["tokens"]) == pc.sum(data["completion_tokens"]).as_py()
    assert int(got["failed-prompts"]) == 3 and int(got["failed-Timeout"]) == 2
    finish = dict(Counter(data["finish_reason"].to_pylist()))
    assert {"stop": int(got["finish-stop"]), "length": int(got["finish-length"])} == finish
    assert int(got["run-tokens"]) == 700 and int(got["retries"]) == 2

    shot = tmp_path / "page.png"
    browse(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=1200,4200")
    image = Image.open(shot)
    # The charts' colours are on the page only where a chart drew them: the same page with
    # its charts taken out has (almost) none of them.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'<div class="chart".*?</svg>\s*</div>', "", html, flags=re.S))
    bare_shot = tmp_path / "bare.png"
    browse(chromium, bare, tmp_path, f"--screenshot={bare_shot}", "--window-size=1200,4200")
    bare_image = Image.open(bare_shot)
    for colour, least in ((BLUE, 20000), (RED, 300), (GREEN, 300)):
        assert coloured(image, colour) >= least, colour
        assert coloured(bare_image, colour) < 50, colour
    shutil.copy(shot, Path("/tmp") / "harvest-report-screenshot.png")


def test_report_of_an_object_store_output(s3_prefix, tmp_path) -> None:
    local = tmp_path / "out"
    build(local)
    store = open_store(s3_prefix)
    for path in local.rglob("*"):
        if path.is_file():
            store.write_bytes(str(path.relative_to(local)), path.read_bytes())
    assert main(["report", s3_prefix]) == 0
    html = store.read_bytes("report.html").decode()
    assert counts_in(html)["prompts"] == "63" and html.count('<div class="chart"') == 6
