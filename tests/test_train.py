"""Training: option parsing, the model each stage builds, stage-2 gradient control, the joint loss going down."""
from dataclasses import asdict

import pytest
import torch

from cola import Cola
from common import UserError, save_checkpoint
from config import build_configs
from train import build_model, make_optimizer
from tests.helpers import perturb

TINY = ["--vae.width=32", "--vae.n_head=2", "--vae.n_enc_layer=1", "--vae.n_dec_layer=1", "--vae.mask_ratio=0.2", "--vae_lr_ratio=1",
        "--dit.width=32", "--dit.n_head=2", "--dit.n_layer=1", "--dit.block_size=4"]


def test_build_configs_presets_and_overrides(capsys):
    cfgs = build_configs(["--config=small", "--vae.beta=0.5", "--lr=1e-3", "--fm_grad_to_encoder=true"])
    assert cfgs["vae"].tokenizer == "gpt2" and cfgs["dit"].n_layer == 12
    assert cfgs["vae"].beta == 0.5 and cfgs["train"].lr == 1e-3 and cfgs["train"].fm_grad_to_encoder is True
    assert "override: vae.beta = 0.5" in capsys.readouterr().out


def test_bare_boolean_flags():
    assert build_configs(["--resume"])["train"].resume is True
    assert build_configs(["--fm_grad_to_encoder", "--compile=false"])["train"].fm_grad_to_encoder is True
    assert build_configs(["--overwrite"])["train"].overwrite is True


@pytest.mark.parametrize("bad", [["--nope=1"], ["--vae.nope=1"], ["--lr=abc"], ["--max_iters=1.5"], ["lr=1"],
                                 ["--config=huge"], ["--stage=both"], ["--dit.latent_dim=8"], ["--init=x.pt"],
                                 ["--eval_interval=0"], ["--vae.n_head=3"], ["--lr"], ["--resume=maybe"],
                                 ["--resume", "--overwrite"], ["--nope"], ["--dit.patch_size=3"], ["--dit.patch_size=0"]])
def test_build_configs_rejects(bad):
    with pytest.raises(UserError):
        build_configs(bad)


def joint_model(tmp_path, *args):
    """Stage 2 built by the trainer's own path: a stage-1 checkpoint on disk -> build_model("joint")."""
    cfgs = build_configs(TINY + ["--stage=joint", f"--init={tmp_path / 'vae.pt'}"] + list(args))
    stage1 = build_model("vae", cfgs)
    perturb(stage1.vae, scale=0.02)
    save_checkpoint(dict(config={k: asdict(v) for k, v in cfgs.items()}, vae=stage1.vae.state_dict()),
                    str(tmp_path / "vae.pt"))
    model = build_model("joint", cfgs)
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), stage1.vae.state_dict().values()))
    perturb(model.dit, scale=0.02)  # past the zero init, so gradients can flow through the DiT
    return model, cfgs


@pytest.mark.parametrize("flag", [False, True])
def test_fm_gradient_reaches_encoder_only_with_flag(tmp_path, flag):
    model, _ = joint_model(tmp_path, f"--fm_grad_to_encoder={flag}", "--lambda_vae=0", "--lambda_ref=0")  # FM alone
    loss, stats = model(torch.randint(0, 256, (2, 16)))
    loss.backward()
    enc_grad = sum(p.grad.abs().sum().item() for p in model.vae.encoder.parameters() if p.grad is not None)
    assert (enc_grad > 0) == flag
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dit.parameters())
    assert all(p.grad is None for p in model.ref.parameters())  # the reference encoder is frozen


def test_joint_steps_reduce_loss(tmp_path):
    model, cfgs = joint_model(tmp_path, "--lr=3e-3")
    opt = make_optimizer(model, cfgs["train"], "cpu")
    x = torch.randint(0, 256, (4, 16))

    def loss_at_fixed_noise():
        torch.manual_seed(123)
        with torch.no_grad():
            return model(x)[0].item()

    before = loss_at_fixed_noise()
    for _ in range(30):
        loss, _ = model(x)
        opt.zero_grad(); loss.backward(); opt.step()
    after = loss_at_fixed_noise()
    assert after < 0.9 * before, (before, after)


def test_frozen_vae_gets_no_updates(tmp_path):
    model, cfgs = joint_model(tmp_path, "--vae_lr_ratio=0")
    opt = make_optimizer(model, cfgs["train"], "cpu")
    vae_params = {id(p) for p in model.vae.parameters()}
    assert not any(id(p) in vae_params for g in opt.param_groups for p in g["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.dit.parameters())
    before = [p.clone() for p in model.vae.parameters()]
    loss, stats = model(torch.randint(0, 256, (2, 16)))
    loss.backward(); opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.vae.parameters()))
    assert set(stats) == {"fm", "loss"}


def test_flops_counters_follow_the_architecture():
    cfgs = build_configs(["--vae_lr_ratio=1", "--dit.block_size=16"])  # joint stage 2
    stage1, stage2 = Cola.build(cfgs, "vae"), Cola.build(cfgs, "joint")
    f1, f2 = stage1.flops(128), stage2.flops(128)
    enc = stage1.vae.flops(128)["enc"]
    dit_tok = stage2.dit.flops(64)
    # stage 2 = stage 1 + the reference encoder's forward + forward and backward of the DiT over 2 copies
    assert f2["train"] == pytest.approx(f1["train"] + enc + 3 * 2 * dit_tok)
    # sampling: CFG doubles the DiT passes of the Euler steps; twice the steps, twice that part
    g1, g7 = stage2.flops(128, steps=16, cfg_scale=1.0)["sample"], stage2.flops(128, steps=16, cfg_scale=7.0)["sample"]
    assert g7 - g1 == pytest.approx(16 * dit_tok)
    assert stage2.flops(128, steps=32, cfg_scale=1.0)["sample"] - g1 == pytest.approx(16 * dit_tok)
    # a transformer forward is ~2 FLOPs per weight (matmuls) plus attention: check the DiT against its size
    n = sum(p.numel() for b in stage2.dit.blocks for n_, p in b.named_parameters() if "ada" not in n_)
    assert 2 * n < dit_tok < 2 * n * 1.2


def test_help_lists_every_option(capsys):
    from train import main
    main(["--help"])
    out = capsys.readouterr().out
    assert "--vae_lr_ratio=0.0" in out and "--dit.self_cond=False" in out and "--flow.t_loc=1.0" in out


def test_stage2_may_change_the_dit_block_size_not_the_vaes(tmp_path):
    from common import load_vae_state
    cfgs = build_configs(TINY)
    save_checkpoint(dict(config={k: asdict(v) for k, v in cfgs.items()}, vae=build_model("vae", cfgs).vae.state_dict()),
                    str(tmp_path / "vae.pt"))
    assert load_vae_state(str(tmp_path / "vae.pt"), build_configs(TINY + ["--dit.block_size=2"])["vae"])
    with pytest.raises(UserError, match="block_size"):  # the VAE's attention was trained with its blocks
        load_vae_state(str(tmp_path / "vae.pt"), build_configs(TINY + ["--vae.block_size=2"])["vae"])


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_gpu_presets_keep_the_papers_block_size_and_joint_vae(preset):
    cfgs = build_configs([f"--config={preset}"])
    assert cfgs["dit"].block_size == 16 and cfgs["train"].vae_lr_ratio == 1.0
    tiny = build_configs([])
    assert tiny["dit"].block_size == 1 and tiny["train"].vae_lr_ratio == 0.0  # what won on bytes (RESULTS.md)
