"""The study runner's bookkeeping: seeded runs and the across-seed summary (pipelines/quality.py)."""


import pytest


@pytest.fixture(scope="module")
def quality(load_pipeline):
    return load_pipeline("quality")


def test_seeded_runs_repeat_per_seed_seed_major_with_the_seed_argument(quality):
    runs = quality.expand([quality.Run("plain", "smoke", None),
                           quality.Run("a", "smoke", None, ["--x", "1"], seeded=True),
                           quality.Run("b", "smoke", None, seeded=True)], [3, 7])
    assert [r.name for r in runs] == ["plain", "a-s3", "b-s3", "a-s7", "b-s7"]
    assert runs[1].overrides == ["--x", "1", "--seed_everything", "3"] and runs[0].overrides == []
    assert not any(r.seeded for r in runs)


def test_every_kinds_study_compares_all_nine_patterns_at_one_span(quality):
    for study in ("beauty-kinds", "ml-100k-kinds", "ml-latest-small-kinds", "ml-1m-kinds", "ml-20m-kinds",
                  "long-range-cpu-kinds"):
        runs = quality.STUDIES[study]
        patterns = [r.overrides[r.overrides.index("--model.encoder.pattern") + 1] for r in runs]
        assert len(set(patterns)) == 9 and all(len(p.split(",")) == 2 for p in patterns)
        assert len({tuple(r.overrides[2:]) for r in runs}) == 1  # everything but the pattern is shared


def test_all_ksa_real_pairs_each_recipe_row_with_full_attention_at_the_same_settings(quality):
    """Each dataset: full,full and the all-KSA recipe, differing only in what the recipe adds (Beauty's KSA span
    on its KSA row only: full attention has no window)."""
    runs = {r.name: r.overrides for r in quality.STUDIES["all-ksa-real"]}
    recipe = ["--model.encoder.summary_init", "chunk", "--model.loss.summary_reconstruction", "0.3"]
    for data, span in [("beauty", quality.BEAUTY_SPAN), ("ml-latest-small", []), ("ml-100k", [])]:
        assert runs[f"{data}-full,full"] == ["--model.encoder.pattern", "full,full"]
        assert runs[f"{data}-ksa,ksa[chunk,rec0.3]"] == ["--model.encoder.pattern", "ksa,ksa", *span, *recipe]
    assert len(runs) == 6


def test_seed_table_is_the_mean_with_a_student_t_half_width(quality):
    metrics = {m: 0.0 for m in quality.METRICS}
    def fit(val, stop, seconds):
        return {"best_val": {"val/ndcg@10": val}, "stopped_by": stop, "seconds": seconds}

    results = {"m-s0": {"test": {**metrics, "hr@10": 0.10}, "fit": fit(0.3, "early_stopping", 60), "epochs": 10},
               "m-s1": {"test": {**metrics, "hr@10": 0.20}, "fit": fit(0.4, "early_stopping", 120), "epochs": 12},
               "m-s2": {"test": {**metrics, "hr@10": 0.30}, "fit": fit(0.5, "max_time", 180), "epochs": 9},
               "other": {"test": {**metrics, "hr@10": 0.5}}}
    table = quality.seed_table(results)
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    row = next(line for line in table.splitlines() if line.startswith("| m |"))
    cells = dict(zip(head, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["seeds"] == "3"
    # mean 0.2, sd 0.1, half-width t(2) * sd / sqrt(3) = 4.303 * 0.1 / 1.732 = 0.2484
    assert cells["hr@10"] == "0.2000 ± 0.2484"
    # what model selection reads (the kept checkpoint's validation score), the same mean and half-width
    assert cells["val ndcg@10 (selects)"] == "0.4000 ± 0.2484"
    assert cells["epochs"] == "10/12/9" and cells["stopped by"] == "early_stopping, max_time"
    assert cells["fit min"] == "2.0 ± 2.5"
    assert "other" not in table


def test_report_has_the_stop_reason_and_one_table_per_group_family(quality, tmp_path):
    metrics = {m: 0.1 for m in quality.METRICS} | {f"{m}_ci95": 0.01 for m in quality.METRICS} | {"targets": 10}
    groups = {"hist_1_8/hr@10": 0.2, "hist_1_8/hr@10_ci95": 0.02, "hist_1_8/targets": 4,
              "dist_1_64/hr@10": 0.3, "dist_1_64/hr@10_ci95": 0.03, "dist_1_64/targets": 6,
              "no_long_range/hr@10": 0.4, "no_long_range/hr@10_ci95": 0.04, "no_long_range/targets": 2}
    results = {"a": {"test": metrics | groups, "fit": {"epochs": 7, "stopped_by": "early_stopping"},
                     "protocol": {"seen_items": "mask"}, "epochs": 7, "wall_s": 12.0}}
    report = quality.write_report(results, tmp_path)
    assert (tmp_path / "results.md").read_text() == report + "\n"
    assert report.startswith("**Protocol:** seen items: mask\n")
    assert "| mask | 10 | 7 | early_stopping | 12 |" in report
    hist = next(t for t in report.split("\n\n") if t.startswith("| run (hr@10) | hist_1_8 |"))
    assert "0.2000 ± 0.0200 (n=4)" in hist and "dist_" not in hist
    assert any(t.startswith("| run (hr@10) | dist_1_64 | no_long_range |") for t in report.split("\n\n"))


def test_report_names_each_runs_seen_items_rule(quality, tmp_path):
    """A run's rule comes from its metrics.json; one written before the setting existed had the old rule."""
    test = {m: 0.1 for m in quality.METRICS} | {f"{m}_ci95": 0.01 for m in quality.METRICS} | {"targets": 10}
    results = {"new": {"test": test, "protocol": {"seen_items": "keep"}, "wall_s": 1.0},
               "old": {"test": test, "wall_s": 1.0}, "failed": {"wall_s": 1.0}}
    report = quality.write_report(results, tmp_path)
    assert report.startswith("**Protocol:** seen items: keep / target exempt (differs between runs")
    rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ")}
    assert "| keep | 10 |" in rows["new"] and "| target exempt | 10 |" in rows["old"]
    assert rows["failed"].endswith("| - | - | - | - | 1 |")  # no rule, targets, epochs, stop reason
    assert len({line.count("|") for line in rows.values()}) == 1  # every row fills every column


def test_report_takes_a_re_tested_checkpoint_as_a_run(quality, tmp_path):
    """`ksa-rec test --ckpt_path` writes metrics.json with no fit and no wall time; merged as runs (e.g. to break
    old checkpoints down by other distance edges) the report leaves those cells empty instead of failing."""
    test = {m: 0.1 for m in quality.METRICS} | {f"{m}_ci95": 0.01 for m in quality.METRICS} | {"targets": 10}
    results = {"full-s0": {"checkpoint": "best.ckpt", "protocol": {"seen_items": "keep"}, "test": test}}
    report = quality.write_report(results, tmp_path)
    row = next(line for line in report.splitlines() if line.startswith("| full-s0 |"))
    assert row.endswith("| keep | 10 | - | - | - |")


def test_paired_table_reports_every_bucket_paired_by_seed(quality):
    def test(all_, near, far):
        return {"ndcg@10": all_, "dist_1_20/ndcg@10": near, "dist_150_plus/ndcg@10": far}

    results = {"sca-s0": {"test": test(0.60, 0.70, 0.20)}, "sca-s1": {"test": test(0.62, 0.72, 0.22)},
               "ksa-s0": {"test": test(0.61, 0.68, 0.30)}, "ksa-s1": {"test": test(0.63, 0.70, 0.34)},
               "ksa-s2": {"test": test(0.99, 0.99, 0.99)}}  # no sca-s2: not paired
    lines = quality.paired_table(results, "sca", "ndcg@10").splitlines()
    assert lines[2] == "| model | seeds | all | dist_1_20 | dist_150_plus |"
    # differences (0.01, 0.01), (-0.02, -0.02), (0.10, 0.12): means and t(1) half-widths 12.706 * sd / sqrt(2)
    row = lines[4].split(" | ")
    assert row[:2] == ["| ksa", "2"]
    assert row[2] == "+0.0100 ± 0.0000" and row[3] == "-0.0200 ± 0.0000"
    assert row[4].startswith("+0.1100 ± 0.127")
    assert quality.paired_table(results, "nosuch", "ndcg@10") == ""


def test_report_pairs_by_every_breakdown_the_runs_logged(quality, tmp_path):
    """Real-data runs log history-length groups only: their pairs are reported by history length too."""
    base = {m: 0.1 for m in quality.METRICS} | {f"{m}_ci95": 0.01 for m in quality.METRICS} | {"targets": 10}

    def run(all_, short, long_):
        groups = {f"{g}/{key}": value for g in ("hist_1_8", "hist_8_16")
                  for key, value in [("ndcg@10_ci95", 0.01), ("targets", 5)]}
        return {"test": base | groups | {"ndcg@10": all_, "hist_1_8/ndcg@10": short, "hist_8_16/ndcg@10": long_},
                "wall_s": 1.0}

    results = {"full-s0": run(0.50, 0.40, 0.60), "full-s1": run(0.52, 0.42, 0.62),
               "ksa-s0": run(0.51, 0.40, 0.64), "ksa-s1": run(0.53, 0.42, 0.66)}
    report = quality.write_report(results, tmp_path, ["full"])
    paired = [t for t in report.split("\n\n") if t.startswith("| model | seeds |")]
    assert paired == ["| model | seeds | all | hist_1_8 | hist_8_16 |\n|---|---|---|---|---|\n"
                      "| ksa | 2 | +0.0100 ± 0.0000 | +0.0000 ± 0.0000 | +0.0400 ± 0.0000 |"]
    assert quality.paired_families({"a": {"test": {"ndcg@10": 0.1}}}) == ["dist"]


def test_studies_that_share_a_run_run_it_once(quality):
    beauty = [r for r in quality.expand(quality.STUDIES["beauty-sweep"] + quality.STUDIES["real-summaries"], [0])
              if r.name.startswith("beauty-")]
    names = [r.name for r in quality.unique(beauty)]
    assert len(names) == len(set(names)) and "beauty-sca,sca-s0" in names and "beauty-full,full-s0" in names
    clash = quality.Run("x", "beauty", None, ["--a"])
    with pytest.raises(SystemExit, match="run x has different settings"):
        quality.unique([clash, quality.Run("x", "beauty", None, ["--b"])])


def test_studies_run_before_a_config_changed_pin_the_settings_they_ran(quality):
    """configs/ml-1m-sasrec.yaml moved from dim 64 / 2 heads to dim 128 / 4 heads after the first ML-1M sweep,
    then to full*8 at dim 64 / 2 heads, then to dropout 0.3; configs/beauty.yaml gained 500 warm-up steps. The
    studies run before keep training what their result files report."""
    def args(run):
        return dict(zip(run.overrides[::2], run.overrides[1::2]))

    sweep_row = [r for r in quality.STUDIES["ml-1m-sweep"] if r.name == "ml-1m-full,full"]
    for run in sweep_row + quality.STUDIES["ml-1m-history"]:
        assert (args(run)["--model.encoder.dim"], args(run)["--model.encoder.num_heads"]) == ("64", "2"), run.name
    for run in quality.STUDIES["ml-1m-converged"] + quality.STUDIES["ml-1m-converged-whole"]:
        assert (args(run)["--model.encoder.dim"], args(run)["--model.encoder.num_heads"]) == ("128", "4"), run.name
    deep = {r.name: args(r) for r in quality.STUDIES["ml-1m-deep"]}
    assert (deep["ml-1m-full*8-64"]["--model.encoder.dim"], deep["ml-1m-full*8-64"]["--model.encoder.num_heads"]) \
        == ("64", "2")  # a row's own width is not overridden by the pin
    before = quality.SHIPPED_BEFORE["beauty"][0][1]
    beauty = [r for study in before for r in quality.STUDIES[study] if r.config == "beauty"]
    assert beauty and all(args(r)["--model.optim.warmup_steps"] == ("500" if "warm500" in r.name else "0")
                          for r in beauty)
    later = quality.STUDIES["beauty-ksa-recipe"]  # a study added after the change runs the config as it ships
    assert later and all("--model.optim.warmup_steps" not in r.overrides for r in later)
    assert all(r.overrides.count("--model.optim.warmup_steps") == 1 for r in beauty)  # pinned once, never twice
    # synthetic-long-2l.yaml's patience went from 4 to 30 after long-range.md 2b-2h ran with 4 (2i passed 30 itself)
    for study in ("long-range-gpu", "long-range-gpu-dense"):
        runs = quality.STUDIES[study]
        assert runs and all(args(r)["--early_stopping.patience"] == "4" for r in runs), study
    # synthetic-long-cpu.yaml went from ksa,full for 20 epochs (patience 6, no reconstruction loss) to the all-KSA
    # recipe for 60 (long-range.md 2j); the studies before keep their settings, a run's own flags win
    cpu_studies = quality.SHIPPED_BEFORE["synthetic-long-cpu"][0][1]
    for study in cpu_studies:
        for run in quality.STUDIES[study]:
            given = args(run)
            assert (given["--trainer.max_epochs"], given["--early_stopping.patience"]) == ("20", "6"), run.name
            assert given["--model.loss.summary_reconstruction"] == ("0.3" if "rec0.3" in run.name or
                                                                    run.name == "lr4-ksa-aux0.3" else
                                                                    "1.0" if "aux" in run.name else "0"), run.name
            assert run.overrides.count("--model.encoder.pattern") == 1, run.name
    assert {r.config for study in cpu_studies for r in quality.STUDIES[study]} == {"synthetic-long-cpu"}
    # then it went to summary_qkv delta (long-range.md 2r): every study before, of both generations, keeps own
    for study in [*cpu_studies, "long-range-cpu-rec-weight", "long-range-cpu-near"]:
        for run in quality.STUDIES[study]:
            assert args(run)["--model.encoder.summary_qkv"] == "own" and \
                run.overrides.count("--model.encoder.summary_qkv") == 1, run.name
    assert {args(r)["--model.encoder.summary_qkv"] for r in quality.STUDIES["long-range-cpu-shared"]} == {"shared",
                                                                                                        "delta"}
    for study in ("ml-1m-converged", "ml-1m-deep", "ml-1m-cosine", "ml-1m-regularise"):  # dropout 0.2 until then
        for run in quality.STUDIES[study]:
            want = run.name.split("[drop")[1].split("]")[0] if "[drop" in run.name else "0.2"
            assert args(run)["--model.encoder.dropout"] == want, run.name
            assert run.overrides.count("--model.encoder.dropout") == 1, run.name


def test_only_that_names_no_run_is_an_error(quality, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["quality.py", "--study", "ml-1m-converged", "--only", "ml-1m-full*3-128",
                                     "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        quality.main()
    assert stop.value.code == 2
    assert "no run of ['ml-1m-converged'] is named ['ml-1m-full*3-128'] (seeded runs end in -s<seed>)" \
        in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_report_from_rewrites_a_finished_study_with_other_pairings(quality, monkeypatch, capsys, tmp_path):
    test = {m: 0.1 for m in quality.METRICS} | {f"{m}_ci95": 0.01 for m in quality.METRICS} | {"targets": 10}
    results = {f"{name}-s{seed}": {"test": test | {"ndcg@10": base + seed / 100}, "wall_s": 1.0}
               for name, base in (("sca", 0.5), ("ksa", 0.6)) for seed in (0, 1)}
    source = tmp_path / "study" / "results.json"
    source.parent.mkdir()
    source.write_text(quality.json.dumps(results))
    monkeypatch.setattr("sys.argv", ["quality.py", "--report-from", str(source), "--paired", "sca",
                                     "--out", str(tmp_path / "again")])
    assert quality.main() == 0
    report = (tmp_path / "again" / "results.md").read_text()
    assert "**Paired difference in ndcg@10 against sca**" in report and "| ksa | 2 | +0.1000 ± 0.0000 |" in report
    assert quality.json.loads((tmp_path / "again" / "results.json").read_text()) == results
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["results.json", "results.md"]
    # an --out that holds another study's results is refused, and left as it was
    monkeypatch.setattr("sys.argv", ["quality.py", "--report-from", str(source), "--out", str(tmp_path / "again")])
    (tmp_path / "again" / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        quality.main()
    assert stop.value.code == 2 and "exists and holds other results" in capsys.readouterr().err
    assert (tmp_path / "again" / "results.json").read_text() == "{}"


def test_a_run_launched_again_keeps_the_earlier_runs_log(quality, tmp_path):
    for command in (["fit", "--seed_everything", "0"], ["fit", "--seed_everything", "1"]):
        with quality.open_run_log(tmp_path, command) as out:
            out.write(f"trained {command[-1]}\n")
    lines = (tmp_path / "stdout.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines if line.startswith("==== ")] == [
        "fit --seed_everything 0", "fit --seed_everything 1"]
    assert "trained 0" in lines and "trained 1" in lines
