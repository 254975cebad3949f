"""Training: option parsing, stage-2 gradient control, the joint loss going down."""
import copy

import pytest
import torch

from common import UserError
from dit import DiT, DiTConfig
from flow import FlowConfig
from train import Cola, TrainConfig, build_configs, make_optimizer
from vae import TextVAE, VAEConfig
from tests.helpers import perturb


def test_build_configs_presets_and_overrides(capsys):
    cfgs = build_configs(["--config=small", "--vae.beta=0.5", "--lr=1e-3", "--fm_grad_to_encoder=true"])
    assert cfgs["vae"].tokenizer == "gpt2" and cfgs["dit"].n_layer == 12
    assert cfgs["vae"].beta == 0.5 and cfgs["train"].lr == 1e-3 and cfgs["train"].fm_grad_to_encoder is True
    assert "override: vae.beta = 0.5" in capsys.readouterr().out
    for bad in (["--nope=1"], ["--vae.nope=1"], ["--lr=abc"], ["--max_iters=1.5"], ["lr=1"], ["--config=huge"],
                ["--stage=both"], ["--dit.latent_dim=8"], ["--init_vae=x.pt"], ["--eval_interval=0"],
                ["--vae.n_head=3"]):
        with pytest.raises(UserError):
            build_configs(bad)


def joint_model(fm_grad_to_encoder=False, vae_lr_ratio=1.0):
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2, mask_ratio=0.2))
    dit = DiT(DiTConfig(n_layer=1, width=32, n_head=2, block_size=4))
    perturb(dit, scale=0.02)  # past the zero init, so gradients can flow through the DiT
    tc = TrainConfig(fm_grad_to_encoder=fm_grad_to_encoder, vae_lr_ratio=vae_lr_ratio)
    return Cola(vae, dit, copy.deepcopy(vae), tc, FlowConfig())


@pytest.mark.parametrize("flag", [False, True])
def test_fm_gradient_reaches_encoder_only_with_flag(flag):
    model = joint_model(fm_grad_to_encoder=flag, vae_lr_ratio=1.0)
    model.tc.lambda_vae = model.tc.lambda_ref = 0.0  # the FM term alone
    x = torch.randint(0, 256, (2, 16))
    loss, stats = model(x)
    loss.backward()
    enc_grad = sum(p.grad.abs().sum().item() for p in model.vae.encoder.parameters() if p.grad is not None)
    assert (enc_grad > 0) == flag
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dit.parameters())
    assert all(p.grad is None for p in model.ref.parameters())  # the reference encoder is frozen


def test_joint_steps_reduce_loss():
    model = joint_model()
    opt = make_optimizer(model, TrainConfig(lr=3e-3), "cpu")
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


def test_frozen_vae_gets_no_updates():
    model = joint_model(vae_lr_ratio=0.0)
    model.vae.requires_grad_(False)
    opt = make_optimizer(model, model.tc, "cpu")
    assert all(id(p) not in {id(q) for q in model.vae.parameters()} for g in opt.param_groups for p in g["params"])
    before = [p.clone() for p in model.vae.parameters()]
    loss, stats = model(torch.randint(0, 256, (2, 16)))
    loss.backward(); opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.vae.parameters()))
    assert set(stats) == {"fm", "loss"}
