"""A tiny random DeepSeek-V3 checkpoint made by transformers, with a real byte-level BPE tokenizer.

Tests load it with dsv3_rt and compare against transformers' own DeepseekV3ForCausalLM on the same
weights, so the reference is independent of our graph. Building it takes well under a second.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

#: ../shared/data/deepseek-v3 beside the repository (as on a developer machine and in CI)
DEEPSEEK_V3_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepseek-v3"
DEEPSEEK_V3_TOKENIZER_CONFIG = DEEPSEEK_V3_DATA / "tokenizer_config.json"

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
#: DeepSeek-V3's control tokens, in id order right after BOS/EOS/PAD (ids 0, 1, 2 as in the real vocabulary)
CONTROL_TOKENS = [
    "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]

#: Fixed training text: English, digits, punctuation and multi-byte UTF-8 (so streaming must not split characters).
_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "DeepSeek-V3 is a mixture-of-experts model with multi-head latent attention.",
    "In 2024, 671 billion parameters; 37 billion active per token.",
    "Tokens are bytes, merged by rank: 'a' + 'b' -> 'ab'. Numbers: 1 12 123 1234.",
    "你好世界，今天天气很好。こんにちは、カタカナ。",
    "Café, naïve, résumé, über — emoji 🙂 and ∑ symbols.",
    "def main(argv):\n    return 0\n\nprint('done')",
    "A system prompt, a user turn, an assistant reply; tools answer with JSON {\"x\": 1}.",
]

TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    tie_word_embeddings=False, num_nextn_predict_layers=0,
)


def train_tokenizer(vocab_size: int = 400):  # noqa: ANN201 (tokenizers.Tokenizer)
    """A byte-level BPE trained on `_CORPUS`, with DeepSeek's special tokens at ids 0, 1, 2, 3, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, *CONTROL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def tokenizer_config() -> dict[str, Any]:
    """DeepSeek-V3's published tokenizer_config.json (its chat template and AddedToken-style specials)."""
    cfg = json.loads(DEEPSEEK_V3_TOKENIZER_CONFIG.read_text())
    cfg.pop("added_tokens_decoder", None)
    return cfg


@lru_cache(maxsize=1)
def deepseek_v3_backend():  # noqa: ANN201 (tokenizers.Tokenizer)
    """DeepSeek-V3's real vocabulary (from the tiktoken rank file) with its special tokens; built once per run."""
    from dsv3_rt.core.tokenizer import backend_from_tiktoken

    return backend_from_tiktoken(DEEPSEEK_V3_DATA / "deepseek_v3.tiktoken")


def make_tiny_hf_checkpoint(path: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a tiny random transformers DeepseekV3ForCausalLM (fp32, eager) + tokenizer files to `path`."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    cfg = DeepseekV3Config(**{**TINY_CONFIG, "vocab_size": tok.get_vocab_size(), **config_overrides})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).to(torch.float32).eval()
    _randomise(model)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), ensure_ascii=False, indent=1))
    return path


def load_hf_model(path: str | Path):  # noqa: ANN201 (DeepseekV3ForCausalLM)
    """The reference: transformers' own DeepseekV3 on the saved checkpoint, fp32 with eager attention."""
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    """Weights with std ~0.1 (logits not flat), norms 1 + 0.2*randn, a non-zero routing correction bias."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.1)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.1 * torch.randn_like(buf))
