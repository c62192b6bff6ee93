#!/usr/bin/env bash
# The llama-cpp-python wheel for this CPU kind: built once (10-25 min on 2 cores), then kept
# under $LLAMACPP_WHEELS; prints the wheel's path. `make ENGINE=llamacpp install` installs it.
#
# PyPI has the package's source only. A native build (-march=native) is not portable: a wheel
# built on an AVX-512 Intel host dies with SIGILL on an AVX2 AMD one, and pip's own cache of
# built wheels does not tell them apart. So the build is non-native, for an instruction set
# named in the cache key: x86-64-v3 (AVX2, FMA, F16C, BMI2: every x86 server CPU of the last
# ten years, Intel and AMD) where the CPU has it. That also keeps AMX off, whose ggml path
# segfaults (ggml_backend_amx_mul_mat) on some hosts here that advertise it. Extra CMake
# flags: LLAMACPP_CMAKE_ARGS (e.g. -DGGML_AVX512=ON, or -DGGML_CUDA=ON on a GPU host); they
# are part of the key.
set -euo pipefail

PY=${PY:-python3}
VERSION=${LLAMACPP_VERSION:-0.3.36}
WHEELS=${LLAMACPP_WHEELS:-$HOME/.cache/llm-bundle/llamacpp}

flags="-DLLAVA_BUILD=OFF" # the multimodal tools: not used, a third of the build
if [[ $(uname -m) == x86_64 ]]; then
    if grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo; then
        kind=x86-64-v3
        flags+=" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    else
        kind=x86-64
        flags+=" -DGGML_NATIVE=OFF"
    fi
else
    kind="$(uname -m)-native" # no AMX outside x86; ARM builds are native to their host
    flags+=" -DGGML_NATIVE=ON"
fi
flags+=" ${LLAMACPP_CMAKE_ARGS:-}"
key=$(echo "$VERSION $flags" | sha256sum | cut -c1-10)
dir="$WHEELS/$VERSION-$kind-$key"

if ! compgen -G "$dir/*.whl" >/dev/null; then
    echo "building llama-cpp-python $VERSION for $kind (10-25 min on 2 cores, once): $flags" >&2
    rm -rf "$dir.partial"
    CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$dir.partial" >&2
    mv "$dir.partial" "$dir" # whole or absent
fi
compgen -G "$dir/*.whl" | head -1
