import sys
import types

import pytest
import torch

from torchopt_lab import backend


def test_invalid_backend_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'cuda'"):
        backend.resolve("test", "cuda", "cpu")


def test_torch_request_is_recorded_with_reason():
    assert backend.resolve("test-torch", "torch", "cpu") == "torch"
    decision = backend.backend_info()["decisions"]["test-torch"]
    assert decision["backend"] == "torch" and "requested" in decision["reason"]


def test_auto_on_cpu_picks_torch_and_says_why():
    assert backend.resolve("test-auto", "auto", torch.device("cpu")) == "torch"
    assert "auto chose the torch path" in backend.backend_info()["decisions"]["test-auto"]["reason"]


def test_env_var_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert backend.resolve("test-env", "auto", "cpu") == "triton"  # interpreter is on in tests
    monkeypatch.setenv(backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        backend.resolve("test-env", "auto", "cpu")


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        backend.resolve("test-no-interp", "triton", "cpu")


def test_foreign_triton_kernels_package_gets_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_kernels", types.ModuleType("triton_kernels"))
    backend._load_kernels.cache_clear()
    try:
        with pytest.raises(ImportError, match="not torchopt-lab's kernel package"):
            backend.kernels()
    finally:
        backend._load_kernels.cache_clear()
