"""The checkpoint's text side: its `tokenizer.json` (the `tokenizers` package) and its end-of-sequence ids.

    tok = Tokenizer.from_model_dir("path/to/model")        # None when the folder has no tokenizer.json
    ids = tok.encode("Hello")                               # with the special tokens its post-processor adds
    eos = eos_token_ids("path/to/model")                    # generation_config.json, else config.json
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Tokenizer", "eos_token_ids", "max_positions"]


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception subclass
            raise ValueError(f"tokenizer: cannot read {path} ({exc})") from None
        self.path = path

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        path = Path(model_dir) / "tokenizer.json"
        return cls(path) if path.exists() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The model's end-of-sequence ids: generation_config.json's `eos_token_id` (an id or a list), else
    config.json's; () when neither names one."""
    for name in ("generation_config.json", "config.json"):
        eos = _read(Path(model_dir) / name).get("eos_token_id")
        if eos is not None:
            return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    return ()


def max_positions(model_dir: str | Path) -> int | None:
    """config.json's `max_position_embeddings` (None when absent)."""
    value = _read(Path(model_dir) / "config.json").get("max_position_embeddings")
    return None if value is None else int(value)
