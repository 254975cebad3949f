"""
Text -> token ids on every core, streamed: how data/prepare.py tokenizes (a module, not a script).
Text is cut into chunks where every tokenizer always ends a token, so the chunks' ids, joined, are
the ids of the whole (token_chunks). Tasks of about TASK_CHARS characters go to a pool of processes, at
most 2 per worker in flight, and come back in order (encode_stream): the input is pulled only as fast
as it is encoded, so memory stays bounded, and the output is the same for any number of workers.
"""
import collections
import contextlib
import multiprocessing
import re
import signal
import sys

import numpy as np

TASK_CHARS = 1_000_000  # text per tokenization task
# a non-space character followed by a space: GPT-2's pre-tokenizer regex and cl100k's (OLMo 2's) always
# end a piece there, so text cut at such points encodes to exactly the ids of the whole. Not before any
# whitespace: cl100k keeps line breaks with the punctuation before them ("!\n" is one piece)
TOKEN_BOUNDARY = re.compile(r"\S(?= )")


def token_chunks(text, start=0, end=None, size=None):
    """text[start:end] -> (chunk, last?) for chunks of about `size` characters (default TASK_CHARS),
    cut only at TOKEN_BOUNDARY: their encodings, joined, are exactly the encoding of text[start:end]."""
    end, size = len(text) if end is None else end, size or TASK_CHARS
    while end - start > size and (m := TOKEN_BOUNDARY.search(text, start + size, end)):
        yield text[start:m.end()], False
        start = m.end()
    yield text[start:end], True


def encode_task(tok, dtype, task):
    """[(text, append <|endoftext|>?)] -> [ids as a dtype array] for each."""
    return [np.array(tok.encode(text) + [tok.eot] * eot, dtype=dtype) for text, eot in task]


# Pool.terminate ends workers with SIGTERM, so they must take its default action. A forked worker
# inherits this process's handler, and one that only notes the signal (as a training run's
# common.StopFlag does, left behind by a run in the same process) would keep it alive: the pool would
# never end. So the handler is reset around the fork (make_pool) and again in the worker, for workers
# the pool forks later to replace dead ones.
_worker = {}


def init_worker(tok, dtype):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which ends the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker.update(tok=tok, dtype=dtype)


def encode_in_worker(task):
    return encode_task(_worker["tok"], _worker["dtype"], task)


def make_pool(tok, dtype, workers):
    """A pool of `workers` tokenizing processes as a context manager (None for one worker: encode
    here), forked where possible so the workers share what this process has loaded."""
    if workers == 1:
        return contextlib.nullcontext()
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return ctx.Pool(workers, init_worker, (tok, dtype))
    finally:
        signal.signal(signal.SIGTERM, handler)


def encode_stream(segments, tok, dtype, pool=None, workers=1):
    """(key, text, append <|endoftext|>?) -> (key, ids) for every segment, in order, on a pool of
    `workers` processes (or here, without one)."""
    def tasks():
        keys, task, n = [], [], 0
        for key, text, eot in segments:
            keys.append(key)
            task.append((text, eot))
            n += len(text)
            if n >= TASK_CHARS:
                yield keys, task
                keys, task, n = [], [], 0
        if task:
            yield keys, task

    pending = collections.deque()
    for keys, task in tasks():
        if pool is None:
            yield from zip(keys, encode_task(tok, dtype, task))
            continue
        pending.append((keys, pool.apply_async(encode_in_worker, (task,))))
        while len(pending) >= 2 * workers or (pending and pending[0][1].ready()):
            keys, result = pending.popleft()
            yield from zip(keys, result.get())
    for keys, result in pending:
        yield from zip(keys, result.get())
