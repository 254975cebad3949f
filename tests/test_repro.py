"""repro.py and studies.py: every study at --quick size, reuse, continuing after an interruption, the verdicts."""
import json
import os
import shutil

import pytest

import repro
import studies
import train
from common import UserError
from data import prepare


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro_corpus")
    (root / "c.txt").write_text("\n\n".join(f"Chapter {i}. Call me Ishmael, said Mr. Darcy to the whale in the sea, "
                                            f"and she laughed at him." for i in range(300)))
    for name, tok in (("b", "bytes"), ("g", "gpt2")):
        prepare.main(["--input", str(root / "c.txt"), "--name", name, "--tokenizer", tok, "--out_dir", str(root)])
    return [f"--dataset={root / 'b'}", f"--gpt2_dataset={root / 'g'}"]


@pytest.fixture(scope="module")
def all_quick(corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    repro.main(["all", "--quick", f"--out={out}"] + corpora)
    return out


def test_every_study_runs_and_writes_its_table(all_quick):
    for name, study in studies.STUDIES.items():
        res = json.load(open(all_quick / f"{name}.json"))
        assert [r["label"] for r in res["rows"]] == [s.label for s in study.settings]
        assert (all_quick / f"{name}.md").read_text().startswith(f"## {name}:")
        for r in res["rows"]:
            assert r["ci"][0] <= r["ours"] <= r["ci"][1]
            assert r["verdict"] in ("agrees", "disagrees", "inconclusive", "reference", "-")
            assert r["n"] == 4  # prompts, or held-out windows (robustness)
    first = json.load(open(all_quick / "first_block.json"))
    assert {r["opts"]["first_block"] for r in first["rows"]} >= {"clean", "repaint:3:0.3", "left_pad", "right_pad"}
    summary = (all_quick / "SUMMARY.md").read_text()
    assert all(f"| {name} |" in summary for name in studies.STUDIES)


def test_plots_where_matplotlib_is_installed(all_quick):
    pytest.importorskip("matplotlib")  # optional: not in requirements.txt
    assert all((all_quick / f"{name}.png").stat().st_size > 1000 for name in studies.STUDIES)


def test_a_finished_study_only_re_reports(all_quick, corpora, monkeypatch):
    before = json.load(open(all_quick / "cfg.json"))
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"retrained: {argv}"))
    monkeypatch.setattr(repro.evaluate, "main", lambda argv: pytest.fail(f"re-measured: {argv}"))
    repro.main(["cfg", "--quick", f"--out={all_quick}"] + corpora)
    after = json.load(open(all_quick / "cfg.json"))
    assert [r["ours"] for r in after["rows"]] == [r["ours"] for r in before["rows"]]


def test_an_interrupted_study_continues_where_it_stopped(all_quick, corpora, tmp_path, monkeypatch):
    real = train.main
    monkeypatch.setattr(train, "main", lambda argv: real(argv + ["--stop_after=2"]))  # as if killed after 2 steps
    with pytest.raises(UserError, match="stopped before its end"):
        repro.main(["steps", "--quick", f"--out={tmp_path}"] + corpora)
    assert (tmp_path / "runs" / "base" / "ckpt.pt").exists() and not (tmp_path / "steps.json").exists()
    monkeypatch.setattr(train, "main", real)
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: (calls.append(argv), real(argv))[1])
    repro.main(["steps", "--quick", f"--out={tmp_path}"] + corpora)
    assert calls and all("--resume" in argv for argv in calls)  # continued, not restarted
    ours, ref = (json.load(open(p / "steps.json"))["rows"] for p in (tmp_path, all_quick))
    assert [r["ours"] for r in ours] == [r["ours"] for r in ref]  # exactly as without the interruption


def test_a_run_made_with_other_options_is_not_reused(all_quick, corpora, tmp_path):
    out = tmp_path / "res"
    os.makedirs(out / "runs")
    os.symlink(all_quick / "runs" / "base", out / "runs" / "base")
    with pytest.raises(UserError, match="other options|another run"):  # same name, other config: refused
        repro.main(["cfg", "--quick", f"--out={out}", "--config=small"] + corpora)


@pytest.mark.parametrize("direction, lo, hi, want", [
    ("<", -0.2, -0.01, "agrees"), ("<", 0.01, 0.2, "disagrees"), ("<", -0.1, 0.1, "inconclusive"),
    (">", 0.01, 0.2, "agrees"), (">", -0.2, -0.01, "disagrees"), (">", -0.1, 0.1, "inconclusive"),
    ("~", -0.01, 0.015, "agrees"), ("~", 0.03, 0.1, "disagrees"), ("~", -0.01, 0.05, "inconclusive")])
def test_verdict(direction, lo, hi, want):
    assert studies.verdict(direction, lo, hi, margin=0.02) == want


def test_paper_direction_and_intervals():
    ref = studies.Setting("w = 7", "base", paper=31.3)
    assert studies.paper_direction(studies.Setting("w = 1", "base", paper=13.7), ref) == "<"
    assert studies.paper_direction(studies.Setting("32 steps", "base", paper=32.2), ref) == "~"  # within a point
    assert studies.paper_direction(studies.Setting("x", "base"), ref) is None
    m, lo, hi = studies.mean_ci([0.0, 1.0] * 50)
    assert m == 0.5 and hi - lo == pytest.approx(2 * 1.984 * 0.5025 / 10, rel=1e-3)  # t(99) = 1.984
    assert studies.t975(3) == pytest.approx(3.182, abs=0.13) and studies.t975(10) == pytest.approx(2.228, abs=0.004)


def test_measurements_follow_the_judge(all_quick, corpora, monkeypatch):
    calls = []
    real = repro.evaluate.main
    monkeypatch.setattr(repro.evaluate, "main", lambda argv: (calls.append(argv), real(argv))[1])
    repro.main(["steps", "--quick", f"--out={all_quick}", "--judge=ar"] + corpora)  # trains the AR baseline
    assert len(calls) == 6  # measured again: the earlier ones had no judge
    res = json.load(open(all_quick / "steps.json"))
    assert all(r["judge_bpb"] > 0 for r in res["rows"]) and "bpb_diff_ci" in res["rows"][0]
    copy = all_quick / "judge_copy.pt"
    shutil.copy(all_quick / "runs" / "ar" / "ckpt.pt", copy)
    repro.main(["steps", "--quick", f"--out={all_quick}", f"--judge={copy}"] + corpora)
    assert len(calls) == 6  # the same judge under another name: nothing to measure again


def test_list_names_every_study(capsys):
    repro.main(["list"])
    out = capsys.readouterr().out
    assert all(name in out for name in studies.STUDIES)
    with pytest.raises(UserError, match="unknown study"):
        repro.main(["nope", "--quick"])
    with pytest.raises(UserError, match="--seeds must be >= 1"):  # one `error:` line, not argparse's usage text
        repro.main(["cfg", "--seeds=0"])
