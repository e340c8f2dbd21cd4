#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp's Python binding) ONCE into a cached wheel, then install it.
#
#     scripts/build_llama_cpp_wheel.sh            # build if not cached, install into $PYTHON's env
#     PYTHON=/work/venv/bin/python JOBS=2 scripts/build_llama_cpp_wheel.sh
#
# Why: PyPI only ships the sdist, and compiling llama.cpp takes many minutes on a small CPU; the GGUF
# self-check (`llamaft.export.gguf_check`) and `llamaft chat FILE.gguf` need it. CI restores the
# wheel directory from its cache and this script then only installs.
# Flags: GGML_NATIVE=OFF -> portable x86-64 build (AVX2/FMA/F16C, not -march=native), so a cached
# wheel works on another runner; LLAVA_BUILD=OFF skips the multimodal library (not needed, ~1/3 of
# the build); no tests/tools/examples/server.
set -euo pipefail

VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python}"
WHEELS="${LLAMAFT_WHEELS:-${LLAMAFT_CACHE:-$HOME/.cache/llamaft}/wheels}"
mkdir -p "$WHEELS"

wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z "$wheel" ]]; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF ${CMAKE_ARGS:-}"
    export CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-$(nproc)}"
    start=$(date +%s)
    "$PYTHON" -m pip wheel --no-deps "llama-cpp-python==$VERSION" -w "$WHEELS"
    echo "built llama-cpp-python $VERSION in $(( $(date +%s) - start )) s -> $WHEELS"
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n1)
fi
"$PYTHON" -m pip install "$wheel"
"$PYTHON" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'OK')"
