"""python -m medseg_peft.compare: two methods on the tiny polyp bundle, a rerun that runs nothing, --collect,
the other tasks' metadata and folders, and bad input refused before any run."""

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import BUNDLES, CLASSIFY, ORGAN, bundle_files  # noqa: E402
from medseg_peft import compare
from medseg_peft.workflows import charts

POLYP = str(BUNDLES / "polyp_fps.json")
TINY = ["--epochs", "1", "--synthetic_images", "16", "--batch_size", "4", "--image_size", "64", "--select_batches", "2",
        "--num_workers", "0"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the bundle subprocesses inherit both


def _refuse(planned):
    raise AssertionError(f"{planned.method} was launched")


def table_lines(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_two_methods_run_then_a_rerun_and_collect_run_nothing_and_give_the_same_rows(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    argv = ["--config_file", POLYP, "--methods", "fps,full", "--output_dir", str(out), *TINY]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in table_lines(printed)] == ["fps", "full"]
    saved = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in saved["rows"]}
    assert list(rows) == ["fps", "full"] and [(x["action"], x["ok"]) for x in saved["runs"]] == [("run", True)] * 2
    for method, r in rows.items():
        metrics = json.loads((out / method / "metrics.json").read_text())  # each method ran the bundle in its own folder
        assert r["run"] == method and r["key_metric"] == "mDice" and r["metrics"] == ["mDice", "mIoU"]
        assert r["zero_shot"] == {m: metrics["zero_shot"][m] for m in ("mDice", "mIoU")}
        assert r["best"]["mDice"] == metrics["best"]["mDice"] and r["best_epoch"] == metrics["best"]["epoch"] and r["epochs"] == 1
        assert r["trainable"] == metrics["trainable"] > 0 and r["wall_time_s"] is not None
        assert f"methods/{method}.json" in (out / method / "compare.log").read_text()  # the command, at the top of its log
    assert rows["full"]["tuned_percent"] == pytest.approx(100) and 0 < rows["fps"]["tuned_percent"] < 100
    assert f"--meta_file {BUNDLES / 'metadata.json'}" in saved["runs"][0]["command"]
    png = out / "comparison.png"
    assert png.stat().st_size > 0 and Image.open(png).format == "PNG"

    # the same command again runs nothing: both folders hold finished runs with the same settings
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("comparison")}
    monkeypatch.setattr(compare, "launch", _refuse)
    assert compare.main(argv) == 0
    assert capsys.readouterr().out.count("holds a finished run with the same settings: not re-run") == 2
    again = json.loads((out / "comparison.json").read_text())
    assert again["rows"] == saved["rows"] and [x["action"] for x in again["runs"]] == ["skip", "skip"]

    # --collect: the same rows, from the folders alone
    (out / "comparison.json").unlink()
    assert compare.main(["--collect", str(out)]) == 0
    assert json.loads((out / "comparison.json").read_text())["rows"] == saved["rows"]
    assert table_lines(capsys.readouterr().out) == table_lines(printed)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # no run touched its folder

    # other settings in the same folders stop the command before any run; more epochs resume the runs there
    assert compare.main(argv + ["--lr", "0.001"]) == 2
    assert "lr: 0.005 there, 0.001 now" in capsys.readouterr().err
    files, layers = [POLYP], compare.method_layers([POLYP])
    planned = compare.plan(files, ["fps", "full"], layers, {**compare.overrides(TINY), "epochs": "2"}, [], str(out))
    assert [(p.action, p.output_dir) for p in planned] == [("resume", out / "fps"), ("resume", out / "full")]


def _fake_run(folder: Path, method: str, key: str, epochs: int = 2, done: int = 2, **extra) -> None:
    """A metrics.json as RunReport writes it: zero-shot at epoch 0, one entry per epoch, the best entry."""
    names = ["top1", "top1_raw"] if key == "top1" else ["mDice", "mIoU"]
    history = [{"epoch": e, **{n: 10.0 * (e + 1) + i for i, n in enumerate(names)}} for e in range(done + 1)]
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "settings": {"epochs": epochs, "device": "cpu"}, "zero_shot": history[0], "history": history,
        "best": history[-1], "best_each": {}, **extra}))


def test_collect_reads_new_and_older_metrics_and_leaves_out_unfinished_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "launch", _refuse)
    runs = tmp_path / "runs"
    _fake_run(runs / "classify_synthetic_full", "full", "top1", seconds=125.0, trainable=5000, tuned_percent=100.0)  # a metrics.json without wall_time_s / peak_memory_mib
    _fake_run(runs / "classify_synthetic_gps", "gps", "top1", seconds=80.0, wall_time_s=70.0, trainable=50,
              trainable_fraction=0.01, tuned_percent=1.0, peak_memory_mib=2048.4, peak_memory_kind="cuda_max_allocated")
    _fake_run(runs / "classify_synthetic_fps", "fps", "top1", done=1, seconds=5.0, trainable=50, tuned_percent=1.0)
    assert compare.main(["--collect", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert "left out" in printed and "classify_synthetic_fps: unfinished (epoch 1 of 2)" in printed
    assert "zero-shot top-1 / top1_raw" not in printed and "| zero-shot top-1 | best top-1 |" in printed
    gps, full = table_lines(printed)  # the methods' usual order, not the folders'
    assert gps.startswith("| gps | 50 | 1 | 10.00 | 30.00 | 2 (of 2) | 1 min 10 s | 2,048 MiB (cuda_max_allocated) |")
    assert full.startswith("| full | 5,000 | 100 | 10.00 | 30.00 | 2 (of 2) | 2 min 05 s | - |")
    rows = json.loads((runs / "comparison.json").read_text())["rows"]
    assert [(r["wall_time_from"], r["peak_memory_mib"]) for r in rows] == [("wall_time_s", 2048.4), ("seconds", None)]
    with Image.open(runs / "comparison.png") as png:
        assert png.format == "PNG" and 300 <= png.width <= 3000 and 300 <= png.height <= 3000
    # the chart shows each finished run at its tuned share and best score, the longer run's marker the larger
    chart = charts.chart_points(rows)
    assert [(p["label"], p["tuned_percent"], p["best"]) for p in chart["points"]] == [
        (r["method"], r["tuned_percent"], r["best"]["top1"]) for r in rows]
    gps_area, full_area = (p["area"] for p in chart["points"])
    assert full_area > gps_area and chart["zero_shot"] == sorted({r["zero_shot"]["top1"] for r in rows})
    figure = charts.comparison_figure(rows)
    shown = [t.get_text() for t in figure.axes[0].texts]
    assert {"gps", "full"} <= set(shown) and any(t.startswith("zero-shot ") for t in shown)
    assert figure.axes[0].get_xscale() == "log" and figure.axes[0].get_title(loc="left") == "best top1 against the share of tuned parameters"
    # runs of another key metric are not mixed into one table
    _fake_run(runs / "polyp_fps", "fps", "mDice", seconds=5.0, trainable=50, tuned_percent=1.0)
    assert compare.main(["--collect", str(runs)]) == 2
    assert "different key metrics (mDice, top1)" in capsys.readouterr().err


def test_each_row_says_whether_it_beats_the_decoder_baseline_at_equal_wall_time(tmp_path, capsys, monkeypatch):
    """The decoder baseline's mDice reached 20 / 30 at 40 s / 90 s (histories give 10, 20, 30 by epoch): a run that
    took 60 s in all is held against 20, one that took 100 s against 30."""
    monkeypatch.setattr(compare, "launch", _refuse)
    runs = tmp_path / "runs"
    _fake_run(runs / "polyp_decoder", "decoder", "mDice", seconds=95.0, elapsed_s={"0": 5.0, "1": 40.0, "2": 90.0})
    _fake_run(runs / "polyp_fps", "fps", "mDice", seconds=60.0)  # best 30 > 20
    _fake_run(runs / "polyp_gps", "gps", "mDice", seconds=100.0)  # best 30, not above 30
    assert compare.main(["--collect", str(runs)]) == 0
    fps, gps, decoder = table_lines(capsys.readouterr().out)
    assert "| 20.000, yes |" in fps and "| 30.000, no |" in gps and "| (baseline) |" in decoder


@pytest.mark.parametrize("bundle,meta,key", [(ORGAN, "organ/metadata.json", "mDice"), (CLASSIFY, "classify/metadata.json", "top1")])
def test_organ_and_classify_bundles_get_their_metadata_and_own_folders(bundle, meta, key, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the bundles' own folders (runs/<task>_<method>) are relative to here
    commands = []

    def fake_launch(planned):  # what the bundle would leave: a finished metrics.json
        commands.append(planned.command)
        _fake_run(planned.output_dir, planned.method, key, seconds=3.0, trainable=10, tuned_percent=50.0 if planned.method != "full" else 100)
        return True, 0.1

    monkeypatch.setattr(compare, "launch", fake_launch)
    assert compare.main(["--config_file", str(bundle_files(bundle)), "--methods", "gps,full", "--epochs", "2"]) == 0
    assert all(c[c.index("--meta_file") + 1] == str(BUNDLES / meta) and c[c.index("--epochs") + 1] == "2" for c in commands)
    prefix = "organ_" if bundle == ORGAN else "classify_synthetic_"
    rows = json.loads((tmp_path / "runs" / "comparison.json").read_text())["rows"]
    assert [(r["run"], r["key_metric"]) for r in rows] == [(prefix + "gps", key), (prefix + "full", key)]


@pytest.mark.parametrize("argv,message", [
    (["--config_file", POLYP, "--methods", "fps,lottery"],
     "unknown method(s) lottery: the layers available are fps, gps, spt, partial, lora, full, random"),
    (["--config_file", "no/such/bundle.json"], "config file no/such/bundle.json does not exist"),
    (["--config_file", POLYP, "--epoch", "3"], "unknown setting(s) for this bundle: --epoch (did you mean --epochs"),
    (["--collect", "."], "--collect: no finished run below"),
])
def test_bad_input_is_one_line_before_any_run(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "launch", _refuse)
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_failed_run_is_named_and_the_others_are_still_compared(tmp_path, capsys, monkeypatch):
    def fake_launch(planned):  # gps crashes before its first validation; full finishes
        if planned.method == "gps":
            return False, 0.1
        _fake_run(planned.output_dir, planned.method, "mDice", seconds=3.0, trainable=10, tuned_percent=100.0)
        return True, 0.1

    monkeypatch.setattr(compare, "launch", fake_launch)
    assert compare.main(["--config_file", POLYP, "--methods", "gps,full", "--output_dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "[1/2] gps: FAILED" in captured.out and f"failed: gps ({tmp_path / 'gps'}/compare.log)" in captured.err
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["full"] and [x["ok"] for x in saved["runs"]] == [False, True]


@pytest.mark.parametrize("damage,reason", [(lambda text: text[: len(text) // 2], "not valid JSON, truncated or damaged"),
                                           (lambda text: "[1, 2]", "holds a JSON list, not a run's metrics object")])
def test_collect_names_an_unreadable_run_and_keeps_the_previous_comparison(damage, reason, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "launch", _refuse)
    runs = tmp_path / "runs"
    _fake_run(runs / "polyp_fps", "fps", "mDice", seconds=60.0, trainable=10, tuned_percent=1.0)
    _fake_run(runs / "polyp_full", "full", "mDice", seconds=90.0, trainable=1000, tuned_percent=100.0)
    assert compare.main(["--collect", str(runs)]) == 0
    capsys.readouterr()
    before = {name: (runs / name).read_bytes() for name in ("comparison.json", "comparison.png")}
    metrics = runs / "polyp_full" / "metrics.json"
    metrics.write_text(damage(metrics.read_text()))

    assert compare.main(["--collect", str(runs)]) == 1
    captured = capsys.readouterr()
    fps, full = table_lines(captured.out)
    assert fps.startswith("| fps |") and full.startswith(f"| polyp_full | unreadable: metrics.json {reason}")
    assert full.endswith("| polyp_full |") and full.count("|") == fps.count("|")
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and str(metrics) in err[0] and reason in err[0]
    assert {name: (runs / name).read_bytes() for name in before} == before  # the comparison of both runs stays


def test_collect_with_only_unreadable_runs_is_one_line_naming_them(tmp_path, capsys):
    (tmp_path / "polyp_fps").mkdir()
    (tmp_path / "polyp_fps" / "metrics.json").write_text('{"method": "fps", "history": [{"epo')
    assert compare.main(["--collect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "polyp_fps" / "metrics.json") in err[0] and "truncated" in err[0]
    assert not (tmp_path / "comparison.json").exists()


def test_collect_leaves_out_a_run_not_validated_yet_without_an_error(tmp_path, capsys):
    _fake_run(tmp_path / "polyp_fps", "fps", "mDice", seconds=60.0, trainable=10, tuned_percent=1.0)
    (tmp_path / "polyp_gps").mkdir()
    (tmp_path / "polyp_gps" / "metrics.json").write_text(json.dumps({"method": "gps", "history": []}))
    assert compare.main(["--collect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"left out {tmp_path / 'polyp_gps'}: unfinished (no validation yet)" in out
    assert [r["method"] for r in json.loads((tmp_path / "comparison.json").read_text())["rows"]] == ["fps"]
