"""Which engine ``LLM_ENGINE`` resolves to (runners.settings.resolve_engine), and the GPUs
the runner asks for with it."""

from __future__ import annotations

from unittest import mock

import pytest

from runners import settings as rs


def _choose(engine: str, *, vllm: bool, llamacpp: bool, **seen) -> rs.EngineChoice:
    runner = rs.RunnerSettings.model_construct(engine=engine, device="auto")
    with (
        mock.patch.object(rs, "vllm_installed", return_value=vllm),
        mock.patch.object(rs, "llamacpp_installed", return_value=llamacpp),
    ):
        return rs.resolve_engine(runner, rs.NativeEngineSettings(), rs.VLLMSettings(), **seen)


@pytest.mark.parametrize(
    ("seen", "vllm", "llamacpp", "expected"),
    [
        ({"cuda_visible": False, "has_gguf": True}, False, True, "llamacpp"),  # CPU + GGUF
        ({"cuda_visible": False, "has_gguf": False}, False, True, "native"),  # no GGUF
        ({"cuda_visible": False, "has_gguf": True}, False, False, "native"),  # not installed
        ({"cuda_visible": True, "has_gguf": True}, True, True, "vllm"),  # a GPU: vLLM
        ({"cuda_visible": True, "has_gguf": True}, False, True, "native"),  # GPU, no vLLM
        ({}, False, True, "native"),  # declared (no torch, no model yet): as before
    ],
)
def test_auto_prefers_llamacpp_on_a_cpu_with_a_gguf(seen, vllm, llamacpp, expected):
    assert _choose("auto", vllm=vllm, llamacpp=llamacpp, **seen).engine == expected


def test_llamacpp_by_name_asks_for_no_gpu_and_native_by_name_insists():
    chosen = _choose("llamacpp", vllm=True, llamacpp=True, cuda_visible=True)
    assert chosen.engine == "llamacpp" and chosen.gpus == 0
    native = _choose("native", vllm=True, llamacpp=True, cuda_visible=False, has_gguf=True)
    assert native.engine == "native" and native.gpus == 1
