"""The history-length plot's bucket handling (pipelines/plot_results.py)."""


import pytest


@pytest.fixture(scope="module")
def plots(load_pipeline):
    return load_pipeline("plot_results")


def _test(counts: dict[str, int], hr: dict[str, float]) -> dict:
    out = {}
    for b, n in counts.items():
        out[f"{b}/targets"] = n
        out[f"{b}/hr@10"] = hr[b]
    return out


def test_longest_buckets_merge_until_each_has_enough_users(plots):
    counts = {"hist_1_8": 100, "hist_8_16": 50, "hist_16_32": 35, "hist_32_64": 5, "hist_64_plus": 3}
    test = _test(counts, dict.fromkeys(counts, 0.0))
    assert plots._merge_tail(list(counts), test, 40) == [["hist_1_8"], ["hist_8_16"],
                                                         ["hist_16_32", "hist_32_64", "hist_64_plus"]]
    # too few short histories as well: they join their neighbour
    counts = _test({"hist_1_8": 10, "hist_8_16": 50}, {"hist_1_8": 0, "hist_8_16": 0})
    assert plots._merge_tail(["hist_1_8", "hist_8_16"], counts, 40) == [["hist_1_8", "hist_8_16"]]


def test_merged_buckets_pool_users_not_bucket_means(plots):
    test = _test({"hist_1_8": 30, "hist_8_plus": 10}, {"hist_1_8": 0.1, "hist_8_plus": 0.5})
    assert plots._pooled(test, ["hist_1_8", "hist_8_plus"], "hr@10") == pytest.approx((30 * 0.1 + 10 * 0.5) / 40)


def test_plot_of_two_models_and_seeds(plots, tmp_path):
    counts = {"hist_1_8": 60, "hist_8_plus": 50}
    results = {f"data-{m}-s{s}": {"test": _test(counts, {"hist_1_8": 0.1 + s / 100, "hist_8_plus": 0.2})}
               for m in ("full", "ksa") for s in (0, 1)}
    path = plots.quality_by_history({"Data": results}, tmp_path)
    assert path == tmp_path / "quality-by-history.png" and path.stat().st_size > 10_000
