"""Reading checkpoints tensor by tensor, without unpickling untrusted data.

Sources: a local HF checkpoint directory (safetensors, memory-mapped; or `.bin` via
`torch.load(weights_only=True)`), sharded or not; a hub id, downloaded with `huggingface_hub`;
or `dummy:NAME`, synthetic weights of the real shapes for benchmarks.
Names are normalised without the `model.` prefix (checkpoints differ on it), as the family tables
(engine/families) write them.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Iterator

import torch

from .config import ConfigError
from .model_spec import ModelSpec, TensorRef


def _normalise(name: str) -> str:
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


class CheckpointReader:
    """name -> tensor (on the host), opened lazily; safetensors files stay memory-mapped."""

    def __init__(self, directory: str, spec: ModelSpec):
        self.directory = directory
        self._where: dict[str, tuple[str, str]] = {}  # normalised name -> (file, original name)
        self._open: dict[str, object] = {}
        files = self._weight_files(directory)
        for path in files:
            for orig in self._keys(path):
                self._where[_normalise(orig)] = (path, orig)
        head, emb = spec.layer_tensors(spec.num_layers + 1)[-1].name, spec.layer_tensors(0)[0].name
        if head not in self._where and emb in self._where and spec.tie_embeddings:
            self._where[head] = self._where[emb]  # tied: the head is the token embedding

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
                          "point at a HF checkpoint directory")

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

    def shape(self, name: str) -> tuple[int, ...]:
        path, orig = self._where[name]
        h = self._handle(path)
        if path.endswith(".safetensors"):
            return tuple(h.get_slice(orig).get_shape())
        return tuple(h[orig].shape)

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

    def get_shaped(self, ref: TensorRef) -> torch.Tensor:
        name, shape = ref.name, ref.shape
        if ref.role == "lm_head.weight" and self.spec.tie_embeddings:
            name = self.spec.layer_tensors(0)[0].name
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if len(shape) == 1:
            base = 1.0 if "norm" in ref.role and ref.role.endswith(".weight") else 0.0
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


def iter_layer_tensors(reader, refs: list[TensorRef]) -> Iterator[tuple[TensorRef, torch.Tensor]]:
    """The layer's tensors in the checkpoint's own precision (callers cast or quantize them)."""
    for ref in refs:
        yield ref, reader.get_shaped(ref) if isinstance(reader, DummyReader) else read_checked(reader, ref)


def read_checked(reader: "CheckpointReader", ref: TensorRef) -> torch.Tensor:
    """The checkpoint tensor of `ref` (names and shapes were checked by check_checkpoint)."""
    t = reader.get(ref.name)
    return t[: ref.shape[0]] if ref.role == "pos_embed.weight" else t  # a longer table is fine


def check_checkpoint(reader: "CheckpointReader", spec: ModelSpec) -> None:
    """Every tensor present with its shape, before anything is written to an offload directory
    (reads safetensors headers only; `.bin` shards are memory-mapped)."""
    for j in range(spec.num_layers + 2):
        for ref in spec.layer_tensors(j):
            if not reader.has(ref.name):
                raise ConfigError(f"checkpoint {reader.directory} lacks tensor {ref.name} ({ref.role}) that its "
                                  "config.json implies; the checkpoint is incomplete or its config belongs to "
                                  "another model")
            got = reader.shape(ref.name)
            ok = got == tuple(ref.shape) or (ref.role == "pos_embed.weight" and got[0] >= ref.shape[0]
                                             and got[1:] == tuple(ref.shape[1:]))
            if not ok:
                raise ConfigError(f"tensor {ref.name} has shape {got} but config.json implies {ref.shape}; "
                                  "the checkpoint and its config disagree")
