"""Shared test settings."""

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select")
_INDEXING = ("aten.index", "aten.index_put", "aten.index_put_")


class HostReads(TorchDispatchMode):
    """Inside the block, ``found`` collects ``"op <- ksa_rec file:line"`` for each host read: a tensor's value
    taken to Python (``int``, ``bool``, ``item``), ``nonzero``, indexing by a boolean mask, ``repeat_interleave``
    without ``output_size``."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        by_mask = name in _INDEXING and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        unsized = name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None
        if name in _READS or by_mask or unsized:
            where = [f"{f.filename.rsplit('ksa_rec/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()
                     if "/ksa_rec/" in f.filename]
            self.found.append(f"{name} <- {where[-1] if where else '(outside ksa_rec, e.g. autograd)'}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads():
    """``with host_reads() as reads: ...`` then ``reads.found``: the host reads of the block, counted on the CPU (ops
    that wait for a CUDA device, which a CUDA graph cannot capture: ``ksa_rec.modules.graphs``)."""
    return HostReads


@pytest.fixture
def built_block_plans(monkeypatch):
    """Every KSA Triton block plan (``triton_op._Plan``) built while the test runs, in order: how tests see whether
    calls share their block tables or build their own."""
    from ksa_rec.ops.ksa import triton_op

    built = []
    original_init = triton_op._Plan.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(triton_op._Plan, "__init__", counting_init)
    return built
