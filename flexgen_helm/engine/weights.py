"""Reading OPT checkpoints tensor by tensor, without unpickling untrusted data.

Sources: a local HF checkpoint directory (safetensors, memory-mapped; or `.bin` via
`torch.load(weights_only=True)`), sharded or not; a hub id, downloaded with `huggingface_hub`;
or `dummy:opt-XXX`, synthetic weights of the real shapes for benchmarks.
Names are normalised to `decoder....` / `lm_head.weight` (checkpoints differ on the `model.` prefix).
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Iterator

import torch

from .config import ConfigError
from .model_spec import ModelSpec


def _normalise(name: str) -> str:
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


class CheckpointReader:
    """name -> tensor (on the host), opened lazily; safetensors files stay memory-mapped."""

    def __init__(self, directory: str):
        self.directory = directory
        self._where: dict[str, tuple[str, str]] = {}  # normalised name -> (file, original name)
        self._open: dict[str, object] = {}
        files = self._weight_files(directory)
        for path in files:
            for orig in self._keys(path):
                self._where[_normalise(orig)] = (path, orig)
        if "lm_head.weight" not in self._where and "decoder.embed_tokens.weight" in self._where:
            self._where["lm_head.weight"] = self._where["decoder.embed_tokens.weight"]  # tied

    @staticmethod
    def _weight_files(d: str) -> list[str]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            p = os.path.join(d, index)
            if os.path.exists(p):
                with open(p) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                missing = [s for s in shards if not os.path.exists(os.path.join(d, s))]
                if missing:
                    raise ConfigError(f"{d}: shard files listed in {index} are missing: {missing}; "
                                      "re-download the checkpoint")
                return [os.path.join(d, s) for s in shards]
        for single in ("model.safetensors", "pytorch_model.bin"):
            p = os.path.join(d, single)
            if os.path.exists(p):
                return [p]
        raise ConfigError(f"{d} has no model.safetensors or pytorch_model.bin (or index); "
                          "point at a HF OPT checkpoint directory")

    def _handle(self, path: str):
        if path not in self._open:
            try:
                if path.endswith(".safetensors"):
                    from safetensors import safe_open
                    self._open[path] = safe_open(path, framework="pt")
                else:  # never unpickle arbitrary objects
                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
                raise ConfigError(f"cannot read weight file {path}: {e}. The file is corrupt or incomplete; "
                                  "re-download or re-save the checkpoint") from e
        return self._open[path]

    def _keys(self, path: str) -> list[str]:
        h = self._handle(path)
        return list(h.keys())

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        path, orig = self._where[name]
        h = self._handle(path)
        try:
            return h.get_tensor(orig) if path.endswith(".safetensors") else h[orig]
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"cannot read tensor {orig} from {path}: {e}; the file is corrupt") from e


class DummyReader:
    """Synthetic weights of the real shapes (benchmarks): small random values, deterministic."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def has(self, name: str) -> bool:
        return True

    def get_shaped(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if len(shape) == 1:
            base = 1.0 if name.endswith("layer_norm.weight") else 0.0
            return torch.full(shape, base) + 0.01 * torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) * 0.02


def resolve_checkpoint(model: str) -> str:
    """Local directory as is; a hub id is downloaded (safetensors preferred, `.bin` otherwise)."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ConfigError(f"{model} is a file; pass the checkpoint directory that holds config.json")
    if "/" not in model:
        raise ConfigError(f"unknown model {model!r}: pass a checkpoint directory, a hub id such as "
                          "facebook/opt-1.3b, or dummy:opt-1.3b for synthetic weights")
    try:
        from huggingface_hub import list_repo_files, snapshot_download
        files = list_repo_files(model)
        pattern = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        return snapshot_download(model, allow_patterns=["*.json", "*.txt", pattern])
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot download {model!r} from the hub ({e}); pass a local checkpoint directory") from e


def iter_layer_tensors(reader, names_shapes: list[tuple[str, tuple[int, ...]]],
                       dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in names_shapes:
        if isinstance(reader, DummyReader):
            t = reader.get_shaped(name, shape)
        else:
            if not reader.has(name):
                raise ConfigError(f"checkpoint {reader.directory} lacks tensor {name}; is it an OPT checkpoint?")
            t = reader.get(name)
            if name == "decoder.embed_positions.weight" and t.shape[0] < shape[0]:
                raise ConfigError(f"{name} has {t.shape[0]} rows, config needs {shape[0]}")
            t = t[: shape[0]] if name == "decoder.embed_positions.weight" else t
            if tuple(t.shape) != tuple(shape):
                raise ConfigError(f"tensor {name} has shape {tuple(t.shape)} but config.json implies {shape}; "
                                  "the checkpoint and its config disagree")
        yield name, t.to(dtype)
