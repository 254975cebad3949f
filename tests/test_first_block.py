"""The first generated block's modes (paper Table 5): clean-condition repaint, partial repaint, padding."""
import math

import pytest
import torch

import cola
from cola import parse_first_block
from flow import euler_repaint, renoise, time_grid
from tests.helpers import generate_blocks
from tests.test_sample import random_cola

PROMPTS = [list(b"Hello, wor"), list(b"ab"), list(b"abcd"), []]  # tails of 2, 2, 0 (whole block), 0 (empty)


def test_clean_condition_keeps_the_prompt_tail_bit_identical():
    model = random_cola()
    _, _, tail, keep, _ = model.prompt_layout(PROMPTS)
    _, blocks = generate_blocks(model, PROMPTS, max_new_tokens=6, steps=5, cfg_scale=7.0, seed=2)
    z_first = blocks[0][0]  # (B, bs, d): the first block's latents after the last Euler step
    assert keep.sum() == 4
    assert torch.equal(z_first[keep], tail[keep])  # bit for bit: the encoder's clean latents
    assert not torch.equal(z_first[~keep], tail[~keep])


def test_partial_repaint_renoises_the_known_region_to_the_current_t():
    torch.manual_seed(0)
    B, L, d, steps = 2, 4, 3, 6
    known = torch.randn(B, L, d)
    keep = torch.tensor([[True, True, False, False], [False] * 4])  # the second row knows nothing
    drawn, calls = [], []

    def noise(like):
        drawn.append(torch.randn_like(like))
        return drawn[-1]

    def velocity(z, t):
        calls.append((z.clone(), t, len(drawn)))
        return 0.3 * z + t  # any smooth field

    for reps, frac in ((1, 1.0), (3, 1.0), (3, 0.5), (1, 0.3)):
        drawn.clear(); calls.clear()
        z0 = torch.randn(B, L, d)
        euler_repaint(velocity, z0, known, keep, steps, reps, frac, noise)
        guided = math.ceil(frac * steps)
        assert len(calls) == guided * reps + steps - guided
        ts = time_grid(steps)[0]
        step_of = [i for i in range(steps) for _ in range(reps if i < guided else 1)]
        for (z, t, n_drawn), i in zip(calls, step_of):
            assert t == ts[i]
            if i < guided:  # the known positions sit exactly on the path at the current t
                eps = drawn[n_drawn - 1]  # the draw made for this very call
                assert torch.allclose(z[keep], ((1 - t) * known + t * eps)[keep], atol=1e-6)
            elif i == guided:  # then they move freely: no reset after the guided fraction
                assert not torch.allclose(z[keep], ((1 - t) * known)[keep], atol=1e-3)


def test_partial_repaint_rows_without_known_positions_are_plain_euler():
    torch.manual_seed(0)
    z0, keep = torch.randn(3, 4, 2), torch.zeros(3, 4, dtype=torch.bool)
    keep[0, :2] = True
    field = lambda z, t: z * (1 - t) - 0.5
    out = euler_repaint(field, z0, torch.zeros_like(z0), keep, 5, reps=3, frac=1.0)
    ts, dts = time_grid(5)
    ref = z0[1:]
    for i in range(5):
        ref = ref - dts[i] * field(ref, ts[i])
    assert torch.allclose(out[1:], ref, atol=1e-6)


def test_renoise_lands_on_the_path_marginal():
    torch.manual_seed(0)
    z0 = torch.tensor([1.5, -2.0])
    s, t, n = 0.3, 0.7, 200_000
    z_s = (1 - s) * z0 + s * torch.randn(n, 2)
    z_t = renoise(z_s, s, t, torch.randn(n, 2))
    assert torch.allclose(z_t.mean(0), (1 - t) * z0, atol=0.01)
    assert torch.allclose(z_t.std(0), torch.full((2,), t), atol=0.01)


@pytest.mark.parametrize("mode", ["left_pad", "right_pad"])
def test_padding_puts_the_prompt_where_it_says(mode, monkeypatch):
    model, bs = random_cola(), 4
    # noise by batch index (not by prompt content, the default), so padded and unpadded calls draw alike
    monkeypatch.setattr(cola, "sample_generators",
                        lambda prompts, seed, dev: [torch.Generator(dev).manual_seed(100 * seed + i)
                                                    for i in range(len(prompts))])
    eot = model.tok.eot
    seen = []
    layout = model.prompt_layout
    model.prompt_layout = lambda prompts, window=None: (seen.append(prompts), layout(prompts, window))[1]
    out = model.generate(PROMPTS, max_new_tokens=6, steps=3, seed=4, first_block=mode, stop_at_eot=False)
    padded = seen[0]
    for p, q in zip(PROMPTS, padded):
        n = -len(p) % bs
        assert len(q) % bs == 0 and len(q) == len(p) + n
        assert q == ([eot] * n + p if mode == "left_pad" else p + [eot] * n)
    _, _, _, keep, start = layout(padded)
    assert not keep.any() and (start % bs == 0).all()  # no block shared by prompt and continuation
    # the same as clean conditioning on the padded prompt (which then has no tail to pin)
    model.prompt_layout = layout
    assert out == model.generate(padded, max_new_tokens=6, steps=3, seed=4, stop_at_eot=False)


@pytest.mark.parametrize("first_block", ["repaint", "repaint:3:0.7", "left_pad", "right_pad"])
def test_every_mode_caches_exactly_and_ignores_the_batch(first_block):
    model = random_cola()
    kw = dict(max_new_tokens=9, steps=3, cfg_scale=5.0, seed=1, first_block=first_block)
    cached, free = model.generate(PROMPTS, **kw), model.generate(PROMPTS, use_cache=False, **kw)
    assert cached == free
    assert [model.generate([p], **kw)[0] for p in PROMPTS] == cached


def test_partial_repaint_differs_from_clean_only_where_the_prompt_ends_mid_block():
    model = random_cola()
    kw = dict(max_new_tokens=8, steps=4, seed=6, stop_at_eot=False)
    _, clean = generate_blocks(model, PROMPTS, **kw)
    _, rep = generate_blocks(model, PROMPTS, first_block="repaint:1:1.0", **kw)
    _, _, tail, keep, _ = model.prompt_layout(PROMPTS)
    for i, (zc, _), (zr, _) in zip(range(3), clean, rep):
        assert torch.allclose(zc[2:], zr[2:], atol=1e-5)  # whole-block and empty prompts: nothing to repaint
        if i == 0:  # tails inside the first block: another sampler, but the prompt's own latents enter the history
            assert not torch.allclose(zc[:2][~keep[:2]], zr[:2][~keep[:2]], atol=1e-3)
            assert torch.equal(zr[keep], tail[keep])


@pytest.mark.parametrize("spec, parsed", [("clean", ("clean", 1, 1.0)), ("repaint", ("repaint", 1, 1.0)),
                                          ("repaint:3", ("repaint", 3, 1.0)), ("repaint:3:0.3", ("repaint", 3, 0.3)),
                                          ("left_pad", ("left_pad", 1, 1.0))])
def test_parse_first_block(spec, parsed):
    assert parse_first_block(spec) == parsed


@pytest.mark.parametrize("bad", ["dirty", "repaint:0", "repaint:1:0", "repaint:1:1.5", "left_pad:2", "repaint:x",
                                 "repaint:1:1:1"])
def test_parse_first_block_rejects(bad):
    with pytest.raises(ValueError):
        parse_first_block(bad)
