#!/usr/bin/env bash
# llama.cpp's own server (the peer `make bench-llamacpp` measures us against), built from the
# llama.cpp source that the llama-cpp-python sdist vendors, with the same flags as our
# engine's wheel (deploy/llamacpp-wheel.sh), once; prints the path of `llama-server`.
set -euo pipefail

PY=${PY:-python3}
VERSION=${LLAMACPP_VERSION:-0.3.36}
ROOT=${LLAMACPP_WHEELS:-$HOME/.cache/llm-bundle/llamacpp}
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
[[ $(uname -m) == x86_64 ]] || flags="-DGGML_NATIVE=ON"
dir="$ROOT/server-$VERSION-$(echo "$flags" | sha256sum | cut -c1-10)"

if [[ ! -x $dir/bin/llama-server ]]; then
    echo "building llama-server (llama.cpp of llama-cpp-python $VERSION): $flags" >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
    tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
    # shellcheck disable=SC2086
    cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $flags >&2
    cmake --build "$work/build" --target llama-server llama-bench -j "$(nproc)" >&2
    mkdir -p "$dir.partial/bin"
    cp "$work/build/bin/llama-server" "$work/build/bin/llama-bench" "$dir.partial/bin/"
    rm -rf "$dir" && mv "$dir.partial" "$dir"
fi
echo "$dir/bin/llama-server"
