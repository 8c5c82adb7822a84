"""Shared test settings."""

import os

import pytest
import torch

# Triton decides interpreter-or-compiler when a kernel is decorated, i.e. at first import: set it before
# any test module imports triton, so the kernel tests run on this CPU, in this process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """``fit`` (``run_lightning``) turns on TF32 matmuls for its whole process, and module fixtures train in this
    one: on a GPU that would leave later tests comparing two paths under ~1e-3 relative noise. Each test starts at
    full float32 precision, as a fresh ``stream`` / ``serve`` / ``score`` process does."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.fixture(autouse=True)
def one_thread():
    """Test tensors are tiny: one intra-op thread is faster, and a busy 2-core CI box cannot oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
