"""``validate_offsets``: a valid layout costs one host read (on CUDA, one sync), a bad one still gets the
message that names what is wrong."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ksa_rec.utils.jagged import validate_offsets


def _host_reads(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def test_a_valid_layout_is_checked_with_one_host_read():
    offsets = torch.tensor([0, 3, 3, 9])
    assert _host_reads(lambda: validate_offsets(offsets, 9)) == 1


@pytest.mark.parametrize("offsets,total,message", [
    ([1, 3, 9], 9, r"offsets\[0\] must be 0, got 1"),
    ([0, 3, 8], 9, r"offsets\[-1\] = 8 does not match the 9 rows given"),
    ([0, 5, 3, 9], 9, r"offsets must be non-decreasing"),
])
def test_a_bad_layout_names_what_is_wrong(offsets, total, message):
    with pytest.raises(ValueError, match=message):
        validate_offsets(torch.tensor(offsets), total)
