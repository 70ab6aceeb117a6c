"""A tiny random MoE model for `expertmesh serve` without a model: config.json, tokenizer.json and
generation_config.json in a folder, served with `weights="random"` (no tensors are written; the weights
come from `GroupConfig.seed`).

    path = write_tiny_model("out/tiny")
    config = EngineConfig(group=GroupConfig(model=str(path), weights="random"))

The tokenizer is a byte-level BPE trained here on a few sentences (so any text, multi-byte characters
included, encodes and decodes); the model is Mixtral-shaped: 8 experts, top-2, 2 layers, hidden 64.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_tiny_model"]

_VOCAB = 512  # at most: the trainer stops when no pair repeats
_SPECIAL = ("<s>", "</s>")  # ids 0 and 1: beginning and end of sequence
_CORPUS = [
    "Mixture-of-Experts models route every token to a few experts out of many.",
    "Expert parallelism places the experts of each layer on different GPUs and moves tokens between them.",
    "The engine batches requests continuously: decode tokens and chunks of prompts share every step.",
    "Hello, world! The quick brown fox jumps over the lazy dog. 0123456789",
    "Placement balances the load of the experts and keeps co-activated experts together.",
]


def _tokenizer_json() -> tuple[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB, special_tokens=list(_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok.to_str(), tok.get_vocab_size()


def write_tiny_model(directory: str | Path) -> Path:
    """Write the tiny model's files into `directory` (created if needed); returns it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    text, vocab = _tokenizer_json()
    (path / "tokenizer.json").write_text(text)
    config = {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": vocab,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "hidden_act": "silu", "sliding_window": None,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    return path
