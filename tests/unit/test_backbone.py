"""DINOv3 backbone import (Hugging Face folder, Meta checkpoint), ONNX parity, bad inputs; tiny random configs."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.errors import ConfigError  # noqa: E402
from trainer.backbone import (  # noqa: E402
    arch_from_filename,
    export_onnx,
    load_backbone,
    onnx_parity,
    torch_tokens,
)

PATCH = 16


def _hf_folder(tmp_path: Path, **overrides: object) -> Path:
    """A tiny random DINOv3ViTModel saved as a Hugging Face folder."""
    params: dict[str, object] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=160,
        num_register_tokens=4,
        patch_size=PATCH,
        layerscale_value=0.5,
    )
    params.update(overrides)
    torch.manual_seed(3)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**params))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return folder


def _inputs(patch: int = PATCH) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((n, 3, h * patch, w * patch)).astype(np.float32) for n, h, w in ((1, 5, 3), (2, 2, 9))]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # another patch size, no registers, a gated MLP, another RoPE base
        dict(patch_size=14, num_register_tokens=0, use_gated_mlp=True, hidden_act="silu", rope_theta=50.0),
    ],
    ids=["plain", "p14-gated-no-registers"],
)
def test_hf_folder_exports_with_parity_at_any_patch_multiple(tmp_path: Path, overrides: dict[str, object]) -> None:
    folder = _hf_folder(tmp_path, **overrides)
    loaded = load_backbone(folder)
    patch, registers = loaded.patch_size, loaded.num_register_tokens
    assert (patch, loaded.hidden_size, registers) == (overrides.get("patch_size", PATCH), 64, 4 if not overrides else 0)
    onnx_path = export_onnx(loaded.model, tmp_path / "model.onnx")
    # The reference is transformers' own model, loaded separately and run on the same pixels.
    reference = transformers.DINOv3ViTModel.from_pretrained(folder).eval()
    inputs = _inputs(patch)
    refs = []
    for pixels in inputs:
        with torch.no_grad():
            hidden = reference(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 1 + registers :].numpy()
        n, _, h, w = pixels.shape
        refs.append(hidden.reshape(n, h // patch, w // patch, -1))
    assert onnx_parity(onnx_path, inputs, refs) <= 1e-4


# --- a Meta checkpoint with the dinov3 repository's key names, and that repository's forward --------

Meta = namedtuple("Meta", "hidden depth heads registers ffn")


def _meta_state_dict(cfg: Meta, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under dinov3's key names (DinoVisionTransformer, mask_k_bias, layer scale)."""
    g = torch.Generator().manual_seed(seed)
    c = cfg.hidden

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    head_dim = c // cfg.heads
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    sd = {
        "cls_token": rnd(1, 1, c, scale=0.5),
        "storage_tokens": rnd(1, cfg.registers, c, scale=0.5),
        "mask_token": torch.zeros(1, c),
        "patch_embed.proj.weight": rnd(c, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rnd(c),
        "rope_embed.periods": periods,
        "norm.weight": 1 + rnd(c),
        "norm.bias": rnd(c),
        "local_cls_norm.weight": torch.ones(c),
        "local_cls_norm.bias": torch.zeros(c),
    }
    hidden = 4 * c
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        mask = torch.ones(3 * c)
        mask[c : 2 * c] = 0
        sd |= {
            b + "norm1.weight": 1 + rnd(c),
            b + "norm1.bias": rnd(c),
            b + "attn.qkv.weight": rnd(3 * c, c, scale=0.3),
            b + "attn.qkv.bias": rnd(3 * c),
            b + "attn.qkv.bias_mask": mask,
            b + "attn.proj.weight": rnd(c, c, scale=0.2),
            b + "attn.proj.bias": rnd(c),
            b + "ls1.gamma": 0.5 + rnd(c),
            b + "norm2.weight": 1 + rnd(c),
            b + "norm2.bias": rnd(c),
            b + "ls2.gamma": 0.5 + rnd(c),
        }
        if cfg.ffn == "mlp":
            sd |= {
                b + "mlp.fc1.weight": rnd(hidden, c, scale=0.2),
                b + "mlp.fc1.bias": rnd(hidden),
                b + "mlp.fc2.weight": rnd(c, hidden, scale=0.2),
                b + "mlp.fc2.bias": rnd(c),
            }
        else:
            d = int(hidden * 2 / 3)
            d += -d % 8
            sd |= {
                b + "mlp.w1.weight": rnd(d, c, scale=0.2),
                b + "mlp.w1.bias": rnd(d),
                b + "mlp.w2.weight": rnd(d, c, scale=0.2),
                b + "mlp.w2.bias": rnd(d),
                b + "mlp.w3.weight": rnd(c, d, scale=0.2),
                b + "mlp.w3.bias": rnd(c),
            }
    return sd


def _meta_forward(sd: dict[str, torch.Tensor], cfg: Meta, x: torch.Tensor) -> torch.Tensor:
    """dinov3's DinoVisionTransformer.forward_features (eval) written out: x_norm_patchtokens as (N, h, w, C)."""
    import torch.nn.functional as F

    c, heads = cfg.hidden, cfg.heads
    n, _, height, width = x.shape
    h, w = height // PATCH, width // PATCH
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    t = t.flatten(2).transpose(1, 2)
    cls = sd["cls_token"] + 0 * sd["mask_token"]
    t = torch.cat([cls.expand(n, -1, -1), sd["storage_tokens"].expand(n, -1, -1), t], dim=1)
    # RopePositionEmbedding(normalize_coords="separate"), eval: no shift/jitter/rescale
    ch = torch.arange(0.5, h) / h
    cw = torch.arange(0.5, w) / w
    coords = 2.0 * torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
    angles = (2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"][None, None, :]).flatten(1, 2).tile(2)
    sin, cos = torch.sin(angles), torch.cos(angles)

    def rope(q: torch.Tensor) -> torch.Tensor:
        prefix = q.shape[-2] - sin.shape[-2]
        body = q[:, :, prefix:]
        x1, x2 = body.chunk(2, dim=-1)
        return torch.cat([q[:, :, :prefix], body * cos + torch.cat([-x2, x1], dim=-1) * sin], dim=-2)

    for i in range(cfg.depth):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (c,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-5)
        bias = sd[b + "attn.qkv.bias"] * sd[b + "attn.qkv.bias_mask"]
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], bias).reshape(n, -1, 3, heads, c // heads)
        q, k, v = (z.transpose(1, 2) for z in torch.unbind(qkv, 2))
        a = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).reshape(n, -1, c)
        t = t + sd[b + "ls1.gamma"] * F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.layer_norm(t, (c,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-5)
        if cfg.ffn == "mlp":
            y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), *_wb(sd, b + "mlp.fc2"))
        else:
            y = F.silu(F.linear(y, *_wb(sd, b + "mlp.w1"))) * F.linear(y, *_wb(sd, b + "mlp.w2"))
            y = F.linear(y, *_wb(sd, b + "mlp.w3"))
        t = t + sd[b + "ls2.gamma"] * y
    t = F.layer_norm(t, (c,), sd["norm.weight"], sd["norm.bias"], eps=1e-5)
    return t[:, 1 + cfg.registers :].reshape(n, h, w, c)


def _wb(sd: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return sd[prefix + ".weight"], sd[prefix + ".bias"]


@pytest.mark.parametrize("cfg", [Meta(48, 2, 3, 4, "mlp"), Meta(64, 3, 2, 2, "swiglu")], ids=["mlp", "swiglu"])
def test_meta_checkpoint_maps_onto_transformers(tmp_path: Path, cfg: Meta) -> None:
    sd = _meta_state_dict(cfg)
    path = tmp_path / "dinov3_vittiny16_pretrain_test-00000000.pth"
    torch.save(sd, path)
    loaded = load_backbone(path)
    assert loaded.arch == "dinov3_vittiny16"
    assert (loaded.hidden_size, loaded.num_register_tokens) == (cfg.hidden, cfg.registers)
    assert loaded.model.config.num_attention_heads == cfg.heads
    onnx_path = export_onnx(loaded.model, tmp_path / "model.onnx")
    inputs = _inputs()
    with torch.no_grad():
        refs = [_meta_forward(sd, cfg, torch.from_numpy(p)).numpy() for p in inputs]
    assert np.abs(torch_tokens(load_backbone(path).model, inputs[1]) - refs[1]).max() <= 1e-4
    assert onnx_parity(onnx_path, inputs, refs) <= 1e-4


def test_a_meta_checkpoint_without_registers_or_layer_scale(tmp_path: Path) -> None:
    cfg = Meta(48, 2, 3, 4, "mlp")
    sd = _meta_state_dict(cfg)
    del sd["storage_tokens"]
    for key in [k for k in sd if ".ls" in k]:
        del sd[key]
    torch.save(sd, tmp_path / "checkpoint.pth")
    loaded = load_backbone(tmp_path / "checkpoint.pth")
    assert (loaded.arch, loaded.num_register_tokens) == ("dinov3_vit_48x2", 0)
    # dinov3 without storage tokens or layer scale is the same forward with none and with gamma 1
    full = sd | {"storage_tokens": torch.zeros(1, 0, 48)}
    full |= {f"blocks.{i}.ls{j}.gamma": torch.ones(48) for i in range(2) for j in (1, 2)}
    pixels = _inputs()[0]
    with torch.no_grad():
        expected = _meta_forward(full, cfg._replace(registers=0), torch.from_numpy(pixels)).numpy()
    assert np.abs(torch_tokens(loaded.model, pixels) - expected).max() <= 1e-4


def test_the_arch_comes_from_a_meta_file_name() -> None:
    assert arch_from_filename(Path("dinov3_vits16_pretrain_lvd1689m-08c60483.pth")) == "dinov3_vits16"
    assert arch_from_filename(Path("dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth")) == "dinov3_vith16plus"
    assert arch_from_filename(Path("weights.pth")) is None


# --- bad input ----------------------------------------------------------------------------------------


def test_a_folder_that_is_not_dinov3_is_refused(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "vit"}))
    with pytest.raises(ConfigError, match="holds a vit model, not DINOv3"):
        load_backbone(folder)
    with pytest.raises(ConfigError, match="no config.json"):
        load_backbone(tmp_path)


def test_a_truncated_safetensors_file_is_refused(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="cannot load .*model.safetensors"):
        load_backbone(folder)


def test_a_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dinov3_vittiny16_pretrain_test-00000000.pth"
    torch.save(_meta_state_dict(Meta(48, 2, 3, 4, "mlp")), path)
    path.write_bytes(path.read_bytes()[:-4000])
    with pytest.raises(ConfigError, match="truncated or not a PyTorch checkpoint"):
        load_backbone(path)


def test_a_key_mismatch_names_the_keys(tmp_path: Path) -> None:
    sd = _meta_state_dict(Meta(48, 2, 3, 4, "mlp"))
    del sd["blocks.1.ls2.gamma"]
    sd["head.weight"] = torch.zeros(3)
    path = tmp_path / "dinov3_vittiny16_pretrain_test-00000000.pth"
    torch.save(sd, path)
    with pytest.raises(ConfigError, match=r"missing keys: blocks\.1\.ls2\.gamma; unexpected keys: head\.weight"):
        load_backbone(path)


def test_an_hf_key_mismatch_names_the_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _hf_folder(tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["extra.weight"] = weights.pop("layer.1.norm2.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing keys: .*layer\.1\.norm2\.weight.*unexpected keys: extra\.weight"):
        load_backbone(folder)


def test_a_vit7b_on_a_box_without_the_memory_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    real = psutil.virtual_memory()
    # Fault injection: this box has 16 GiB free (ViT-7B needs ~27 GiB in fp32 alone).
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=16 * 2**30))
    path = tmp_path / "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"6\.\d+ B parameters.*16\.0 GiB available"):
        load_backbone(path)


def test_a_convnext_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match="only DINOv3 ViT"):
        load_backbone(path)
