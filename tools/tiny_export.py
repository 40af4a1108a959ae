"""Export the trained tiny model as a DeepSeek-V3 checkpoint and measure it through our own runtime.

Layout as DeepSeek ships V3: config.json (quantization_config fp8 e4m3, 128x128 blocks), model.safetensors with
the HF names, linear weights FP8 e4m3fn + `weight_scale_inv`; embeddings, head, norms, router and eh_proj in
bf16; e_score_correction_bias fp32; the MTP module as layer `num_hidden_layers` without its own embed/head
copies (the loader shares the main ones). quality.json is computed by loading the export with dsv3_rt.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import (  # noqa: E402
    EOS, BOS, HELDOUT_RULE, PAD, NgramBaselines, encode_stream, eval_windows, split_files, stdlib_files,
)
from tiny_model import TinyDeepseekV3  # noqa: E402

from dsv3_rt.core.config import ModelConfig  # noqa: E402
from dsv3_rt.core.default_model import GENERATION_HEADERS, continuation_compiles  # noqa: E402
from dsv3_rt.core.weights import FP8_BLOCK, quantize_fp8_block  # noqa: E402

CHAT_TEMPLATE_SOURCE = Path("/work/shared/data/deepseek-v3/tokenizer_config.json")
EVAL_LEN = 256  # tokens per held-out window (position 0 is context only)
SAMPLE_WINDOWS = 8
GENERATION_MAX_TOKENS = 256  # greedy tokens per header continuation (quality.json and the test): a function body
GENERATION_LENGTHS = (64, 128, 192, 256)  # also measured, for quality.json's per-length table
BF16_SUFFIXES = ("norm.weight", "layernorm.weight", "embed_tokens.weight", "lm_head.weight", "mlp.gate.weight",
                 "eh_proj.weight")


def hf_tensors(model: TinyDeepseekV3) -> dict[str, torch.Tensor]:
    """fp32 tensors under DeepSeek-V3's HF names (experts split per expert, MTP as the extra layer)."""
    out: dict[str, torch.Tensor] = {}
    n_main = model.cfg.num_hidden_layers
    sources = [(k, v) for k, v in model.main.state_dict().items()]
    sources += [(f"model.layers.{n_main}." + k.removeprefix("layer.").replace("shared_head_norm", "shared_head.norm"), v)
                for k, v in model.mtp.state_dict().items()]
    for name, t in sources:
        t = t.detach().float()
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name.removesuffix("gate_up_proj")
            for e, (g, u) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{p}{e}.gate_proj.weight"], out[f"{p}{e}.up_proj.weight"] = g.clone(), u.clone()
        elif name.endswith("mlp.experts.down_proj"):
            p = name.removesuffix("down_proj")
            for e, d in enumerate(t):
                out[f"{p}{e}.down_proj.weight"] = d.clone()
        else:
            out[name] = t.clone()
    return out


def to_checkpoint_dtypes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek's storage: fp8 block-quantised linears (+ weight_scale_inv), bf16 small/sensitive, fp32 bias."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        elif name.endswith(BF16_SUFFIXES) or t.dim() == 1:
            out[name] = t.to(torch.bfloat16)
        else:
            q, s = quantize_fp8_block(t, FP8_BLOCK)
            out[name], out[name + "_scale_inv"] = q, s
    return out


def runtime_config(cfg) -> ModelConfig:
    """Our ModelConfig for the trained transformers config (its to_hf_dict is the config.json DeepSeek ships)."""
    return ModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        q_lora_rank=cfg.q_lora_rank, first_k_dense_replace=cfg.first_k_dense_replace,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, rope_theta=cfg.rope_parameters["rope_theta"],
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=(1,), fp8_block_size=FP8_BLOCK,
        name="dsv3-rt-default",
    )


def tokenizer_config() -> dict:
    template = json.loads(CHAT_TEMPLATE_SOURCE.read_text())["chat_template"]
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "unk_token": None, "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 1024,
            "tokenizer_class": "LlamaTokenizerFast", "chat_template": template}


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of ids[1:] under logits[:-1]."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def runtime_quality(out: Path, windows: list[np.ndarray]) -> tuple[float, float, float]:
    """(mean NLL, MTP top-1 accuracy vs the data's token i+2, agreement of the MTP argmax with the main model's
    argmax at i+1: what greedy decoding accepts) of the export loaded by dsv3_rt's reference backend in fp32."""
    import dsv3_rt
    from dsv3_rt.core.batch import AttnBatch

    model = dsv3_rt.load(out, backend="reference", dtype="float32", progress=False)
    g = model.graph
    nll, hits, agree, n_mtp = [], 0, 0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.from_numpy(w.astype(np.int64))
            cache = g.new_cache(1, len(ids))
            batch = AttnBatch.single(len(ids), device=model.kernels.device)
            hidden = g.forward(ids, batch, cache)
            main = g.logits(hidden).cpu()
            nll.append(window_nll(main, ids))
            next_ids = torch.cat([ids[1:], ids[:1]])  # the last position's next token is unused (causal)
            _, normed = g.mtp(0, hidden, next_ids, batch, cache, every_position=True)
            pred = g.logits(normed).argmax(-1).cpu()[:-2]  # position i predicts token i + 2
            hits += int((pred == ids[2:]).sum())
            agree += int((pred == main.argmax(-1)[1:-1]).sum())
            n_mtp += len(ids) - 2
    return float(torch.cat(nll).mean()), hits / n_mtp, agree / n_mtp


def greedy_compile_rate(out: Path, tok) -> dict:
    """Greedy continuations of GENERATION_HEADERS through dsv3_rt: which compile (continuation_compiles: cut at the
    last complete logical line) at GENERATION_MAX_TOKENS, and the rate at each of GENERATION_LENGTHS."""
    import dsv3_rt
    from dsv3_rt.core.sampling import SamplingParams

    model = dsv3_rt.load(out, backend="reference", dtype="float32", progress=False)
    prompts = [[tok.token_to_id(BOS)] + tok.encode(h + "\n", add_special_tokens=False).ids for h in GENERATION_HEADERS]
    by_length = {}
    for n in sorted(set(GENERATION_LENGTHS) | {GENERATION_MAX_TOKENS}):
        outs = model.generate_batch(prompts, SamplingParams(temperature=0.0, max_new_tokens=n))
        by_length[n] = {h: continuation_compiles(h, tok.decode(o, skip_special_tokens=True))
                        for h, o in zip(GENERATION_HEADERS, outs)}
    ok = by_length[GENERATION_MAX_TOKENS]
    return {"max_new_tokens": GENERATION_MAX_TOKENS, "rate": sum(ok.values()) / len(ok), "compiles": ok,
            "cut": "header + newline + continuation up to its last complete logical line (the stdlib tokenizer's last "
                   "NEWLINE; an unclosed string or bracket at the end stops the scan), trailing block openers "
                   "without a body dropped; compiles, and adds at least one line to the header",
            "rate_by_max_new_tokens": {str(n): f"{sum(v.values())}/{len(v)}" for n, v in by_length.items()}}


def update_greedy(out: Path) -> dict:
    """Recompute only quality.json's "greedy_header_continuations" for the checkpoint in `out` (no training state
    needed): python tools/tiny_export.py --greedy-only [dsv3_rt/data/default_model]."""
    from tokenizers import Tokenizer

    quality = json.loads((out / "quality.json").read_text())
    quality["greedy_header_continuations"] = greedy_compile_rate(out, Tokenizer.from_file(str(out / "tokenizer.json")))
    (out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    print(json.dumps(quality["greedy_header_continuations"], indent=2))
    return quality


def torch_quality(model: TinyDeepseekV3, windows: list[np.ndarray]) -> float:
    """Mean NLL of the fp32 training model on the same windows (the export must come close)."""
    nll = []
    with torch.no_grad():
        for w in windows:
            ids = torch.from_numpy(w.astype(np.int64))
            nll.append(window_nll(model.main.lm_head(model.hidden(ids[None]))[0], ids))
    return float(torch.cat(nll).mean())


def heldout_sample(held_files: list[tuple[str, str]], tok) -> list[tuple[str, str]]:
    """The first held-out files whose stream fills SAMPLE_WINDOWS windows (shipped for the test)."""
    chosen = []
    for f in held_files:
        chosen.append(f)
        if len(encode_stream(tok, [t for _, t in chosen])) >= SAMPLE_WINDOWS * EVAL_LEN:
            return chosen
    raise ValueError("held-out split too small for the test sample")


def export(work: Path, out: Path, eval_limit: int | None = None) -> dict:
    """Write the checkpoint to `out` and its quality.json (eval_limit: first N held-out windows, for quick checks)."""
    from tokenizers import Tokenizer

    from safetensors.torch import save_file

    saved = torch.load(work / "state.pt", map_location="cpu", weights_only=False)
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config.from_dict(saved["config"])
    cfg._attn_implementation = "sdpa"
    model = TinyDeepseekV3(cfg)
    model.load_state_dict(saved["state"])
    model.eval()
    meta = saved["meta"]

    out.mkdir(parents=True, exist_ok=True)
    tensors = to_checkpoint_dtypes(hf_tensors(model))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    rcfg = runtime_config(cfg)
    hf = rcfg.to_hf_dict()
    hf.pop("name", None)
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    shutil.copy(work / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")

    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    train_files, held_files = split_files(stdlib_files())
    sample_files = heldout_sample(held_files, tok)
    (out / "heldout_sample.json").write_text(json.dumps(
        {"rule": HELDOUT_RULE, "eval_len": EVAL_LEN, "windows": SAMPLE_WINDOWS,
         "files": [{"path": p, "text": t} for p, t in sample_files]}, ensure_ascii=False) + "\n")

    train_ids = encode_stream(tok, [t for _, t in train_files])
    held = eval_windows(encode_stream(tok, [t for _, t in held_files]), EVAL_LEN, eval_limit)
    sample = eval_windows(encode_stream(tok, [t for _, t in sample_files]), EVAL_LEN, SAMPLE_WINDOWS)
    ngram = NgramBaselines(train_ids, tok.get_vocab_size())
    full_nll, mtp_acc, _ = runtime_quality(out, held)
    sample_nll, _, _ = runtime_quality(out, sample)
    base, base_sample = ngram.nll(held), ngram.nll(sample)
    ppl = lambda x: round(math.exp(x), 3)  # noqa: E731
    quality = {
        "heldout_rule": HELDOUT_RULE,
        "heldout_files": len(held_files), "heldout_tokens_scored": len(held) * (EVAL_LEN - 1),
        "eval": f"non-overlapping {EVAL_LEN}-token windows of the held-out stream (BOS + file + EOS per file); "
                "position 0 is context only; loaded with dsv3_rt.load(dir, backend='reference', dtype='float32')",
        "perplexity": ppl(full_nll),
        "perplexity_fp32_training_model": ppl(torch_quality(model, held)),
        "unigram_perplexity": ppl(base["unigram"]),
        "bigram_perplexity": ppl(base["bigram_add1"]),
        "bigram_interpolated_perplexity": ppl(base["bigram_interp"]),
        "baselines": "fitted on the train split, same tokenizer; unigram and bigram add-one smoothed; "
                     "interpolated: 0.8 * bigram MLE + 0.2 * add-one unigram",
        "mtp_top1_accuracy": round(mtp_acc, 4),
        "greedy_header_continuations": greedy_compile_rate(out, tok),
        "sample": {"files": [p for p, _ in sample_files], "windows": len(sample), "perplexity": ppl(sample_nll),
                   "bigram_perplexity": ppl(base_sample["bigram_add1"]),
                   "bigram_interpolated_perplexity": ppl(base_sample["bigram_interp"]),
                   "unigram_perplexity": ppl(base_sample["unigram"])},
        "params": meta["params"], "tokens_trained": meta["tokens_trained"], "steps": meta["steps"],
        "train_seconds": round(meta["train_seconds"], 1), "batch": meta["batch"], "seq": meta["seq"],
        "train_files": len(train_files), "train_tokens_available": int(len(train_ids)),
        "vocab_size": tok.get_vocab_size(), "seed": meta["seed"], "python": sys.version.split()[0],
        "commands": meta.get("commands", ["python tools/train_tiny.py"]),
    }
    (out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    print(json.dumps(quality, indent=2))
    return quality


if __name__ == "__main__":
    if sys.argv[1:2] == ["--greedy-only"]:
        from dsv3_rt.core.default_model import DEFAULT_MODEL_DIR

        update_greedy(Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_MODEL_DIR)
    else:
        sys.exit("usage: python tools/tiny_export.py --greedy-only [CHECKPOINT_DIR]  (full export: train_tiny.py)")
