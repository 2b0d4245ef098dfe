#!/usr/bin/env bash
# Build (once) the venv axolotl's own code runs in for the export test; keyed by a stamp of
# requirements.txt so a changed pin rebuilds it. Usage: build_venv.sh VENV_DIR
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$1"
stamp="$venv/.stamp"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then exit 0; fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$here/requirements.txt" 2>&1 | { grep -v "is ignored: it is neither" || true; }
# torchvision & co. fail at import beside torch 2.13 CPU and axolotl's KD path does not need them.
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>&1 | { grep -v "not installed" || true; }
"$venv/bin/python" -c "import axolotl.integrations.kd.chat_template, axolotl.integrations.kd.collator"
echo "$want" > "$stamp"
