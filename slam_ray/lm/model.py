"""Speech LMs as plain transformers causal LMs: TWIST init from a text LM, random init from a config.

Checkpoints are HF folders: `AutoModelForCausalLM.from_pretrained(path)` loads them anywhere.
"""

from __future__ import annotations

from slam_ray.config import ModelConfig
from slam_ray.core.storage import model_source
from slam_ray.errors import SlamError
from slam_ray.speech.units import BOS_ID, EOS_ID, PAD_ID


def _set_overrides(config, cfg: ModelConfig, vocab_size: int | None) -> None:
    """Apply the experiment's settings to a config *before* a model is built from it: rotary `inv_freq`,
    dropout modules and the embedding's padding row are fixed at construction, so a later config edit would
    only change what the checkpoint says, not the model that trains."""
    if vocab_size is not None:
        config.vocab_size = vocab_size
    config.pad_token_id, config.bos_token_id, config.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, cfg.dropout)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        rope["rope_theta"] = cfg.rope_theta


def build_model(cfg: ModelConfig, vocab_size: int, max_positions: int = 4096):
    """A causal LM over the unit vocabulary (`vocab_size` ids), in fp32 (bf16 is autocast's job)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    if cfg.base:
        try:
            config = AutoConfig.from_pretrained(model_source(cfg.base))
        except OSError as e:
            kind = "text LM" if cfg.init == "twist" else "config of"
            raise SlamError(f"cannot load {kind} {cfg.base!r} (HF id in the local cache, or a folder): {e}") from e
    else:
        config = Qwen2Config(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=max_positions, tie_word_embeddings=True,
        )
    try:
        if cfg.init == "twist":
            # TWIST: the text LM's transformer, built with our overrides (its vocabulary size kept, so its
            # weights load), then its embeddings (and an untied head) cut to the unit ids. dtype fp32: transformers
            # 5 loads a checkpoint in its saved dtype (Qwen2.5's bf16) otherwise, and AdamW would update bf16 weights.
            _set_overrides(config, cfg, None)
            try:
                model = AutoModelForCausalLM.from_pretrained(model_source(cfg.base), config=config, dtype=torch.float32,
                                                             attn_implementation=cfg.attn_implementation)
            except OSError as e:
                raise SlamError(f"cannot load text LM {cfg.base!r} for TWIST init (HF id in the local cache, or a folder): {e}") from e
            model.resize_token_embeddings(vocab_size, mean_resizing=False)  # sets config.vocab_size
            return model.train()  # from_pretrained returns eval mode; the random init trains from the start too
        _set_overrides(config, cfg, vocab_size)
        return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    except (ImportError, ValueError) as e:
        raise SlamError(f"train.model.attn_implementation={cfg.attn_implementation!r} is not available here: {e}. "
                        "Use 'sdpa' (torch's kernels, FlashAttention included on GPU) or 'eager'") from e


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_embedding_parameters(model) -> int:
    """Parameters of the token embeddings and, when untied, of the output head (Kaplan et al.'s non-embedding
    count leaves these out; Chinchilla-style laws, and the paper's 358M, count every parameter)."""
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = outputs is None or outputs.weight is inputs or outputs.weight.data_ptr() == inputs.data_ptr()
    return inputs.numel() + (0 if tied else outputs.weight.numel())
