"""The experiment schema: one pydantic model per stage section, no unknown keys (loading.py reads the YAML).

An experiment file is the single source of truth for a run. Every field has a default that works on a laptop
without GPU or network; the shipped recipes (`slam_ray/recipes/*.yaml`) override what the paper fixes. Where a
run's files and MLflow store live (which needs the storage layer) is `slam_ray.core.storage.workdir_location`
/ `workdir_path` and `slam_ray.core.tracking.tracking_uri`: config imports nothing but errors.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slam_ray.errors import SlamError

STAGES = ("synth", "extract", "pack", "train", "dpo", "eval")
StageName = Literal["synth", "extract", "pack", "train", "dpo", "eval"]
# the dpo fields whose None means "train's value" (Experiment.trainer_settings resolves them)
TRAINER_FIELDS = ("precision", "compile", "gradient_checkpointing", "strategy")



def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds (directly, optionally, or as list items), each once;
    stage keys and the generated reference walk the schema with it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [m for m in models_in(arg) if m not in found]
    return found

class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated.

    Field metadata stage keys read (slam_ray/core/stage_io.py, docs/stages.md): `json_schema_extra={"operational":
    True}` = how a stage runs, not what it writes (left out of keys); `{"since": "<version>"}` on a field added
    later = left out of keys while it holds its default, so existing outputs stay valid.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = Field(None, description="Ray address to join; None starts (or joins, inside a job) a local instance")
    num_cpus: float | None = Field(None, description="CPUs of a locally started Ray; None = all cores")
    num_gpus: int | None = None
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per Ray Data actor; fractional so 2 cores do not deadlock")
    worker_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Train worker")
    include_dashboard: bool = Field(True, description="Ray dashboard on 127.0.0.1; Train V2 needs its state API")


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; None = sqlite:///WORKDIR/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment name; None = the experiment's name")


class CorpusConfig(Section):
    """Where the texts `synth` reads aloud come from and how they are cut (see slam_ray/speech/text_sources.py)."""

    source: Literal["grammar", "text", "jsonl", "parquet", "hf"] = Field(
        "grammar", description="grammar: the built-in generator (offline default); text: a plain file; jsonl/parquet: "
                               "a file with a text column; hf: a local datasets folder (save_to_disk)")
    path: str | None = Field(None, description="file or folder of the corpus (every source but grammar)")
    text_field: str = Field("text", description="jsonl/parquet/hf: the column holding the text")
    hf_split: str = Field("train", description="hf: the split of a DatasetDict folder")
    unit: Literal["line", "paragraph"] = Field("line", description="text: one item per line or per blank-line paragraph")
    split: Literal["none", "sentence"] = Field("none", description="sentence: one utterance per sentence of an item")
    max_chars: int | None = Field(None, ge=8, description="longest utterance in characters: a longer item is cut "
                                  "into packs of whole sentences (a longer sentence between words); None = no cap")
    min_chars: int = Field(1, ge=1, description="shorter utterances are dropped")
    dedup: bool = Field(True, description="keep identical utterance texts once")
    n_sentences: int = Field(6000, gt=0, description="most utterances read (grammar: exactly this many)")
    held_out_percent: int = Field(10, ge=1, le=50, description="share of grammar sentences reserved for eval")
    seed: int = 0

    @model_validator(mode="after")
    def _path_for_files(self) -> CorpusConfig:
        if self.source != "grammar" and not self.path:
            raise ValueError(f"source {self.source!r} needs `path` (set synth.corpus.path)")
        return self


class SwagConfig(Section):
    """SpokenSwag-style preference triples from SWAG/HellaSwag-shaped JSONL rows (see slam_ray/speech/spoken_swag.py)."""

    path: str = Field(..., description="JSONL rows {context, endings: [...], label}")
    context_field: str = "context"
    endings_field: str = "endings"
    label_field: str = "label"
    voices: list[str] | None = Field(None, min_length=1, description="one drawn per triple; None = synth.voices")
    max_auto_bleu: float = Field(0.3, ge=0, le=1, description="drop rows whose chosen text's bigram Auto-BLEU is above")
    n_pairs: int | None = Field(None, ge=1, description="most triples kept; None = all")
    seed: int = 0


class SynthConfig(Section):
    corpus: CorpusConfig = CorpusConfig()
    backend: Literal["espeak", "piper", "hf"] = "espeak"
    voices: list[str] = Field(default_factory=lambda: ["en-us"], min_length=1,
                              description="espeak: voice names; piper: 'joe' or .onnx paths; hf: VITS model ids or "
                                          "paths (optionally '#<speaker id>'); one drawn per utterance")
    speed: tuple[float, float] = Field((140, 190), description="espeak words/min; piper 100/length_scale; hf "
                                       "100 x speaking_rate; sampled per item")
    noise: tuple[float, float] = Field((0.0, 0.0), description="piper/hf noise_scale, sampled per item; keep 0 "
                                       "where units must be consistent (docs/recipe.md); espeak has none")
    alignments: bool = Field(True, description="record word alignments where the backend gives them")
    sample_rate: int = 16000
    num_actors: int = Field(2, ge=1, json_schema_extra={"operational": True})
    num_gpus_per_actor: float = Field(0.0, ge=0, description="hf: GPUs per actor (e.g. 0.25 shares one GPU by 4)",
                                      json_schema_extra={"operational": True})
    batch_size: int = Field(32, ge=1)
    local_speak_seconds: float = Field(
        120.0, ge=0, description="texts to speak of at most this much audio (at 14 characters/s) are spoken in the "
                                 "driver process by one SpeakActor (one thread: the same audio) instead of a pool of "
                                 "actors whose start costs ~5-10 s; only without GPUs; 0 = always actors",
        json_schema_extra={"operational": True})
    shard_size: int = Field(1000, ge=1, description="utterances per audio folder and index part: the unit of resume")
    write_audio: bool = Field(True, description="false: synth only plans the utterances and extract speaks each one "
                              "in its own actors straight into units, no audio on disk (extract.inputs: ['@synth'])")
    preferences: SwagConfig | None = Field(None, description="also speak SpokenSwag-style preference triples")
    seed: int = 0

    @model_validator(mode="after")
    def _ranges(self) -> SynthConfig:
        if self.speed[0] > self.speed[1] or self.speed[0] <= 0:
            raise ValueError("speed must be [low, high] with 0 < low <= high")
        if self.noise[0] > self.noise[1] or self.noise[0] < 0:
            raise ValueError("noise must be [low, high] with 0 <= low <= high")
        if self.backend == "espeak" and self.noise[1] > 0:
            raise ValueError("espeak has no noise parameter: set synth.noise=[0, 0] or choose backend piper or hf")
        if not self.write_audio and self.preferences:
            raise ValueError("synth.preferences writes audio files (slamkit's preference JSONL points at them): set "
                             "synth.write_audio=true")
        if self.num_gpus_per_actor > 0 and self.backend != "hf":
            raise ValueError(f"backend {self.backend!r} runs on CPU: set synth.num_gpus_per_actor=0 (GPUs are for hf)")
        return self


class TokenizerConfig(Section):
    kind: Literal["logmel", "hubert"] = "logmel"
    model: str | None = Field(None, description="HF id or path of a HubertModel (kind: hubert)")
    layer: int | None = Field(None, ge=1, description="transformer layer whose output is quantised (kind: hubert)")
    frame_rate: int = Field(25, description="frames per second of the features (logmel hop = 16000 / frame_rate)")
    n_mels: int = 80
    n_units: int = Field(200, ge=2, le=65533)
    centroids: str | None = Field(None, description="k-means centroids (.npy, .safetensors, or a sklearn k-means "
                                  "pickle .bin with trust_pickle); None = fit them on a sample")
    trust_pickle: bool = Field(False, description="allow loading a pickled k-means (runs code from the file)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="HuBERT precision on GPU "
                                                              "(CPU always float32)")
    fit_frames: int = Field(150_000, ge=1000, description="frames sampled to fit k-means")
    dedup: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _hubert_needs_model(self) -> TokenizerConfig:
        if self.kind == "hubert" and (self.model is None or self.layer is None):
            raise ValueError("kind 'hubert' needs `model` (HF id or path) and `layer`")
        return self


class NamedInput(Section):
    """An input with a dataset name, the key `pack.mix` weights it by."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    path: str


class ExtractConfig(Section):
    inputs: list[str | NamedInput] = Field(
        default_factory=lambda: ["@synth"],
        description="audio folders, globs or manifests (.jsonl/.csv with `path`); '@synth' = this experiment's "
                    "synth output; {name, path} names the dataset for pack.mix (default: the folder/file stem)",
    )
    tokenizer: TokenizerConfig = TokenizerConfig()
    num_actors: int = Field(2, ge=1, json_schema_extra={"operational": True})
    batch_size: int = Field(32, ge=1)
    num_gpus_per_actor: float = Field(0.0, json_schema_extra={"operational": True})
    local_fit_seconds: float = Field(
        300.0, ge=0, description="a tokenizer fit sample of at most this much audio is featurised in the driver "
                                 "process (one thread, as an actor: the same features), not by a pool of actors "
                                 "whose start costs ~10-15 s; only without GPUs (driver and actors); 0 = always actors",
        json_schema_extra={"operational": True})
    local_encode_seconds: float = Field(
        120.0, ge=0, description="an encoding pass over at most this much audio (durations known, local file sizes "
                                 "at 16 kB/s, texts to speak at 14 characters/s) runs in the driver process with one "
                                 "EncodeActor (one thread: the same units) instead of a pool of actors; it serves "
                                 "extract and the speech eval and DPO speak and tokenise; only without GPUs; "
                                 "0 = always actors",
        json_schema_extra={"operational": True})
    decode_cpus: float = Field(0.25, gt=0, description="CPUs per decoding task when the encoding actors have GPUs "
                                                        "(decoding and resampling then run as Ray tasks feeding them; "
                                                        "on CPUs each actor decodes its own files)",
                        json_schema_extra={"operational": True})
    gpu_batch_seconds: float = Field(
        200.0, gt=0, description="padded seconds of audio per forward pass on a GPU; larger needs more GPU memory "
                                 "(800 was 4-6% faster in the steady state on an 80 GB H100, bench/gpu.py)",
        json_schema_extra={"operational": True})
    shard_files: int = Field(2000, ge=1, description="input files per Parquet shard: the unit of resume")
    max_segment_seconds: float | None = Field(
        60.0, gt=1, description="files longer than this are read block by block and cut in each window's last "
                                "quarter (bounded memory); None = never cut")
    segmenter: Literal["vad", "energy"] = Field(
        "vad", description="where a long file is cut: inside the longest pause silero-vad finds (vad), or at the "
                           "quietest 20 ms (energy)")


class InterleaveConfig(Section):
    """Text–speech interleaving (docs/interleaving.md): some words of an aligned utterance as text, the others as the
    units spoken over them, a marker at every switch, in the text LM's vocabulary with the units appended."""

    tokenizer: str | None = Field(None, description="the text LM's tokenizer: HF id in the local cache, or a folder; "
                                                    "None = train.model.base")
    datasets: list[str] | None = Field(None, description="datasets packed interleaved (utterances with words); the "
                                                         "others stay speech-only, in the merged vocabulary; None = all")
    method: Literal["slamkit", "spiritlm"] = Field(
        "slamkit", description="slamkit: Poisson(lam) speech spans until eta of the words are speech; spiritlm: "
                               "alternating 10-30-word text and 5-15-word speech spans")
    lam: float = Field(10.0, gt=0, le=200, description="slamkit: mean speech span length in words")
    eta: float = Field(0.3, gt=0, le=1, description="slamkit: least share of an utterance's words spoken")
    unimodal_marker: bool = Field(False, description="a speech-only utterance opens with <speech> (SpiritLM); "
                                                     "false: no marker (slamkit)")
    resample: Literal["once", "epoch"] = Field(
        "once", description="once: an utterance's spans are drawn once (slamkit); epoch: every copy of it in the "
                            "packed stream (its repeats under pack.mix / pack.epochs) draws its spans anew (SpiritLM "
                            "redraws every step): pack the passes you will train", json_schema_extra={"since": "0.4"})


class TextDataset(Section):
    """A text-only dataset packed beside the speech (interleaving's third kind of data): its texts, read and cut
    as `synth.corpus` reads them, tokenised by the text LM's tokenizer."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="the dataset's name in pack.mix")
    corpus: CorpusConfig


class PackConfig(Section):
    inputs: list[str | NamedInput] = Field(
        default_factory=lambda: ["@extract"],
        description="'@extract' = this experiment's units; or slamkit features/tokens JSONL files (named like extract.inputs)",
    )
    context_len: int = Field(256, ge=8)
    val_fraction: float = Field(0.02, ge=0, lt=0.5)
    mix: dict[str, float] | None = Field(None, description="share of training tokens per dataset; None = all once")
    epochs: dict[str, float] = Field(default_factory=dict, description="most passes over a dataset under a mix (1)")
    seed: int = 0
    shard_tokens: int = Field(
        1 << 22, ge=1024,
        description="tokens per output shard, which is also the shuffle buffer: utterances are shuffled within the "
                    "inputs of one shard (whose order is shuffled first); a task's memory is ~20 bytes per token of it",
        json_schema_extra={"since": "0.2"})
    num_workers: int = Field(2, ge=1, description="pack tasks running at once (Ray Data); the output is the same for any",
                             json_schema_extra={"operational": True})
    interleave: InterleaveConfig | None = Field(
        None, description="text–speech interleaving (the merged vocabulary); None = speech-only units",
        json_schema_extra={"since": "0.3"})
    text: list[TextDataset] = Field(
        default_factory=list, description="text-only datasets (needs pack.interleave: text ids are the text LM's)",
        json_schema_extra={"since": "0.3"})

    @model_validator(mode="after")
    def _mix_weights(self) -> PackConfig:
        if self.mix is not None and (any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0):
            raise ValueError("mix weights must be >= 0 with a positive sum, e.g. {librispeech: 0.3, stories: 0.7}")
        if any(e <= 0 for e in self.epochs.values()):
            raise ValueError("epochs must be > 0 per dataset")
        if self.text and self.interleave is None:
            raise ValueError("text: text-only datasets need pack.interleave (the merged vocabulary holds their ids); "
                             "set pack.interleave: {} (with a tokenizer), or remove pack.text")
        return self


class ModelConfig(Section):
    init: Literal["random", "twist"] = "random"
    base: str | None = Field(None, description="HF id or path of the text LM (TWIST init, or random init from its config)")
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    dropout: float = Field(0.0, ge=0, lt=1)
    rope_theta: float = 10_000.0
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel: sdpa (torch; FlashAttention/efficient kernels on GPU), eager, or "
                            "flash_attention_2 (needs the flash-attn package and a GPU)")

    @model_validator(mode="after")
    def _twist_needs_base(self) -> ModelConfig:
        if self.init == "twist" and not self.base:
            raise ValueError("init 'twist' needs `base`: the HF id or path of a text LM")
        return self


class OptimizerConfig(Section):
    name: Literal["adamw", "adamw_fused", "adafactor", "ademamix", "lion", "adalomo"] = "adamw"
    lr: float = Field(1.5e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = 1e-8
    beta3: float = Field(0.9999, description="AdEMAMix: the slow EMA's beta")
    alpha: float = Field(5.0, description="AdEMAMix: weight of the slow EMA")


class ScheduleConfig(Section):
    name: Literal["cosine", "linear", "inverse_sqrt", "wsd", "constant"] = "cosine"
    warmup_ratio: float = Field(0.01, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio when set")
    min_lr: float = Field(0.0, ge=0)
    decay_ratio: float = Field(0.1, gt=0, le=1, description="wsd: share of steps in the final decay")


class TrainConfig(Section):
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    batch_size: int = Field(16, ge=1, description="sequences per device per micro-step")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = 1.0
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="token budget (all workers); sets the step count")
    max_minutes: float | None = Field(3.0, gt=0, description="wall-clock training budget (excludes data prep)")
    max_flops: float | None = Field(
        None, gt=0, description="compute budget in training FLOPs, 6 N D with N the model's parameters: sets the "
                                "step count (`slam-ray scaling plan` gives a budget's compute-optimal N and D)",
        json_schema_extra={"since": "0.2"})
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more compute")
    compile: bool = Field(False, description="torch.compile the model (inductor; the first steps pay the compile time)")
    document_mask: bool = Field(
        False, description="each utterance (or piece of one) in a packed window is its own document, as slamkit's "
                           "packing with flash_attention_2: positions restart at 0, attention stays inside the "
                           "document, its first token is not a target, and the loss is the mean over the targets "
                           "of the whole accumulated step (all workers)", json_schema_extra={"since": "0.2"})
    loss_chunk_tokens: int | None = Field(
        None, ge=1, description="compute the output head and the cross-entropy this many tokens at a time, gradients "
                                "made in the forward (a fused linear cross-entropy): the whole logits never exist, "
                                "for a ~152k-row interleaved head; None = the model's own head and loss "
                                "(docs/performance.md has both measured)", json_schema_extra={"since": "0.4"})
    peak_tflops: float | None = Field(None, gt=0, description="per-GPU peak for MFU; None = looked up by GPU name (bf16 dense)",
                                      json_schema_extra={"operational": True})
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: a full model copy per worker; fsdp: weights, "
                                             "gradients and optimizer state sharded across workers (FSDP2), for larger models")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per training worker; None = {CPU: ray.worker_cpus, GPU: 1 with use_gpu}",
        json_schema_extra={"operational": True})
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker; None = worker CPUs",
                                        json_schema_extra={"operational": True})
    log_every: int = Field(10, ge=1, json_schema_extra={"operational": True})
    val_reports: int = Field(10, ge=0, le=100, description="validation passes spread over the budget, each "
                             "reported (MLflow val/loss; a sweep's ASHA/median compare them); 0 = only at the end",
                             json_schema_extra={"operational": True})
    checkpoint_every: int | None = Field(None, ge=1, description="steps between resumable checkpoints",
                                         json_schema_extra={"operational": True})
    checkpoint_every_minutes: float | None = Field(None, gt=0, description="minutes between resumable checkpoints",
                                                   json_schema_extra={"operational": True})
    max_failures: int = Field(0, ge=-1, description="Ray Train retries after a worker failure (-1: forever)",
                              json_schema_extra={"operational": True})
    storage_path: str | None = Field(None, description="where Ray Train keeps the run (checkpoints, trainer state): "
                                     "a shared folder or s3://bucket/prefix, gs://bucket/prefix, credentials from the "
                                     "environment; None = the stage folder", json_schema_extra={"operational": True})
    seed: int = 0

    @model_validator(mode="after")
    def _needs_budget(self) -> TrainConfig:
        if self.max_steps is None and self.max_minutes is None and self.max_tokens is None and self.max_flops is None:
            raise ValueError("set a budget: max_steps, max_tokens, max_flops or max_minutes (any combination)")
        if self.schedule.min_lr > self.optimizer.lr and self.schedule.name in ("cosine", "linear", "wsd"):
            # the decay runs from lr to min_lr: above lr, it would raise the lr over the run
            raise ValueError(f"schedule.min_lr {self.schedule.min_lr:g} is above optimizer.lr {self.optimizer.lr:g}: "
                             "the schedule would raise the lr as it goes; set min_lr <= lr")
        return self


class DpoConfig(Section):
    init: str | None = Field(None, description="HF id or path of a causal LM over the unit vocabulary to start from; "
                             "None = this experiment's `train` checkpoint")
    inputs: list[str] = Field(
        default_factory=lambda: ["@grammar"],
        description="'@grammar' = preference triples from the built-in grammar, spoken with the synth voices and "
                    "tokenised with the extract tokenizer; or slamkit preference JSONL files (units)")
    n_pairs: int = Field(2000, ge=1, description="@grammar: training triples")
    val_pairs: int = Field(200, ge=1, description="@grammar: held-out triples (JSONL inputs: every 10th triple)")
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid = DPO; ipo = IPO (length-normalised)")
    nll_weight: float = Field(0.0, ge=0, description="weight of an auxiliary NLL term on the chosen continuation")
    reference: Literal["model", "precomputed"] = Field(
        "model", description="model: a frozen copy beside the policy; precomputed: its log-probs once, then dropped")
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(4, ge=1, description="preference triples per device per micro-step")
    grad_accum: int = Field(16, ge=1)
    schedule: Literal["inverse_sqrt", "cosine"] = "inverse_sqrt"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = 0.5
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="token budget (chosen + rejected rows, all workers); "
                                   "sets the step count")
    max_minutes: float | None = Field(30.0, gt=0, description="wall-clock budget (the paper: 30 minutes helped)")
    epochs: float | None = Field(None, gt=0)
    num_workers: int | None = Field(None, ge=1, description="Ray Train workers; None = train.num_workers")
    precision: Literal["fp32", "bf16"] | None = Field(None, description="as train.precision; None = train's value")
    compile: bool | None = Field(None, description="as train.compile; None = train's value")
    gradient_checkpointing: bool | None = Field(None, description="as train.gradient_checkpointing; None = train's value")
    strategy: Literal["ddp", "fsdp"] | None = Field(None, description="as train.strategy (fsdp also shards the "
                                                    "reference model); None = train's value")
    log_every: int = Field(10, ge=1, json_schema_extra={"operational": True})
    checkpoint_every: int | None = Field(None, ge=1, description="steps between resumable checkpoints",
                                         json_schema_extra={"operational": True})
    seed: int = 0

    @model_validator(mode="after")
    def _needs_budget(self) -> DpoConfig:
        if self.max_steps is None and self.epochs is None and self.max_minutes is None and self.max_tokens is None:
            raise ValueError("set a budget: max_steps, max_tokens, epochs or max_minutes (any combination)")
        if self.schedule == "cosine" and self.max_steps is None and self.epochs is None and self.max_tokens is None:
            raise ValueError("a cosine schedule needs a step count: set max_steps, max_tokens or epochs")
        return self


class GenerationConfig(Section):
    temperature: float = Field(0.8, gt=0)
    top_k: int = Field(25, ge=1)
    max_new_tokens: int = Field(150, ge=1)
    repetition_penalty: float = Field(1.0, ge=1.0, description="1.1 after DPO in the paper")
    prompt_seconds: float = Field(3.0, gt=0, description="prompts are the first seconds of each audio file")
    n_prompts: int = Field(1000, ge=1, description="files (in name order) whose openings are prompts")
    samples_per_prompt: int = Field(1, ge=1)
    seed: int = 0
    vocoder: str | None = Field(None, description="unit HiFi-GAN checkpoint folder (units -> audio); None = no audio")
    asr: str = Field("pocketsphinx", description="pocketsphinx (offline) or a Whisper HF id/path, e.g. "
                     "openai/whisper-large-v3-turbo")
    text_lm: str | None = Field(None, description="HF id/path of the text LM for GenPPL (paper: meta-llama/Llama-3.2-1B)")
    drop_prompt: bool = Field(True, description="score only the continuation's transcript, not the prompt's")
    auto_bleu_n: int = Field(2, ge=1, description="n-gram order of Auto-BLEU (the paper: bigrams)")
    modality: Literal["speech", "text"] = Field(
        "speech", description="what an interleaved model continues a spoken prompt in: speech (units; vocoded and "
                              "transcribed with a vocoder) or text (after a <text> marker, text tokens only, decoded "
                              "by its tokenizer and scored as the transcript: GenPPL, Auto-BLEU); speech-only models: "
                              "speech", json_schema_extra={"since": "0.4"})


BUILTIN_TASKS = ("lexical", "word_order", "agreement")


class EvalTask(Section):
    task: str = Field(..., description="a shipped task (swuggy, sblimp, ssc, tsc, salmon, manifest, lexical, "
                      "word_order, agreement, generate) or a task YAML file")
    path: str | None = Field(None, description="the dataset: folder of the official release, or a JSONL manifest")
    name: str | None = Field(None, description="name in results and MLflow (eval/<name>/...); default: task")
    split: str | None = Field(None, description="ZeroSpeech split (dev: the public gold labels)")
    subsets: list[str] | None = Field(None, description="SALMon subsets; None = all 8")
    limit: int | None = Field(None, ge=1, description="score only the first N items (a quick look)")

    @property
    def key(self) -> str:
        return self.name or Path(self.task).stem

    @property
    def reader_options(self) -> dict[str, Any]:
        return {k: v for k, v in (("split", self.split), ("subsets", self.subsets)) if v is not None}


# Per-task options and the readers that read them (evals/readers.py); what to use elsewhere.
TASK_OPTIONS = (
    ("split", ("zerospeech",), "only ZeroSpeech tasks (swuggy, sblimp) have splits"),
    ("subsets", ("salmon",), "only SALMon has subsets"),
    ("limit", ("zerospeech", "storycloze", "salmon", "manifest", "cross_modal_storycloze"),
     "the built-in tasks take eval.n_pairs, generation eval.generation.n_prompts"),
)


class EvalConfig(Section):
    tasks: list[str | EvalTask] = Field(
        default_factory=lambda: list(BUILTIN_TASKS), min_length=1,
        description="task names, or {task, path, ...} entries for datasets; see slam_ray/evals/tasks/"
    )
    checkpoints: list[str] = Field(
        default_factory=lambda: ["final", "before_dpo", "init"], min_length=1,
        description="final | before_dpo | init (skipped when absent) | all (every checkpoint of the training "
                    "run: a learning curve) | a checkpoint folder"
    )
    n_pairs: int = Field(200, ge=1, description="minimal pairs per built-in grammar task")
    convention: Literal["mean", "sum"] = Field("mean", description="score by mean (slamkit) or summed token NLL")
    speech_logits_only: bool = Field(
        False, description="interleaved models: score the speech-only tasks over the unit ids and EOS alone (text "
                           "logits masked, the rest renormalised) instead of the whole merged vocabulary; cross-modal "
                           "tasks always use the whole; no effect on speech-only models", json_schema_extra={"since": "0.4"})
    batch_size: int = Field(32, ge=1)
    num_actors: int = Field(1, ge=1, description="Ray Data scoring actors (one per GPU on a cluster); 1 without GPUs "
                            "scores in the eval process itself", json_schema_extra={"operational": True})
    num_gpus_per_actor: float = Field(0.0, ge=0, json_schema_extra={"operational": True})
    seed: int = 1234
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _check_tasks(self) -> EvalConfig:
        from slam_ray.config.tasks import load_task

        seen = set()
        for i, entry in enumerate(self.task_entries()):
            try:
                spec = load_task(entry.task)
            except SlamError as e:
                raise ValueError(f"tasks[{i}]: {e}") from None
            if spec.needs_path and not entry.path:
                raise ValueError(f"tasks[{i}]: task {entry.task!r} reads a dataset; give it as "
                                 f"{{task: {entry.task}, path: /where/the/data/is}}")
            if entry.key in seen:
                raise ValueError(f"tasks[{i}]: two tasks are named {entry.key!r}; give one a `name`")
            seen.add(entry.key)
            # An option a task's reader does not read would be ignored without a word (a `limit` on a grammar
            # task still scored n_pairs): refused, with what does that job.
            for option, readers, instead in TASK_OPTIONS:
                if getattr(entry, option) is not None and spec.reader not in readers:
                    raise ValueError(f"tasks[{i}]: `{option}` does nothing for task {entry.task!r} (reader "
                                     f"{spec.reader}); {instead}")
        return self

    def task_entries(self) -> list[EvalTask]:
        return [EvalTask(task=t) if isinstance(t, str) else t for t in self.tasks]

    @property
    def grammar_tasks(self) -> list[str]:
        return [e.task for e in self.task_entries() if e.task in BUILTIN_TASKS]


class SweepConfig(Section):
    """How `slam-ray sweep` searches a space (the space itself is a YAML file under search_spaces/)."""

    metric: str = Field("eval/word_order/accuracy", description="picks the best trial (reported at the end)")
    mode: Literal["max", "min"] = "max"
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid/random: Tune's variant generator (grid axes crossed, distributions sampled "
                            "num_samples times); optuna: TPE over distributions (no grid axes)")
    num_samples: int = Field(1, ge=1, description="random/optuna: trials; grid: repeats of the whole grid, "
                                                   "repeat r with train.seed and dpo.seed + r (own stage outputs)")
    scheduler: Literal["fifo", "asha", "median"] = Field("fifo", description="early stopping on stop_metric")
    stop_metric: str = Field("val/loss", description="reported during training; what ASHA/median compare")
    stop_mode: Literal["max", "min"] = "min"
    grace_percent: float = Field(20, gt=0, le=100, description="no trial is stopped before this share of its budget")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/reduction_factor of trials at each rung")
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.1, gt=0, description="CPUs of a trial's driver process (its trainer asks for its own)")
    seed: int = 0


class Experiment(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    workdir: str | None = Field(None, description="where stage outputs go: a folder or s3:// / gs:// URI; "
                                "None = ./slam_runs/<name>")
    stages: list[StageName] = Field(default_factory=lambda: ["synth", "extract", "pack", "train", "eval"])
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    synth: SynthConfig = SynthConfig()
    extract: ExtractConfig = ExtractConfig()
    pack: PackConfig = PackConfig()
    train: TrainConfig = TrainConfig()
    dpo: DpoConfig = DpoConfig()
    eval: EvalConfig = EvalConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _check_generation_modality(self) -> Experiment:
        if (self.eval.generation.modality == "text" and self.pack.interleave is None
                and any(entry.task == "generate" for entry in self.eval.task_entries())):
            raise ValueError("eval.generation.modality: text needs an interleaved model (pack.interleave set); a "
                             "speech-only model continues in speech: use modality: speech")
        # Eval and DPO hold out the grammar sentences whose hash falls under synth.corpus.held_out_percent; a grammar
        # text dataset holding out fewer packed the rest of them as training text
        held_out = self.synth.corpus.held_out_percent
        for i, data in enumerate(self.pack.text):
            if data.corpus.source == "grammar" and data.corpus.held_out_percent < held_out:
                raise ValueError(f"pack.text[{i}].corpus.held_out_percent {data.corpus.held_out_percent} is below "
                                 f"synth.corpus.held_out_percent {held_out}: the grammar sentences eval and DPO hold "
                                 f"out would be trained on as text; set it to {held_out} (or more)")
        return self

    @property
    def tracking_experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def vocab_size(self) -> int:
        return self.extract.tokenizer.n_units + 2

    def trainer_settings(self, stage: str) -> dict[str, Any]:
        """How `stage` ("train" or "dpo") trains: {precision, compile, gradient_checkpointing, strategy}; dpo's
        own value where set, else train's (the one place where dpo's None is resolved)."""
        own = self.dpo if stage == "dpo" else self.train
        return {name: getattr(self.train, name) if getattr(own, name) is None else getattr(own, name)
                for name in TRAINER_FIELDS}

    def named_inputs(self) -> list[tuple[str, str]]:
        """(dataset name, path) per extract input."""
        return name_entries(self.extract.inputs, {"@synth": "synth"})


def name_entries(entries: list[str | NamedInput], specials: dict[str, str]) -> list[tuple[str, str]]:
    """(dataset name, path) per input entry: named entries keep their name, stage references ('@synth',
    '@extract') are named after the stage, a path or URI is named by its folder or file stem (a URI's query, such
    as an S3 endpoint, is not part of it: the name keys pack.mix and MLflow metric names)."""
    out = []
    for entry in entries:
        if isinstance(entry, NamedInput):
            out.append((entry.name, entry.path))
        elif entry in specials:
            out.append((specials[entry], entry))
        else:
            where = entry.partition("?")[0] if "://" in entry else entry
            out.append((Path(where.split("*")[0].rstrip("/") or where).stem or "data", entry))
    return out
