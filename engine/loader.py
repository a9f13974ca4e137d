"""Load a local Hugging Face MoE folder: dense weights into the model, experts into host pages.

The model skeleton is built from its config without initialising weights; the
routed experts' 3D parameters are dropped at once (never touched, so never
resident), dense tensors are read from the safetensors files into the model,
and expert tensors are read straight into the host expert store. Nothing goes
through ``from_pretrained``'s full materialisation.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.arch import (
    SUPPORTED_ARCHITECTURES,
    ExpertTensorRef,
    dense_key_candidates,
    layout_of,
    moe_layers,
    parse_expert_key,
    top_k_of,
)
from engine.errors import ModelLoadError, MoepagerError
from engine.safetensors_io import CheckpointReader
from engine.store import HostExpertStore, page_format, print_progress

DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    store: HostExpertStore
    moe_blocks: list[tuple[int, torch.nn.Module, torch.nn.Module]]  # (decoder layer, block, experts)
    top_k: int
    num_experts: int
    checkpoint_bytes: int
    path: Path


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        from engine.default_model import default_model_path

        path = Path(default_model_path())
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the embedded default model is missing from {path}; pass --model DIR")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"--model must be a folder holding config.json and *.safetensors, got file {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path}")
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MoepagerError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def load_config(path: Path):
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r} in {path / 'config.json'}; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from None


def load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {exc}") from None


def load_model(path: Path, dtype_name: str, device: torch.device, progress: bool = True,
               before_experts=None, expert_dtype: str = "auto", group_size: int | None = None,
               cache_dir: Path | None = None) -> LoadedModel:
    """``before_experts(store, top_k)`` runs once the store is sized, before any expert is read (budget checks).

    ``expert_dtype`` / ``group_size`` choose the host page format (``engine.store.page_format``);
    quantized pages are cached in ``cache_dir``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    dtype = DTYPE_BY_NAME[dtype_name]
    config = load_config(path)
    reader = CheckpointReader(path)
    try:
        quant = getattr(config, "quantization_config", None)
        if quant is not None:
            method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
            if str(method) != "mxfp4":
                raise NotImplementedError(
                    f"quantized checkpoints ({method}) are not supported; only GPT-OSS MXFP4 experts are "
                    "(dequantized into host pages). Use a bf16/fp16/fp32 checkpoint")
            del config.quantization_config  # experts are dequantized by the store; dense weights are plain
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        blocks = moe_layers(model)
        if not blocks:
            raise ModelLoadError(f"{path}: the model has no routed-expert layers")
        layout = layout_of(blocks[0][2])
        num_experts = int(blocks[0][2].num_experts)
        for _, _, experts in blocks:
            if layout_of(experts) != layout or int(experts.num_experts) != num_experts:
                raise NotImplementedError("MoE layers with different expert shapes are not supported")
            for name in EXPERT_PARAMS:
                if name in experts._parameters:
                    del experts._parameters[name]
        moe_index = {layer: i for i, (layer, _, _) in enumerate(blocks)}

        refs: dict[int, list[ExpertTensorRef]] = {}
        dense_keys = []
        ignored = []
        for key in reader:
            ref = parse_expert_key(key)
            if ref is None:
                dense_keys.append(key)
            elif ref.layer in moe_index:
                refs.setdefault(ref.layer, []).append(ref)
            else:
                ignored.append(key)  # e.g. DeepSeek-V3's multi-token-prediction layers
        _load_dense(model, reader, dense_keys, ignored)
        if ignored:
            print(f"moepager: ignoring {len(ignored)} checkpoint tensors the model does not use "
                  f"(first: {ignored[0]})", file=sys.stderr)
        model.to(device)

        fmt = page_format(layout, dtype, expert_dtype, group_size)
        store = HostExpertStore(layout, len(blocks), num_experts, fmt, dtype, pin=device.type == "cuda")
        if before_experts is not None:
            before_experts(store, top_k_of(config))
        store.load(reader, refs, [layer for layer, _, _ in blocks], print_progress() if progress else None,
                   cache_dir=cache_dir)
        checkpoint_bytes = reader.nbytes()
    finally:
        reader.close()
    return LoadedModel(model, load_tokenizer(path), store, blocks, top_k_of(config), num_experts,
                       checkpoint_bytes, path)


def _load_dense(model: torch.nn.Module, reader: CheckpointReader, keys: list[str], ignored: list[str]) -> None:
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    loaded = set()
    for key in keys:
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        name = next((c for c in dense_key_candidates(key) if c in targets), None)
        if name is None:
            ignored.append(key)
            continue
        target = targets[name]
        if tuple(target.shape) != tuple(reader.shape(key)):
            raise ModelLoadError(f"{key}: checkpoint shape {reader.shape(key)} != model shape {tuple(target.shape)}")
        with torch.no_grad():
            reader.read_into(key, target.data)
        loaded.add(name)
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    # Tied parameters appear under several names; one load fills them all, so compare storage.
    loaded_ptrs = {targets[n].data_ptr() for n in loaded}
    state = model.state_dict()
    missing = sorted(n for n, t in state.items()
                     if n not in loaded and not _is_expert_param(n) and t.data_ptr() not in loaded_ptrs)
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} dense tensors the model needs (first: {missing[0]})")


def _is_expert_param(name: str) -> bool:
    return any(name.endswith(f"experts.{p}") for p in EXPERT_PARAMS)
