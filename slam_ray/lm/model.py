"""Speech LMs as plain transformers causal LMs: TWIST init from a text LM, random init from a config.

Checkpoints are HF folders: `AutoModelForCausalLM.from_pretrained(path)` loads them anywhere.
"""

from __future__ import annotations

from slam_ray.config import ModelConfig
from slam_ray.core.storage import model_source
from slam_ray.errors import SlamError
from slam_ray.lm.vocabulary import MergedVocabulary, SpeechVocabulary, Vocabulary

SPEECH_IDS = SpeechVocabulary(0)  # its pad/BOS/EOS ids (the same for any number of units)


def _set_overrides(config, cfg: ModelConfig, vocab_size: int | None, vocabulary: Vocabulary | None = SPEECH_IDS
                   ) -> None:
    """Apply the experiment's settings to a config *before* a model is built from it: rotary `inv_freq`,
    dropout modules and the embedding's padding row are fixed at construction, so a later config edit would
    only change what the checkpoint says, not the model that trains."""
    if vocab_size is not None:
        config.vocab_size = vocab_size
    if vocabulary is not None:  # None: the text LM's own ids, until a merged vocabulary's rows exist
        config.pad_token_id, config.bos_token_id, config.eos_token_id = vocabulary.pad_id, vocabulary.bos_id, vocabulary.eos_id
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, cfg.dropout)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        rope["rope_theta"] = cfg.rope_theta


def build_model(cfg: ModelConfig, vocab_size: int, max_positions: int = 4096, vocabulary: Vocabulary | None = None):
    """A causal LM over the unit vocabulary (`vocab_size` ids), in fp32 (bf16 is autocast's job). With a merged
    `vocabulary` (interleaving) its size is the model's, and TWIST keeps the text LM's rows: the embeddings (and
    an untied head) grow to the merged size, rows beyond the text LM's own drawn around the mean of the old
    (slamkit's `mean_resizing`), so every text token keeps its trained row. As in slamkit, units whose ids fall
    on a text LM's spare rows (Qwen2.5: 151,665 tokens, 151,936 rows) start from those rows as they are."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    vocabulary = vocabulary or SpeechVocabulary(vocab_size - 2)
    vocab_size = vocabulary.size
    merged = isinstance(vocabulary, MergedVocabulary)

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
            # a merged vocabulary's pad row is appended by the resize below, so its ids are set after it (the text
            # LM's own pad id stays meanwhile: a pad id at a text token's row would freeze that row's embedding)
            _set_overrides(config, cfg, None, None if merged else vocabulary)
            try:
                model = AutoModelForCausalLM.from_pretrained(model_source(cfg.base), config=config, dtype=torch.float32,
                                                             attn_implementation=cfg.attn_implementation)
            except OSError as e:
                raise SlamError(f"cannot load text LM {cfg.base!r} for TWIST init (HF id in the local cache, or a folder): {e}") from e
            rows = model.get_input_embeddings().weight.shape[0]
            if merged and vocabulary.text_size > rows:
                raise SlamError(f"the text LM {cfg.base!r} has {rows} embedding rows, fewer than the {vocabulary.text_size} "
                                "tokens of the tokenizer interleaving uses: is pack.interleave.tokenizer another model's?")
            # speech-only: cut to the unit ids (new rows none); merged: grow, new rows at the mean of the text rows
            model.resize_token_embeddings(vocab_size, mean_resizing=merged)  # sets config.vocab_size
            if merged:
                for config_ in (model.config, model.generation_config):
                    config_.pad_token_id, config_.bos_token_id = vocabulary.pad_id, vocabulary.bos_id
                    config_.eos_token_id = vocabulary.eos_id
            return model.train()  # from_pretrained returns eval mode; the random init trains from the start too
        _set_overrides(config, cfg, vocab_size, vocabulary)
        # fp32 as TWIST's: a base's config records its checkpoint's dtype (Qwen2.5 bf16, pythia fp16), and
        # transformers 5 builds a model from a config in that dtype: AdamW then updated half-precision weights
        # (fp16: -inf after a step; bf16: updates below its precision rounded away)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    except (ImportError, ValueError) as e:
        raise attention_unavailable(cfg.attn_implementation, e) from e


def attention_unavailable(attn_implementation: str, error: Exception) -> SlamError:
    return SlamError(f"train.model.attn_implementation={attn_implementation!r} is not available here: {error}. "
                     "Use 'sdpa' (torch's kernels, FlashAttention included on GPU) or 'eager'")


def load_checkpoint(path: str, attn_implementation: str = "sdpa"):
    """A saved causal LM (HF folder or id) in fp32 — transformers 5 would keep the dtype it was saved in, and AdamW
    would then update half-precision weights — with the run's attention implementation (`train.model`'s: a
    checkpoint's config does not keep it, so a DPO after a `flash_attention_2` pre-training fell back to sdpa)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_source(path), dtype=torch.float32,
                                                    attn_implementation=attn_implementation)
    except (ImportError, ValueError) as e:
        raise attention_unavailable(attn_implementation, e) from e


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_embedding_parameters(model) -> int:
    """Parameters of the token embeddings and, when untied, of the output head (Kaplan et al.'s non-embedding
    count leaves these out; Chinchilla-style laws, and the paper's 358M, count every parameter)."""
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = outputs is None or outputs.weight is inputs or outputs.weight.data_ptr() == inputs.data_ptr()
    return inputs.numel() + (0 if tied else outputs.weight.numel())
