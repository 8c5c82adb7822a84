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


def test_jagged_to_padded_drops_rows_beyond_max_len_without_a_host_read(host_reads):
    from ksa_rec.utils.jagged import jagged_to_padded, lengths_to_offsets, padded_to_jagged

    lengths = [3, 0, 6, 2]
    offsets = lengths_to_offsets(torch.tensor(lengths))
    values = torch.randn(sum(lengths), 2, dtype=torch.float64, requires_grad=True)
    with host_reads() as reads:
        padded = jagged_to_padded(values, offsets, 4, pad_value=-1.0)
        (padded * torch.arange(1.0, 17.0, dtype=torch.float64).view(4, 4, 1)).sum().backward()
        back = padded_to_jagged(jagged_to_padded(values, offsets, 6), offsets, sum(lengths))
    assert reads.found == []
    want = torch.full((4, 4, 2), -1.0, dtype=torch.float64)
    for b, (lo, n) in enumerate(zip(offsets[:-1].tolist(), lengths)):
        kept = min(n, 4)
        want[b, :kept] = values[lo:lo + kept].detach()
    assert torch.equal(padded, want)
    # the two rows of user 2 beyond max_len get no gradient; every other row its padded slot's weight
    weight = torch.tensor([1, 2, 3, 9, 10, 11, 12, 0, 0, 13, 14], dtype=torch.float64)
    assert torch.equal(values.grad, weight[:, None].expand(-1, 2))
    assert torch.equal(back, values.detach())
