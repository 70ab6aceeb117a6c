"""Read tensors from a Hugging Face safetensors checkpoint, one named tensor (or a few rows of one) at a time.

A worker reads only what it holds: the non-expert weights and the experts its placement gives it. Expert
weights come in two layouts and both are read without touching the other experts' bytes:

- one tensor per expert and matrix (what `save_pretrained` and the published checkpoints write):
  `<layer>.<moe>.experts.<e>.{w1,w3,w2}.weight` (Mixtral) or `...experts.<e>.{gate,up,down}_proj.weight`;
- fused 3-D tensors `<layer>.<moe>.experts.gate_up_proj` [E, 2F, H] and `...experts.down_proj` [E, H, F]
  (the in-memory layout of `transformers` 5), sliced by expert with `safe_open(...).get_slice`.

Block-scaled FP8 weights (DeepSeek-V3's and Qwen3-FP8's format, `fp8_checkpoint.py`) are read with their
`_scale_inv` factors and dequantised to the requested dtype.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .fp8_checkpoint import SCALE_SUFFIX, dequantize_blockwise

__all__ = ["CheckpointReader", "RandomReader", "CheckpointError", "expert_keys", "open_weights", "WEIGHTS"]

WEIGHTS = ("checkpoint", "random")


class CheckpointError(ValueError):
    """A checkpoint that lacks a tensor the model needs, or holds one of the wrong shape."""


def expert_keys(cfg: ModelConfig, decoder_layer: int, expert: int) -> tuple[str, str, str]:
    """Checkpoint names of (gate, up, down) of one routed expert in the per-expert layout."""
    base = f"model.layers.{decoder_layer}.{cfg.moe_prefix}.experts.{expert}"
    if cfg.family == "mixtral":
        return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
    return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint folder (one file, shards with an index, or a glob).

    `names_read` records every tensor name that was read (whole or sliced), so tests can check that a
    worker touched only its share.
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.device = str(device)
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: expected a 'weight_map' object")
            self._file_of = {name: self.model_dir / file for name, file in weight_map.items()}
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{self.model_dir}: no *.safetensors files and no model.safetensors.index.json"
                )
            self._file_of = {}
            for file in files:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        self._file_of[name] = file
        self._handles: dict[Path, object] = {}
        self.names_read: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        try:
            file = self._file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is not in the checkpoint") from None
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt", device=self.device)
        return self._handles[file]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def _dequantized(self, name: str, tensor: torch.Tensor, dtype: torch.dtype, index: int | None = None):
        """`tensor` in `dtype`; an FP8 weight is multiplied by its block factors (`fp8_checkpoint.py`)."""
        if tensor.dtype != torch.float8_e4m3fn:
            return tensor.to(dtype)
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self:
            raise CheckpointError(f"{name}: an FP8 tensor without its block factors {scale_name!r}")
        self.names_read.add(scale_name if index is None else f"{scale_name}[{index}]")
        if index is None:
            scale = self._handle(scale_name).get_tensor(scale_name)
        else:
            scale = self._handle(scale_name).get_slice(scale_name)[index : index + 1][0]
        try:
            return dequantize_blockwise(tensor, scale, dtype)
        except ValueError as exc:
            raise CheckpointError(f"{scale_name}: {exc}") from None

    def get(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor `name`, cast to `dtype`; `shape` (if given) is checked. FP8 block-scaled weights
        come back dequantised."""
        tensor = self._handle(name).get_tensor(name)
        self.names_read.add(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{name}: expected shape {list(shape)}, checkpoint has {list(tensor.shape)}"
            )
        return self._dequantized(name, tensor, dtype)

    def get_optional(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(name, dtype, shape) if name in self else None

    def get_rows(self, name: str, index: int, dtype: torch.dtype) -> torch.Tensor:
        """`tensor[index]` of a stacked tensor, reading only that slice from disk."""
        tensor = self._handle(name).get_slice(name)[index : index + 1]
        self.names_read.add(f"{name}[{index}]")
        return self._dequantized(name, tensor[0], dtype, index)

    def expert(self, cfg: ModelConfig, decoder_layer: int, expert: int, dtype: torch.dtype):
        """(gate [F, H], up [F, H], down [H, F]) of one routed expert, in either checkpoint layout."""
        H, F = cfg.hidden_size, cfg.expert_ffn
        gate, up, down = expert_keys(cfg, decoder_layer, expert)
        if gate in self:
            return self.get(gate, dtype, (F, H)), self.get(up, dtype, (F, H)), self.get(down, dtype, (H, F))
        base = f"model.layers.{decoder_layer}.{cfg.moe_prefix}.experts"
        fused, fused_down = f"{base}.gate_up_proj", f"{base}.down_proj"
        if fused not in self:
            raise CheckpointError(
                f"{self.model_dir}: expert {expert} of decoder layer {decoder_layer} is in neither layout "
                f"(no {gate!r}, no {fused!r})"
            )
        if self.shape(fused) != [cfg.num_experts, 2 * F, H]:
            raise CheckpointError(
                f"{fused}: expected shape {[cfg.num_experts, 2 * F, H]}, got {self.shape(fused)}"
            )
        gate_up = self.get_rows(fused, expert, dtype)
        return gate_up[:F], gate_up[F:], self.get_rows(fused_down, expert, dtype)


class RandomReader:
    """Seeded random weights under the checkpoint's names, generated on `device` (benchmarks, like vLLM's
    dummy load format): the same name gives the same tensor on every worker, so replicas agree.

    Values ~ N(0, std^2); norm weights are ones. Biases exist where the family has them (Qwen2-MoE q/k/v).
    """

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0,
                 std: float = 0.02) -> None:
        self.cfg, self.device, self.seed, self.std = cfg, torch.device(device), seed, std
        self.names_read: set[str] = set()

    def __contains__(self, name: str) -> bool:
        if name.endswith(".bias"):
            return self.cfg.family == "qwen2_moe" and any(f"{p}_proj.bias" in name for p in "qkv")
        return True

    def get(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if shape is None:
            raise CheckpointError(f"{name}: random weights need the expected shape")
        self.names_read.add(name)
        if "norm" in name:
            return torch.ones(shape, dtype=dtype, device=self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        out = torch.empty(shape, dtype=dtype, device=self.device)
        return out.normal_(0.0, self.std, generator=gen)

    def get_optional(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(name, dtype, shape) if name in self else None

    def expert(self, cfg: ModelConfig, decoder_layer: int, expert: int, dtype: torch.dtype):
        H, F = cfg.hidden_size, cfg.expert_ffn
        gate, up, down = expert_keys(cfg, decoder_layer, expert)
        return self.get(gate, dtype, (F, H)), self.get(up, dtype, (F, H)), self.get(down, dtype, (H, F))


def open_weights(kind: str, model_dir: str | Path, cfg: ModelConfig, device: str | torch.device,
                 seed: int = 0) -> CheckpointReader | RandomReader:
    """The reader for `kind`: "checkpoint" (safetensors in model_dir, read on the CPU) or "random"."""
    if kind == "checkpoint":
        return CheckpointReader(model_dir)
    if kind == "random":
        return RandomReader(cfg, device, seed)
    raise ValueError(f"weights: expected one of {WEIGHTS}, got {kind!r}")
