"""DINOv3 backbones in PyTorch: load (Hugging Face folder or Meta checkpoint), build the demo, export to ONNX.

Everything ends on transformers' ``DINOv3ViTModel``. A Meta ``.pth`` (the dinov3 repository's key
names) is mapped onto it: the fused ``qkv`` is split into q/k/v, ``ls1/ls2.gamma`` become the layer
scales, ``storage_tokens`` the register tokens, ``patch_embed.proj`` the patch embedding, and the
RoPE ``periods`` buffer gives the head count and base. The configuration is read from the tensors,
so any DINOv3 ViT size loads; the architecture name is a label and a cross-check.

The export is the legacy TorchScript exporter (opset 17), with dynamic batch, height and width
(multiples of the patch size); its output is the patch-token grid ``(N, h, w, C)`` after the final
norm, cls and register tokens dropped. Each export is checked against PyTorch before it is published.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import psutil

from core.errors import ConfigError, RepositoryError
from core.settings import Settings
from serving.backbone import DEFAULT_LONG_SIDE, DEMO_NOTE, backbone_card, backbone_config, publish_backbone
from serving.repository import ModelCard, ModelRepository, sha256_file
from serving.triton.features_ops import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

__all__ = [
    "ARCHS",
    "LoadedBackbone",
    "arch_config",
    "arch_from_filename",
    "demo_backbone",
    "export_onnx",
    "import_backbone",
    "load_backbone",
    "meta_state_dict",
    "onnx_parity",
    "publish_demo",
    "publish_loaded",
    "torch_tokens",
]

logger = logging.getLogger(__name__)

# Published DINOv3 ViTs (dinov3/hub/backbones.py): hidden, depth, heads, ffn ratio, ffn kind, qkv bias.
# All use patch 16, 4 register tokens, RoPE base 100, LayerNorm eps 1e-5 and layer scale.
ARCHS: dict[str, tuple[int, int, int, float, str, bool]] = {
    "dinov3_vits16": (384, 12, 6, 4.0, "mlp", True),
    "dinov3_vits16plus": (384, 12, 6, 6.0, "swiglu", True),
    "dinov3_vitb16": (768, 12, 12, 4.0, "mlp", True),
    "dinov3_vitl16": (1024, 24, 16, 4.0, "mlp", True),
    "dinov3_vitl16plus": (1024, 24, 16, 6.0, "swiglu", True),
    "dinov3_vith16plus": (1280, 32, 20, 6.0, "swiglu", True),
    "dinov3_vit7b16": (4096, 40, 32, 3.0, "swiglu64", False),
}
DEMO_ARCH = "dinov3_demo"
DEMO_SEED = 0
# fp32 weights, plus the traced graph and the ONNX serialisation the export holds at the same time.
MEMORY_FACTOR = 3
# Export gate: PyTorch vs onnxruntime, max abs difference of patch tokens relative to their largest
# magnitude (at least 1). FIELD-NOTES §8 saw ~1e-5 on ViT-S/16; the tests hold exports to 1e-4 absolute.
PARITY_LIMIT = 1e-3
_HF_MODEL_TYPE = "dinov3_vit"
Floats = npt.NDArray[np.float32]
# Meta keys the transformers model has no place for and inference never reads.
_IGNORED = re.compile(r"^(local_cls_norm\.(weight|bias)|blocks\.\d+\.attn\.qkv\.bias_mask)$")


@dataclass
class LoadedBackbone:
    """A DINOv3 model ready to export, and where it came from."""

    model: DINOv3ViTModel
    arch: str
    source: Path
    source_sha256: str | None
    note: str = ""

    @property
    def patch_size(self) -> int:
        return _patch_size(self.model)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_register_tokens(self) -> int:
        return int(self.model.config.num_register_tokens)


def _patch_size(model: DINOv3ViTModel) -> int:
    patch = model.config.patch_size
    return int(patch if isinstance(patch, int) else patch[0])


def arch_from_filename(path: Path) -> str | None:
    """``dinov3_vits16_pretrain_lvd1689m-08c60483.pth`` -> ``dinov3_vits16``."""
    match = re.match(r"^(dinov3_[a-z0-9_]+?)_pretrain", path.name)
    return match.group(1) if match else None


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def _check_memory(params: int, what: str) -> None:
    """Refuse a model whose fp32 weights (times the export's working copies) exceed the free memory."""
    need = params * 4 * MEMORY_FACTOR
    available = psutil.virtual_memory().available
    if need > available:
        raise ConfigError(
            f"{what} has {params / 1e9:.2f} B parameters: loading and exporting it needs about "
            f"{need / 2**30:.1f} GiB of memory ({MEMORY_FACTOR} x fp32), this machine has {available / 2**30:.1f} GiB "
            "available; use a smaller DINOv3 or a machine with more memory"
        )


def _count_params(config: DINOv3ViTConfig) -> int:
    import torch
    from transformers import DINOv3ViTModel

    with torch.device("meta"):
        model = DINOv3ViTModel(config)
    return sum(p.numel() for p in model.parameters())


def _swiglu_hidden(hidden: int, ratio: float, align: int) -> int:
    d = int(int(hidden * ratio) * 2 / 3)
    return d + (-d % align)


def arch_config(arch: str) -> DINOv3ViTConfig:
    """The transformers config of a published DINOv3 ViT."""
    from transformers import DINOv3ViTConfig

    hidden, depth, heads, ratio, ffn, qkv_bias = ARCHS[arch]
    gated = ffn != "mlp"
    inter = _swiglu_hidden(hidden, ratio, 64 if ffn == "swiglu64" else 8) if gated else int(hidden * ratio)
    return DINOv3ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=inter,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        query_bias=qkv_bias,
        key_bias=False,
        value_bias=qkv_bias,
        num_register_tokens=4,
        patch_size=16,
        layer_norm_eps=1e-5,
        rope_theta=100.0,
    )


# --- Hugging Face folder ---------------------------------------------------------------------------


def _load_hf_folder(path: Path, arch: str | None) -> LoadedBackbone:
    from safetensors import SafetensorError
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path} is not a Hugging Face model folder: no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_file} is not readable JSON: {exc}") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != _HF_MODEL_TYPE:
        raise ConfigError(
            f"{path} holds a {model_type or 'model without model_type'!s} model, not DINOv3 ViT "
            f"(config.json model_type must be {_HF_MODEL_TYPE!r})"
        )
    weights = [path / "model.safetensors", path / "model.safetensors.index.json"]
    source = next((w for w in weights if w.is_file()), None)
    if source is None:
        raise ConfigError(f"{path} has no model.safetensors")
    config = DINOv3ViTConfig.from_pretrained(path)
    _check_memory(_count_params(config), str(path))
    try:
        loaded = DINOv3ViTModel.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise ConfigError(f"cannot load {source}: truncated or not a DINOv3 checkpoint ({_first_line(exc)})") from exc
    model, info = cast("tuple[DINOv3ViTModel, dict[str, Any]]", loaded)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ConfigError(f"{source} does not fit DINOv3ViTModel: " + _describe_keys(problems))
    arch = arch or _arch_of(model.config) or f"dinov3_hf_{model.config.hidden_size}x{model.config.num_hidden_layers}"
    model = model.float().eval()  # type: ignore[no-untyped-call]
    return LoadedBackbone(model, arch, source, sha256_file(source))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _describe_keys(problems: Mapping[str, list[Any]], limit: int = 8) -> str:
    parts = []
    for kind, keys in problems.items():
        if keys:
            shown = ", ".join(str(k) for k in keys[:limit]) + (
                f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            )
            parts.append(f"{kind.replace('_', ' ')}: {shown}")
    return "; ".join(parts)


def _arch_of(config: DINOv3ViTConfig) -> str | None:
    """The published architecture a config equals, if any."""
    for name in ARCHS:
        ref = arch_config(name)
        fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_gated_mlp")
        if all(getattr(ref, f) == getattr(config, f) for f in fields) and ref.patch_size == config.patch_size:
            return name
    return None


# --- Meta checkpoint --------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"cannot read {path}: truncated or not a PyTorch checkpoint ({_first_line(exc)})") from exc
    # Training checkpoints wrap the backbone: {"teacher": {"backbone.<key>": ...}} or {"model": ...}.
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} is not a state dict of tensors")
    if state and all(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    return state


@dataclass(frozen=True)
class _MetaLayout:
    """A Meta checkpoint's configuration, read from its tensors."""

    hidden: int
    depth: int
    heads: int
    patch: int
    registers: int
    intermediate: int
    gated: bool
    qkv_bias: bool
    proj_bias: bool
    mlp_bias: bool
    layer_scale: bool
    rope_base: float


def _meta_layout(sd: Mapping[str, torch.Tensor], arch: str | None, path: Path) -> _MetaLayout:
    required = ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:6])
        raise ConfigError(f"{path} is not a DINOv3 ViT checkpoint: missing keys {', '.join(missing)} (it has {sample})")
    hidden, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    registers = int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0
    gated = "blocks.0.mlp.w1.weight" in sd
    up = "blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"
    if up not in sd:
        raise ConfigError(f"{path}: missing keys blocks.0.mlp.fc1.weight (or blocks.0.mlp.w1.weight)")
    if "rope_embed.periods" in sd:
        periods = sd["rope_embed.periods"].double()
        head_dim = 4 * periods.numel()
        heads = hidden // head_dim
        base = float(periods[1] ** (head_dim / 4)) if periods.numel() > 1 else 100.0
        expected = base ** (4 * np.arange(periods.numel()) / head_dim)
        if not np.allclose(periods.numpy(), expected, rtol=1e-3):
            raise ConfigError(f"{path}: RoPE periods are not base**(4k/head_dim); transformers' DINOv3 cannot load it")
    elif arch in ARCHS:
        heads, base = ARCHS[arch][2], 100.0
    else:
        raise ConfigError(f"{path}: missing keys rope_embed.periods (needed for the head count)")
    return _MetaLayout(
        hidden=int(hidden),
        depth=depth,
        heads=int(heads),
        patch=int(patch),
        registers=registers,
        intermediate=int(sd[up].shape[0]),
        gated=gated,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        mlp_bias=up.replace(".weight", ".bias") in sd,
        layer_scale="blocks.0.ls1.gamma" in sd,
        rope_base=base,
    )


def _expected_meta_keys(layout: _MetaLayout) -> set[str]:
    keys = {"cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    keys |= {"rope_embed.periods"}
    if layout.registers:
        keys.add("storage_tokens")
    mlp = ("w1", "w2", "w3") if layout.gated else ("fc1", "fc2")
    for i in range(layout.depth):
        b = f"blocks.{i}."
        keys |= {b + k for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
        keys |= {b + "ls1.gamma", b + "ls2.gamma"} if layout.layer_scale else set()
        keys |= {b + "attn.qkv.weight", b + "attn.proj.weight"}
        keys |= {b + "attn.qkv.bias"} if layout.qkv_bias else set()
        keys |= {b + "attn.proj.bias"} if layout.proj_bias else set()
        keys |= {f"{b}mlp.{m}.weight" for m in mlp}
        keys |= {f"{b}mlp.{m}.bias" for m in mlp} if layout.mlp_bias else set()
    return keys


def _layout_config(layout: _MetaLayout) -> DINOv3ViTConfig:
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(
        hidden_size=layout.hidden,
        num_hidden_layers=layout.depth,
        num_attention_heads=layout.heads,
        intermediate_size=layout.intermediate,
        use_gated_mlp=layout.gated,
        hidden_act="silu" if layout.gated else "gelu",
        query_bias=layout.qkv_bias,
        # A key bias adds the same q.b to every key of a query: softmax ignores it, so it is dropped.
        key_bias=False,
        value_bias=layout.qkv_bias,
        proj_bias=layout.proj_bias,
        mlp_bias=layout.mlp_bias,
        num_register_tokens=layout.registers,
        patch_size=layout.patch,
        layer_norm_eps=1e-5,  # dinov3's "layernormbf16", used by every published ViT
        rope_theta=layout.rope_base,
    )


def _hf_layer_prefix(model: DINOv3ViTModel) -> str:
    """Where transformers keeps the blocks (``layer.`` up to 4.x, ``model.layer.`` since 5.0)."""
    return "model.layer." if any(k.startswith("model.layer.") for k in model.state_dict()) else "layer."


def meta_state_dict(sd: Mapping[str, torch.Tensor], layout: _MetaLayout, layer_prefix: str) -> dict[str, torch.Tensor]:
    """Meta (dinov3 repository) keys -> transformers ``DINOv3ViTModel`` keys."""
    import torch

    c = layout.hidden
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": sd["cls_token"].reshape(1, 1, c),
        "embeddings.mask_token": sd["mask_token"].reshape(1, 1, c),
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    out["embeddings.register_tokens"] = sd["storage_tokens"] if layout.registers else torch.zeros(1, 0, c)
    if not layout.layer_scale:  # dinov3 without layer scale: transformers' is then the identity
        for i in range(layout.depth):
            out |= {f"{layer_prefix}{i}.layer_scale{j}.lambda1": torch.ones(c) for j in (1, 2)}
    renames = {
        "norm1.": "norm1.",
        "norm2.": "norm2.",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "attn.proj.": "attention.o_proj.",
        "mlp.fc1.": "mlp.up_proj.",
        "mlp.fc2.": "mlp.down_proj.",
        # SwiGLU: w3(silu(w1 x) * w2 x) == down(act(gate x) * up x)
        "mlp.w1.": "mlp.gate_proj.",
        "mlp.w2.": "mlp.up_proj.",
        "mlp.w3.": "mlp.down_proj.",
    }
    for key, value in sd.items():
        match = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if not match:
            continue
        block, rest = match.groups()
        dst = f"{layer_prefix}{block}."
        if rest == "attn.qkv.weight":
            q, k, v = value.reshape(3, c, c).unbind(0)
            out |= {dst + "attention.q_proj.weight": q, dst + "attention.k_proj.weight": k}
            out[dst + "attention.v_proj.weight"] = v
        elif rest == "attn.qkv.bias":
            q_b, _, v_b = value.reshape(3, c).unbind(0)
            out |= {dst + "attention.q_proj.bias": q_b, dst + "attention.v_proj.bias": v_b}
        else:
            for src, target in renames.items():
                if rest.startswith(src):
                    out[dst + target + rest[len(src) :]] = value
                    break
    return out


def _load_meta(path: Path, arch: str | None) -> LoadedBackbone:
    from transformers import DINOv3ViTModel

    if arch is not None and not arch.startswith("dinov3_vit"):
        raise ConfigError(f"{arch}: only DINOv3 ViT backbones are supported (not ConvNeXt)")
    if arch in ARCHS:
        # Before reading a byte: a ViT-7B on a small box fails here, not in the kernel's OOM killer.
        _check_memory(_count_params(arch_config(arch)), f"{path.name} ({arch})")
    if not path.is_file() or path.stat().st_size == 0:
        raise ConfigError(f"{path}: no such checkpoint (or it is empty)")
    sd = _read_checkpoint(path)
    layout = _meta_layout(sd, arch, path)
    expected = _expected_meta_keys(layout)
    present = {k for k in sd if not _IGNORED.match(k)}
    problems = {"missing_keys": sorted(expected - present), "unexpected_keys": sorted(present - expected)}
    if any(problems.values()):
        raise ConfigError(f"{path.name} does not match a DINOv3 ViT layout: " + _describe_keys(problems))
    config = _layout_config(layout)
    named = arch or _arch_of(config) or f"dinov3_vit_{layout.hidden}x{layout.depth}"
    if arch in ARCHS and _arch_of(config) != arch:
        logger.warning(
            "%s: the tensors are hidden %d, %d layers, %d heads, not the published %s; importing what the file holds",
            path.name,
            layout.hidden,
            layout.depth,
            layout.heads,
            arch,
        )
    _check_memory(sum(t.numel() for t in sd.values()), path.name)
    config._attn_implementation = "eager"
    model = DINOv3ViTModel(config)
    mapped = meta_state_dict(sd, layout, _hf_layer_prefix(model))
    try:
        model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path.name} does not fit DINOv3ViTModel: {_first_line(exc)}") from exc
    return LoadedBackbone(model.eval(), named, path, sha256_file(path))  # type: ignore[no-untyped-call]


def load_backbone(path: Path, arch: str | None = None) -> LoadedBackbone:
    """A Hugging Face DINOv3 folder or a Meta ``.pth`` as a transformers model (fp32, eval)."""
    _quiet_transformers()
    path = Path(path)
    if path.is_dir():
        return _load_hf_folder(path, arch)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    if path.suffix not in (".pth", ".pt"):
        raise ConfigError(f"{path}: expected a Hugging Face folder or a Meta .pth checkpoint")
    return _load_meta(path, arch or arch_from_filename(path))


def demo_backbone(seed: int = DEMO_SEED) -> LoadedBackbone:
    """A small random-initialised DINOv3 (hidden 192, 4 layers, patch 16, 4 registers): no weights from anywhere."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    _quiet_transformers()
    config = DINOv3ViTConfig(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
        num_register_tokens=4,
        patch_size=16,
        layer_norm_eps=1e-5,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DINOv3ViTModel(config).eval()  # type: ignore[no-untyped-call]
    return LoadedBackbone(model, DEMO_ARCH, Path(f"random-init:seed={seed}"), None, note=DEMO_NOTE)


# --- ONNX -------------------------------------------------------------------------------------------


def _patch_tokens_module(model: DINOv3ViTModel) -> torch.nn.Module:
    import torch

    skip = 1 + int(model.config.num_register_tokens)
    patch = _patch_size(model)

    class PatchTokens(torch.nn.Module):
        """pixels (N, 3, H, W) -> last-layer patch tokens (N, H/patch, W/patch, C)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            hidden = self.model(pixel_values=pixels).last_hidden_state[:, skip:, :]
            grid: torch.Tensor = hidden.reshape(pixels.shape[0], pixels.shape[2] // patch, pixels.shape[3] // patch, -1)
            return grid

    return PatchTokens().eval()


def torch_tokens(model: DINOv3ViTModel, pixels: Floats) -> Floats:
    """PyTorch's patch-token grid (N, h, w, C) for a float32 (N, 3, H, W) input: the reference."""
    import torch

    with torch.inference_mode():
        tokens: Floats = _patch_tokens_module(model)(torch.from_numpy(pixels)).numpy()
        return tokens


def _probe_inputs(patch: int) -> list[Floats]:
    """Normalised-noise inputs of two shapes (landscape, portrait) for the parity check."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 3, h * patch, w * patch)).astype(np.float32) for h, w in ((3, 5), (7, 2))]


def export_onnx(model: DINOv3ViTModel, out: Path) -> Path:
    """Export the patch-token grid to ``out`` (opset 17, dynamic N/H/W); weights over 2 GB go to ``out.data``."""
    import onnx
    import torch

    patch = _patch_size(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        dummy = torch.zeros(1, 3, 4 * patch, 6 * patch)
        with torch.no_grad():
            torch.onnx.export(
                _patch_tokens_module(model),
                (dummy,),
                str(raw),
                dynamo=False,
                opset_version=17,
                input_names=["pixels"],
                output_names=["tokens"],
                dynamic_axes={"pixels": {0: "batch", 2: "height", 3: "width"}, "tokens": {0: "batch", 1: "h", 2: "w"}},
            )
        proto = onnx.load(str(raw))
        large = sum(1 for p in Path(tmp).iterdir()) > 1  # the exporter spilled tensors into files of their own
        meta = {"kind": "backbone", "patch_size": str(patch), "hidden_size": str(model.config.hidden_size)}
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(
            proto, str(out), save_as_external_data=large, all_tensors_to_one_file=True, location=out.name + ".data"
        )
    return out


@contextmanager
def _workdir(settings: Settings) -> Iterator[Path]:
    root = settings.state_dir / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="backbone-") as tmp:
        yield Path(tmp)


def publish_loaded(settings: Settings, loaded: LoadedBackbone, name: str) -> ModelCard:
    """Export ``loaded``, check it against PyTorch and publish it as the next version of ``name``."""
    repo = ModelRepository(settings.model_repository)
    with _workdir(settings) as tmp:
        started = time.perf_counter()
        # The reference comes first: a model traced by the exporter may not run the same afterwards.
        probes = _probe_inputs(loaded.patch_size)
        references = [torch_tokens(loaded.model, p) for p in probes]
        onnx_path = export_onnx(loaded.model, tmp / "model.onnx")
        exported = time.perf_counter()
        diff = onnx_parity(onnx_path, probes, references)
        limit = PARITY_LIMIT * max(1.0, max(float(np.abs(r).max()) for r in references))
        if not diff <= limit:  # NaN fails too
            raise RepositoryError(f"the ONNX export strays from PyTorch: max abs difference {diff:.2e} > {limit:.2e}")
        card = backbone_card(
            name,
            arch=loaded.arch,
            patch_size=loaded.patch_size,
            hidden_size=loaded.hidden_size,
            num_register_tokens=loaded.num_register_tokens,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            long_side=DEFAULT_LONG_SIDE,
            source_sha256=loaded.source_sha256,
            note=loaded.note,
            extra={"source": loaded.source.name, "layers": int(loaded.model.config.num_hidden_layers)},
        )
        card.metrics = {"onnx_max_abs_diff": diff, "export_s": round(exported - started, 2)}
        data = onnx_path.with_name(onnx_path.name + ".data")
        extra = {data.name: data} if data.is_file() else None
        card.version = publish_backbone(repo, card, onnx_path, backbone_config(settings, name), extra)
    logger.info("published %s version %d (%s, max abs diff %.1e)", name, card.version, loaded.arch, diff)
    return card


def onnx_parity(onnx_path: Path, inputs: list[Floats], references: list[Floats]) -> float:
    """Max abs difference of patch tokens, onnxruntime vs the PyTorch ``references``, over ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for pixels, ref in zip(inputs, references, strict=True):
        got = session.run(None, {"pixels": pixels})[0]
        if got.shape != ref.shape:
            raise RepositoryError(f"ONNX gives tokens {got.shape}, PyTorch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def import_backbone(settings: Settings, path: Path, name: str, arch: str | None = None) -> ModelCard:
    """``labelloop backbone import``: load, export, check and publish real DINOv3 weights."""
    return publish_loaded(settings, load_backbone(path, arch), name)


def publish_demo(settings: Settings, name: str) -> ModelCard:
    """``labelloop backbone demo``: publish the random-init demo backbone."""
    return publish_loaded(settings, demo_backbone(), name)
