"""
The released Cola DLM checkpoint (github ByteDance-Seed/Cola-DLM, the 2000-EFLOPs run of the paper's
RQ4) read into this project's models. Nothing is executed: configs come from JSON, weights from
safetensors. The layout, as the authors publish it:

    DIR/cola_vae/config.json   model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    DIR/cola_dit/config.json   the same
    DIR/tokenizer.json         OLMo 2's tokenizer, read through tiktoken (data/tokenizer.py); or DIR/../tokenizer.json,
                               where the authors' README puts it

Every field of the released config classes is honoured (it maps to a VAEConfig / DiTConfig field, or is
the one value this code implements) or refused with its name; every weight in the files is consumed.
Used by cola.Cola.from_pretrained and, for train.py --init=DIR, config.build_configs.
"""
import json
import mmap
import os

import torch

from common import UserError
from dit import DiTConfig
from vae import VAEConfig

# released field -> (our field, the released class's default); None: a value this code implements, only that one
VAE_FIELDS = dict(
    encoder_num_blocks=("n_enc_layer", 4), decoder_num_blocks=("n_dec_layer", 4), dim=("width", 1536),
    num_heads=("n_head", 12), ffn_dim=("ffn_dim", 6144), latent_dim=("latent_dim", 16),
    block_causal=("block_causal", True), block_size=("block_size", 4), rope_theta=("rope_theta", 500000),
    layer_norm_eps=("norm_eps", 1e-6), scaling_factor=("scaling_factor", 1.0), shifting_factor=("shifting_factor", 0.0),
    vocab_size=(None, 100278), patch_size=(None, 1), shared_heads_kv=(None, 1), encoder_last_ln=(None, True),
    layer_norm_type=(None, "layer_norm"), layer_norm_affine=(None, True), post_norm=(None, True), qk_bias=(None, False),
    qk_norm=(None, True), qk_norm_affine=(None, True), clip_qkv=(None, None), rope_full_precision=(None, True),
    bias=(None, True), dropout=(None, 0.0), attn_dropout=(None, 0.0), act=(None, "swiglu"), causal=(None, False),
    use_variation=(None, True), use_emb=(None, True))
DIT_FIELDS = dict(
    txt_in_channels=("latent_dim", 16), num_layers=("n_layer", 24), txt_dim=("width", 2048), heads=("n_head", 16),
    rope_dim=("rope_dim", 96), expand_ratio=("mlp_ratio", 4), norm_eps=("norm_eps", 1e-5), block_size=("block_size", 4),
    txt_out_channels=(None, 16), emb_dim=(None, 2048), head_dim=(None, 128), patch_size=(None, 1), qk_bias=(None, False))
# the architecture: our fields a released config sets (train.py --init=DIR keeps them)
ARCH = dict(vae=[ours for ours, _ in VAE_FIELDS.values() if ours] + ["tokenizer", "logvar_min", "logvar_max"],
            dit=[ours for ours, _ in DIT_FIELDS.values() if ours])
# how fresh weights were drawn (nothing to do for loaded ones), and what Hugging Face adds to every config
IGNORED = {"init_fn", "init_std", "init_cutoff_factor", "architectures", "model_type", "dtype", "torch_dtype",
           "transformers_version", "_name_or_path"}
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def read_config(path, fields, cls):
    """config.json -> a cls (VAEConfig / DiTConfig) of its fields, every other released field checked."""
    raw = read_json(path)
    unknown = set(raw) - set(fields) - IGNORED
    if unknown:
        raise UserError(f"{path}: unknown fields {', '.join(sorted(unknown))}")
    cfg, values = cls(), {name: raw.get(name, default) for name, (_, default) in fields.items()}
    for name, (ours, default) in fields.items():
        if ours is not None:
            setattr(cfg, ours, type(getattr(cfg, ours))(values[name]))
        elif name not in ("vocab_size", "txt_out_channels", "emb_dim", "head_dim") and values[name] != default:
            raise UserError(f"{path}: {name}={values[name]!r} is not supported (only {default!r})")
    derived = dict(txt_out_channels=values.get("txt_in_channels"), emb_dim=values.get("txt_dim"),
                   head_dim=values.get("txt_dim", 0) // max(values.get("heads", 1), 1))
    for name, want in derived.items():
        if name in fields and values[name] != want:
            raise UserError(f"{path}: {name}={values[name]!r} is not supported (only {want!r}, from the other fields)")
    return cfg, values


def read_configs(path):
    """The VAEConfig and DiTConfig of a released checkpoint directory (tokenizer: path/tokenizer.json)."""
    from data.tokenizer import get_tokenizer
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a directory in the released layout (cola_vae/, cola_dit/, tokenizer.json)")
    vae, v = read_config(os.path.join(path, "cola_vae", "config.json"), VAE_FIELDS, VAEConfig)
    dit, d = read_config(os.path.join(path, "cola_dit", "config.json"), DIT_FIELDS, DiTConfig)
    vae.tokenizer = os.path.join(path, "tokenizer.json")
    if not os.path.exists(vae.tokenizer) and os.path.exists(os.path.join(path, os.pardir, "tokenizer.json")):
        vae.tokenizer = os.path.normpath(os.path.join(path, os.pardir, "tokenizer.json"))
    vocab = get_tokenizer(vae.tokenizer).vocab_size
    if v["vocab_size"] != vocab:
        raise UserError(f"{path}: cola_vae has vocab_size {v['vocab_size']}, tokenizer.json {vocab} tokens")
    if d["txt_in_channels"] != v["latent_dim"]:
        raise UserError(f"{path}: the DiT's txt_in_channels {d['txt_in_channels']} != the VAE's latent_dim {v['latent_dim']}")
    vae.logvar_min, vae.logvar_max = -30.0, 20.0  # the released posterior's clamp
    return vae, dit


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}. The format: 8 bytes (little-endian) giving the header's
    length, the header (JSON: name -> dtype, shape, data_offsets into what follows), the raw data."""
    try:
        with open(path, "rb") as f:  # mapped, not read: the tensors are views of the file until loaded
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.path.getsize(path) else b""
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    size = len(buf)
    n = int.from_bytes(buf[:8], "little") if size >= 8 else size
    try:
        header = json.loads(buf[8:8 + n]) if 8 + n <= size else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header is missing or malformed)")
    out, base = {}, 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name} has a malformed or unsupported header entry") from None
        count = (hi - lo) // dtype.itemsize
        if base + hi > size or lo > hi or count != torch.Size(shape).numel():
            raise UserError(f"{path}: tensor {name} lies outside the file or does not fill its shape (truncated?)")
        out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + lo).view(shape) if count \
            else torch.empty(shape, dtype=dtype)
    return out


def read_weights(path):
    """Every tensor of a released model directory: model.safetensors, or the shards its index names."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return read_safetensors(os.path.join(path, "model.safetensors"))
    state = {}
    for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
        state.update(read_safetensors(os.path.join(path, shard)))
    return state


def load_weights(model, path):
    """The weights of the released model directory path into model (a TextVAE or DiT), strictly: every
    tensor in the files is consumed, every parameter filled, every shape equal."""
    state = read_weights(path)
    for name in [k for k in state if k.endswith(".rope.rope.freqs")]:  # the DiT's RoPE frequencies: we compute them
        ours = 10000.0 ** (-torch.arange(0, model.rope_dim, 2, dtype=torch.float32) / model.rope_dim)
        if state[name].shape != ours.shape or not torch.allclose(state[name].float(), ours, rtol=1e-5):
            raise UserError(f"{path}: {name} holds RoPE frequencies other than theta 10000 over rope_dim {model.rope_dim}")
        del state[name]
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise UserError(f"{path}: weights missing: {', '.join(missing[:5]) or 'none'}; not in the model: "
                        f"{', '.join(unexpected[:5]) or 'none'}" + (" ..." if len(missing) + len(unexpected) > 10 else ""))
    for name, t in state.items():
        if t.shape != ours[name].shape:
            raise UserError(f"{path}: {name} has shape {tuple(t.shape)}, the config says {tuple(ours[name].shape)}")
    model.load_state_dict(state)
