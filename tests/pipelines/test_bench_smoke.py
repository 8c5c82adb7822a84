"""The benchmark scripts' smoke modes run on CPU and write their reports (pipelines/bench_*.py), and the
per-user Flex-KSA mask the kernel benchmark times computes the KSA rule."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *args], cwd=ROOT, check=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def flex_ksa(load_pipeline):
    return load_pipeline("_flex_ksa")


@pytest.mark.parametrize("lengths,window,sums", [((24, 24, 24), 1, 1), ((19, 3, 40, 8), 2, 2), ((17,), None, 1)])
def test_per_user_flex_mask_is_the_ksa_rule(flex_ksa, lengths, window, sums):
    from ksa_rec.ops.ksa.dense import ksa_dense
    from ksa_rec.ops.ksa.layout import summary_offsets
    from ksa_rec.utils.jagged import lengths_to_offsets

    gen = torch.Generator().manual_seed(0)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    T, Ts = int(offsets[-1]), int(summary_offsets(offsets, 4, sums)[-1])
    ev = [torch.randn(T, 2, 8, generator=gen) for _ in range(3)]
    sm = [torch.randn(Ts, 2, 8, generator=gen) for _ in range(3)]
    want = ksa_dense(*ev, *sm, offsets, chunk_size=4, window=window, summary_tokens=sums)  # the oracle
    layout = flex_ksa.PerUserLayout(tuple(lengths), 4, sums)
    for block in (128, 64):
        mask = flex_ksa.per_user_block_mask(layout, window, block, torch.device("cpu"))
        packed = [flex_ksa.pack_per_user(e, s, layout) for e, s in zip(ev, sm)]
        out = flex_ksa.flex(torch.device("cpu"))(*packed, block_mask=mask, scale=8 ** -0.5)
        for got, ref in zip(flex_ksa.unpack_per_user(out, layout), want):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bench_kernels_smoke(tmp_path):
    _run("bench_kernels.py", "--quick", "--lengths", "64", "--flex-tiles", "default", "mask 64, fwd 64x64, bwd 64x64",
         "--out", str(tmp_path / "kernels"), env={"TRITON_INTERPRET": "1"})
    report = json.loads((tmp_path / "kernels.json").read_text())
    rows = {(r["kind"], r["method"], r["setting"]): r for r in report["rows"]}
    assert {kind for kind, _, _ in rows} == {"uniform", "jagged"}
    assert rows[("uniform", "ksa-triton", "block tables reused")]["fwd_bwd_ms"] > 0
    assert rows[("uniform", "ksa-triton", "block tables built each call")]["fwd_bwd_ms"] > 0
    assert rows[("uniform", "sdpa default", "")]["fwd_bwd_ms"] > 0
    assert rows[("uniform", "flex-ksa per-user", "mask 64, fwd 64x64, bwd 64x64")]["fwd_ms"] > 0
    assert rows[("jagged", "ksa torch reference", "")]["fwd_ms"] > 0
    # on CPU the cuDNN backend refuses: a row that says so, not a missing row
    assert rows[("uniform", "sdpa cudnn", "")]["status"].startswith("refused")
    assert report["matmul"]["tflops"] > 0 and report["command"].startswith("python pipelines/bench_kernels.py")
    md = (tmp_path / "kernels.md").read_text()
    assert "KSA Triton speed-up vs dense fastest" in md and "## Correctness pre-check" in md
    _run("plot_results.py", "--kernels", str(tmp_path / "kernels.json"), "--out", str(tmp_path))
    assert (tmp_path / "kernels.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_serving_times_each_step_path(tmp_path):
    out = tmp_path / "serving.md"
    _run("bench_serving.py", "--quick", "--histories", "40", "--batch", "3", "--patterns", "ksa*3,full", "mka*3,full",
         "--paths", "jagged", "fixed", "fixed-torch", "--state-dtypes", "fp32", "bf16", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    # the memory kinds have no fixed step: their row is the jagged one only; the jagged path has no bf16 row
    assert sorted((r["model"], r["path"]) for r in rows) == [
        ("ksa*3,full", "fixed"), ("ksa*3,full", "fixed, bf16 state"), ("ksa*3,full", "fixed-torch"),
        ("ksa*3,full", "fixed-torch, bf16 state"), ("ksa*3,full", "jagged"), ("mka*3,full", "jagged")]
    assert all(r["latency_ms"] > 0 and r["updates_per_s"] > 0 and r["embedding_ms"] > 0 for r in rows)
    assert "| 40 | ksa*3,full | fixed |" in out.read_text()


def test_bench_serving_profile_names_where_a_batch_step_spends_its_time(tmp_path):
    out = tmp_path / "serving.md"
    _run("bench_serving.py", "--quick", "--histories", "40", "--batch", "3", "--patterns", "ksa*3,full",
         "--paths", "fixed", "--profile", "4", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    (row,) = rows
    profile = row["profile"]
    assert len(profile["top"]) == 4 and profile["wall_ms"] > 0 and profile["busy_ms"] > 0
    assert all(k["ms"] > 0 and k["calls"] > 0 for k in profile["top"])
    assert "### `ksa*3,full`, fixed, n = 40, batch 3" in out.read_text()


@pytest.mark.slow
def test_bench_training_smoke_merges_labels(tmp_path):
    out = str(tmp_path / "training")
    common = ["--quick", "--configs", "dim64", "--lengths", "64", "--kinds", "full", "ksa*3,full", "--out", out]
    _run("bench_training.py", *common, "--label", "old")
    _run("bench_training.py", *common, "--label", "new", "--fused-ops", "torch")
    report = json.loads((tmp_path / "training.json").read_text())
    assert list(report["runs"]) == ["old", "new"]
    assert (report["runs"]["old"]["fused_ops"], report["runs"]["new"]["fused_ops"]) == ("auto", "torch")
    assert sorted((r["label"], r["pattern"]) for r in report["rows"]) == [
        ("new", "full*4"), ("new", "ksa*3,full"), ("old", "full*4"), ("old", "ksa*3,full")]
    assert all(r["events_per_s"] > 0 for r in report["rows"])
    md = (tmp_path / "training.md").read_text()
    assert "`new` / `old`: events/s ratio" in md and "HSTU" in md and "hybrid" not in md


def test_bench_training_profile_reports_where_the_step_time_goes(tmp_path):
    out = tmp_path / "training"
    _run("bench_training.py", "--quick", "--configs", "dim64", "--lengths", "64", "--kinds", "ksa", "--steps", "2",
         "--profile", "4", "--out", str(out))
    (row,) = json.loads(out.with_name("training.json").read_text())["rows"]
    prof = row["profile"]
    assert prof["what"] == "cpu ops (self time)" and len(prof["top"]) == 4
    assert 0 < prof["busy_ms"] <= prof["wall_ms"] * 1.05 and prof["launches"] > 100
    # a ksa step reads at least its summary count on the host (summary_index)
    assert prof["host_reads"] >= 1
    ranked = [k["ms"] for k in prof["top"]]
    assert ranked == sorted(ranked, reverse=True) and all(0 < k["share"] <= 1 for k in prof["top"])
    md = out.with_name("training.md").read_text()
    assert "## Where the time goes" in md and "self CPU ms / step" in md and f"`{prof['top'][0]['name']}`" in md


@pytest.fixture(scope="module")
def kernels(load_pipeline):
    return load_pipeline("bench_kernels")


def test_ratios_divide_by_the_fastest_baseline_and_name_it(kernels):
    def row(method, group, ms, setting="", status="ok"):
        return kernels.Row("uniform", 16384, 4, method, group, setting, status, fwd_ms=ms and ms / 3, fwd_bwd_ms=ms,
                           ksa_flops_fwd=1e12 / 3.5)

    rows = [row("sdpa default", "dense", 8.0), row("sdpa flash", "dense", 12.0),
            row("sdpa cudnn", "dense", None, status="refused: no kernel"),
            row("flex-ksa per-user", "flex-ksa", 5.0, "default"),
            row("flex-ksa per-user", "flex-ksa", 4.0, "fwd 128x64"),
            row("ksa-triton", "ksa", 2.5, "block tables built each call"),
            row("ksa-triton", "ksa", 2.0, "block tables reused"),
            row("ksa torch reference", "ksa", 1.0)]  # (never "KSA Triton", however fast)
    matmul = {"tflops": 1000.0, "dtype": "bfloat16", "n": 8192, "ms": 1.0}
    goals = "\n".join(kernels.goal_checks(rows, matmul))
    assert "KSA Triton (block tables reused) 4.00x dense fastest (sdpa default, 8.000 ms); goal >= 4.0x: met" in goals
    assert "2.00x Flex-KSA fastest (flex-ksa per-user [fwd 128x64], 4.000 ms); goal >= 2.0x: met" in goals
    assert "at 50% of the bf16 matmul rate" in goals  # 1e12 FLOPs in 2 ms = 500 TFLOP/s of 1000
    summary = "\n".join(kernels.summary_table(rows, "uniform", matmul, "fwd+bwd", "fwd_bwd_ms", 3.5))
    assert ("| 16384 | 4 | 8.000 (sdpa default) | 4.000 (flex-ksa per-user [fwd 128x64]) | "
            "2.000 (ksa-triton [block tables reused]) | 4.00x") in summary
    assert "refused: no kernel" in "\n".join(kernels.full_table(rows, "uniform", matmul))


@pytest.mark.slow
def test_bench_score_scaling_quick(tmp_path):
    """``--quick``: 64 users scored by ``ksa-rec score`` on 1 and 2 CPU processes; the 2-process merge holds
    every user once with the 1-process top-K (on CPU also the same scores, bit for bit)."""
    _run("bench_score_scaling.py", "--quick", "--out", str(tmp_path))
    report = json.loads((tmp_path / "bench_score_scaling.json").read_text())
    one, two = report["rows"]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert (one["returncode"], two["returncode"]) == (0, 0)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["users"] == two["users"] == 64
    assert one["score_s"] > 0 and two["score_s"] > 0 and two["peak_host_gb"] > 0
    assert two["agreement"] == {"same_users": True, "differing_item_lists": 0, "differing_event_counts": 0,
                                "max_score_diff": 0.0, "identical": True}
    assert "| 2 |" in (tmp_path / "bench_score_scaling.md").read_text()


def test_bench_score_scaling_skips_what_cannot_fit(load_pipeline):
    """Every process reads the whole event file: N processes are refused where N x the measured 1-process
    peak exceeds 90% of the available memory."""
    bench = load_pipeline("bench_score_scaling")
    assert bench.memory_refusal(2, 150.0, 500.0) is None
    refusal = bench.memory_refusal(4, 150.0, 500.0)
    assert refusal.startswith("skipped: about 600 GB of host memory (4 x the 1-process peak 150.0 GB), 500 GB")
    assert bench.memory_refusal(8, None, 500.0) is None  # no 1-process measurement: nothing to judge by


def test_package_commit_says_when_the_code_is_not_that_commit(load_pipeline, tmp_path, monkeypatch):
    """A benchmark row names the commit it measured; a tree edited since (or copied over an older .git, as
    on the GPU machine) is marked, so a row never claims a commit whose code it did not run."""
    import types

    common = load_pipeline("_bench_common")
    pkg = tmp_path / "ksa_rec"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VERSION = 1\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("add", "ksa_rec")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD")
    monkeypatch.setitem(sys.modules, "ksa_rec", types.SimpleNamespace(__file__=str(pkg / "__init__.py")))
    assert common.package_commit() == head
    (pkg / "__init__.py").write_text("VERSION = 2\n")
    assert common.package_commit() == f"{head}+uncommitted"


def test_bench_serve_stops_waiting_when_the_server_exits(load_pipeline, tmp_path):
    """A server that dies at start (a missing module on the GPU machine) fails the run at once with its
    log's last line, instead of after the 180 s start-up wait."""
    bench_serve = load_pipeline("bench_serve")
    log = tmp_path / "serve.log"
    proc = bench_serve.Processes().start([sys.executable, "-c", "print('ModuleNotFoundError: x'); raise SystemExit(3)"],
                                         log)
    proc.wait(30)
    with pytest.raises(RuntimeError, match=r"server exited with status 3 before it came up: ModuleNotFoundError: x"):
        bench_serve.wait_for(lambda: False, 60, "server", proc, log)


def test_bench_full_paths_times_the_paths_the_rule_picks_from(load_pipeline, tmp_path):
    bench = load_pipeline("bench_full_paths")
    log = tmp_path / "log.txt"  # sasrec lines: 5 users of 4-30 events (2 held out each)
    log.write_text("".join(f"{u} " + " ".join(str(1 + (u * 7 + i) % 40) for i in range(n)) + "\n"
                           for u, n in enumerate([30, 4, 12, 25, 9], start=1)))
    assert sorted(bench.user_lengths(log)) == [2, 7, 10, 23, 28]
    bench.main(["--data", str(log), "--batch", "4", "--batches", "1", "--max-len", "8", "0", "--uniform", "6",
                "--dim", "8", "--heads", "2", "--dtypes", "fp32", "--out", str(tmp_path / "fp")])
    rows = json.loads((tmp_path / "fp.json").read_text())["rows"]
    assert [r["batches"] for r in rows] == ["log.txt, last 8", "log.txt, whole", "uniform 6"]
    jagged, uniform = rows[1], rows[2]
    assert jagged["rule_picks"] == ["padded"] and uniform["rule_picks"] == ["dense"]
    assert jagged["padded_over_real"] > 1 and uniform["padded_over_real"] == 1
    assert jagged["ms"]["dense"] == "jagged batches" and isinstance(jagged["ms"]["padded"], float)
    assert all(isinstance(uniform["ms"][p], float) for p in ("dense", "ksa", "padded"))
    assert "| uniform 6 | fp32 |" in (tmp_path / "fp.md").read_text()


def test_training_report_keeps_the_rows_measured_before_a_crash(load_pipeline, tmp_path, monkeypatch):
    import json

    import pytest

    bench = load_pipeline("bench_training")
    measured = []

    def fake_bench(size, pat, length, *args, **kwargs):
        measured.append(pat)
        if len(measured) == 2:  # the second row dies (a device call's time limit, a crash)
            raise RuntimeError("killed")
        return {"users": 1, "events": length, "step_ms": 1.0, "events_per_s": 1000.0, "warmup_s": 0.0, "peak_gib": None}

    monkeypatch.setattr(bench, "bench", fake_bench)
    with pytest.raises(RuntimeError, match="killed"):
        bench.main(["--quick", "--configs", "dim64", "--lengths", "64", "--kinds", "full", "ksa",
                    "--out", str(tmp_path / "t")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["pattern"], r["events_per_s"]) for r in rows] == [("full*4", 1000.0)]
    assert "full*4" in (tmp_path / "t.md").read_text()


def test_explain_user_averages_what_each_ksa_layer_reads(load_pipeline, tmp_path, capsys):
    """``--targets N``: over N targets, the newest event's weight on summaries and on raw events (they sum to 1:
    one softmax), one line a KSA layer, here for the untrained model (``--checkpoint init``) of a ksa,ksa pattern
    on the smoke data; ``--max-distance`` bounds the targets from above."""
    explain = load_pipeline("explain_user")
    assert explain.main(["--config", str(ROOT / "configs/smoke.yaml"), "--checkpoint", "init", "--targets", "5",
                         "--min-distance", "1", "--max-distance", "1000", "--", "--model.encoder.pattern", "ksa,ksa",
                         "--data.cache_dir", str(tmp_path / "cache")]) == 0
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if line.startswith("layer ")]
    readings = [dict(part.rsplit(" ", 1) for part in line.split(", ")) for line in lines]
    assert [reading["layer"] for reading in readings] == ["0", "1"]
    for reading in readings:
        assert int(reading["targets"]) == 5
        assert abs(float(reading["on_summaries"]) + float(reading["on_events"]) - 1) < 1e-4
        assert 0 < float(reading["on_summaries"]) < 1
    with pytest.raises(SystemExit, match="no test target"):
        explain.main(["--config", str(ROOT / "configs/smoke.yaml"), "--checkpoint", "init", "--targets", "5",
                      "--min-distance", "1", "--max-distance", "1", "--", "--model.encoder.pattern", "ksa,ksa",
                      "--data.cache_dir", str(tmp_path / "cache")])


@pytest.mark.parametrize("window, sums, max_summaries", [(2, 1, None), (2, 2, 0), (1, 2, 3), (None, 1, None)])
def test_ksa_pairs_counts_the_dense_rules_visible_pairs(kernels, window, sums, max_summaries):
    from ksa_rec.ops.ksa.dense import ksa_visibility

    lengths = [1, 7, 24, 37]
    want = sum(int(ksa_visibility(n, 4, window, sums, max_summaries).sum()) for n in lengths)
    assert kernels.ksa_pairs(lengths, 4, window, sums, max_summaries) == want


def test_stage_rates_count_only_the_matmuls_a_kernel_runs(kernels):
    assert kernels.kernel_matmuls("ksa_bwd_dkdv_kernel", deterministic=True) == 4
    assert kernels.kernel_matmuls("ksa_bwd_dkdv_kernel", deterministic=False) == 5
    assert kernels.kernel_matmuls("ksa_bwd_dq_kernel", deterministic=True) == 3
    # with atomic dQ the dQ launch holds only summary-query programs (no matmul): no rate for it
    assert kernels.kernel_matmuls("ksa_bwd_dq_kernel", deterministic=False) == 0
    assert kernels.kernel_matmuls("other (torch glue: tables, sort, fills, casts)", deterministic=True) == 0


@pytest.mark.slow
def test_ksa_triton_row_with_reused_tables_builds_them_once(kernels, built_block_plans):
    """The "block tables reused" row must not rebuild the op's tables on every call (the other row must)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"  # (tests/conftest.py: the kernels run on CPU)
    built = built_block_plans
    s = kernels.Setup(heads=1, dim=16, chunk=4, window=1, sums=1, dtype=torch.float32)
    batch = kernels.make_batch("uniform", 32, 64, s, torch.device("cpu"))
    counts = {}
    for call in kernels.ksa_calls(batch, s, ksa_flops=1.0, reference_max_l=0):
        built.clear()
        for _ in range(3):
            call.fn()
        counts[call.setting] = len(built)
    assert counts == {"block tables reused": 1, "block tables built each call": 3}
