"""Stage outputs: `WORKDIR/<stage>/<config-hash>/` with `manifest.json` and `errors.jsonl`.

A stage's key hashes its own config section and the keys of the stages it reads from, so changing an
upstream stage invalidates everything downstream, while a sweep over `train` reuses the same units. Fields
that change how a stage runs but not what it produces (actor counts, logging, checkpoint cadence) are marked
`json_schema_extra={"operational": True}` on the schema (slam_ray/config/schema.py) and left out; a field added later
and marked `{"since": ...}` is left out while it holds its default, so adding it keeps existing keys. Each stage
has a format version (`STAGE_FORMAT`), bumped when its output format or what its key covers changes. Every
input given by path (files, folders, models, task YAMLs) is hashed by what is there (`fingerprints` in the
section: see slam_ray/core/fingerprint.py), so an input edited in place makes a new key.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from slam_ray.config import STAGES, TRAINER_FIELDS, Experiment, models_in, name_entries
from slam_ray.config.tasks import CROSS_MODAL_READERS, load_task
from slam_ray.core.fingerprint import fingerprint, fingerprints
from slam_ray.core.storage import is_remote, join, local_path, localize, publish, read_text, workdir_location
from slam_ray.errors import SlamError

# The version of each stage's output format and of what its key covers. Bump a stage's number when either
# changes, so an old output is never reused as a new one (docs/stages.md). Version 1 is not in the payload: it
# is what keys were before versions existed, so existing workdirs keep their keys.
# What DPO trained with before it had its own trainer settings (fp32 DDP, whatever train used).
DPO_TRAINER_BEFORE = {"precision": "fp32", "compile": False, "gradient_checkpointing": False, "strategy": "ddp"}
STAGE_FORMAT: dict[str, int] = {"synth": 1, "extract": 2, "pack": 3, "train": 1, "dpo": 1, "eval": 1}
# Versions of what the stages' generators and readers produce, in the keys of the stages that use them: bump one
# when its generator changes, so old outputs are not reused. They live here, beside STAGE_FORMAT, because the
# stage contract imports no generator (imports point one way: stages -> speech/lm/evals -> core).
SENTENCES_VERSION = 2  # evals/grammar.py: the built-in corpus sentences (synth with corpus.source grammar)
PAIRS_VERSION = 4  # evals/grammar.py: the held-out minimal pairs (eval; 4: each pair's voice and speed drawn
# from its own seed, where 3 drew them in turn over every listed task)
PREFERENCES_VERSION = 1  # lm/preferences.py: the grammar preference triples (dpo with @grammar inputs)
INTERLEAVE_VERSION = 2  # lm/interleave.py + stages/pack.py: the spans and sequences of pack.interleave (pack)
CROSS_MODAL_VERSION = 1  # evals/cross_modal.py + lm/preferences.py held-out triples as cross-modal items (eval)
INVERSE_SQRT_VERSION = 2  # lm/optim.py: the inverse_sqrt lr schedule (train, dpo with it; 2: HF's 10,000-step
# timescale without a warmup, where 1 decayed as 1/sqrt(step))
FREQUENCY_BANDS_VERSION = 2  # evals/readers.py: sWUGGY's frequency bands (eval with a frequency_band breakdown;
# 2: the ZeroSpeech toolkit's right-open cuts, where 1 put 5, 20 and 100 a band lower)
READERS_VERSION = 2  # evals/readers.py: a reader's output, or the eval unit cache's format (eval; eval_units)


def _marks(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def operational_fields(model: type[BaseModel] = Experiment, prefix: str = "") -> list[str]:
    """Dotted paths of the fields marked operational, nested sections included (what keys leave out)."""
    found = []
    for name, info in model.model_fields.items():
        if _marks(info).get("operational"):
            found.append(prefix + name)
        for sub in models_in(info.annotation):
            found += operational_fields(sub, f"{prefix}{name}.")
    return found


def key_view(section: BaseModel) -> dict[str, Any]:
    """A section's JSON as its stage key sees it: fields marked operational left out (at any depth, by the
    schema, not by name: a dataset called `log_every` in `pack.mix` stays), and fields marked `since` left out
    while they equal their default."""
    return _key_view(section, section.model_dump(mode="json"))


def _key_view(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        kept = {}
        for name, item in dumped.items():
            marks = _marks(fields[name]) if name in fields else {}
            if marks.get("operational"):
                continue
            if "since" in marks and getattr(value, name) == fields[name].get_default(call_default_factory=True):
                continue
            kept[name] = _key_view(getattr(value, name), item)
        return kept
    if isinstance(value, (list, tuple)) and isinstance(dumped, list):
        return [_key_view(v, d) for v, d in zip(value, dumped, strict=True)]
    if isinstance(value, dict) and isinstance(dumped, dict):
        return {k: _key_view(v, d) for (k, d), v in zip(dumped.items(), value.values(), strict=True)}
    return dumped


def config_hash(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def trained_stage(exp: Experiment) -> str:
    """The stage whose checkpoint evaluation reads: dpo when the experiment runs it, else train."""
    return "dpo" if "dpo" in exp.stages else "train"


def evaluates_trained_stage(exp: Experiment) -> bool:
    return any(c in ("final", "before_dpo", "init", "all") for c in exp.eval.checkpoints)


def _paths(entries: list[Any], stage_refs: tuple[str, ...]) -> list[str]:
    """The paths of input entries (plain or {name, path}), without references to other stages ('@synth')."""
    paths = [getattr(e, "path", e) for e in entries]
    return [p for p in paths if p not in stage_refs]


def _alignment_sidecars(inputs: list[str]) -> list[str]:
    """The `<name>.json` files beside local audio inputs given as single files or globs."""
    import glob

    found = []
    for entry in inputs:
        if is_remote(entry) or Path(entry).is_dir() or entry.endswith((".jsonl", ".csv")):
            continue
        for match in ([entry] if Path(entry).is_file() else sorted(glob.glob(entry, recursive=True))):
            sidecar = Path(match).with_suffix(".json")
            if sidecar.is_file() and Path(match).suffix != ".json":
                found.append(str(sidecar))
    return found


def _voice_files(exp: Experiment, voices: list[str] | None = None) -> list[dict[str, Any]]:
    """Fingerprints of voices given as files (piper .onnx, hf VITS folders; `synth.voices` unless `voices` are
    given); voice names are config."""
    if exp.synth.backend == "espeak":
        return []
    names = [v.split("#")[0] for v in (exp.synth.voices if voices is None else voices)]
    return fingerprints([v for v in names if is_remote(v) or Path(v).exists()])


_CHECKPOINT_NAMES = ("final", "before_dpo", "init", "all")


def input_fingerprints(exp: Experiment, stage: str) -> dict[str, Any]:
    """{field: fingerprint or [fingerprints]} of every input of a stage's section given by path."""
    found: dict[str, Any] = {}

    def model(field: str, name: str | None) -> None:  # HF id or path: a path is fingerprinted, an id is "absent"
        if name:
            found[field] = fingerprint(name)

    if stage == "synth":
        if exp.synth.corpus.source != "grammar" and exp.synth.corpus.path:
            found["corpus.path"] = fingerprint(exp.synth.corpus.path)
        if exp.synth.preferences:
            found["preferences.path"] = fingerprint(exp.synth.preferences.path)
            own = exp.synth.preferences.voices  # None: synth.voices, fingerprinted above
            if own and (voices := _voice_files(exp, own)):  # absent for voice names: keys stay
                found["preferences.voices"] = voices
        if voices := _voice_files(exp):
            found["voices"] = voices
    elif stage == "extract":
        if inputs := _paths(exp.extract.inputs, ("@synth",)):
            found["inputs"] = fingerprints(inputs)
            # a word alignment `<name>.json` beside an audio file given alone or by a glob (a folder's listing
            # already holds its own); absent when there is none, so keys without alignments stay as they were
            if sidecars := _alignment_sidecars(inputs):
                found["alignment_sidecars"] = fingerprints(sidecars)
        model("tokenizer.centroids", exp.extract.tokenizer.centroids)
        model("tokenizer.model", exp.extract.tokenizer.model)
    elif stage == "pack":
        if inputs := _paths(exp.pack.inputs, ("@extract",)):
            found["inputs"] = fingerprints(inputs)
        for dataset in exp.pack.text:  # a text-only dataset's corpus file or folder
            if dataset.corpus.source != "grammar" and dataset.corpus.path:
                found[f"text.{dataset.name}"] = fingerprint(dataset.corpus.path)
        if exp.pack.interleave is not None:  # the text tokenizer (its own, or the TWIST base's) makes the text ids
            source = exp.pack.interleave.tokenizer or exp.train.model.base
            if source == "@grammar":  # built from the grammar's sentences: their generator's version keys it
                found["interleave.tokenizer"] = f"@grammar/sentences_v{SENTENCES_VERSION}"
            else:
                model("interleave.tokenizer", source)
    elif stage == "train":
        model("model.base", exp.train.model.base)
    elif stage == "dpo":
        model("init", exp.dpo.init)
        if inputs := _paths(exp.dpo.inputs, ("@grammar",)):
            found["inputs"] = fingerprints(inputs)
    elif stage == "eval":
        entries = exp.eval.task_entries()
        if tasks := [e.task for e in entries if Path(e.task).suffix in (".yaml", ".yml")]:
            found["tasks"] = fingerprints(tasks)  # a task YAML of one's own (shipped ones are code)
        if data := [e.path for e in entries if e.path]:
            found["tasks.path"] = fingerprints(data)
        if folders := [c for c in exp.eval.checkpoints if c not in _CHECKPOINT_NAMES]:
            found["checkpoints"] = fingerprints(folders)
        generation = exp.eval.generation
        model("generation.vocoder", generation.vocoder)
        model("generation.asr", generation.asr if generation.asr != "pocketsphinx" else None)
        model("generation.text_lm", generation.text_lm)
    return found


def _spoken_grammar(exp: Experiment) -> dict[str, Any]:
    """What held-out grammar items spoken by a stage itself (eval pairs, DPO triples) depend on: the synth
    voices, the held-out split, and the extract tokenizer that turns them into units."""
    synth = key_view(exp.synth)
    voices = {k: synth[k] for k in ("backend", "voices", "speed", "sample_rate")}
    if files := _voice_files(exp):
        voices["fingerprints"] = files
    return {"voices": voices, "held_out_percent": synth["corpus"]["held_out_percent"],
            "extract": stage_key(exp, "extract")}


def stage_payload(exp: Experiment, stage: str) -> dict[str, Any]:
    """What a stage's output depends on: its section (with the fingerprints of its inputs given by path),
    upstream keys, and its format version from 2 on."""
    payload = _section_payloads(exp, stage)
    if STAGE_FORMAT[stage] > 1:
        payload["format_version"] = STAGE_FORMAT[stage]
    return payload


def _section_payloads(exp: Experiment, stage: str) -> dict[str, Any]:
    def section(name: str) -> dict[str, Any]:
        payload = key_view(getattr(exp, name))
        if found := input_fingerprints(exp, name):
            payload["fingerprints"] = found
        return payload

    if stage == "synth":
        payload = {"synth": section("synth")}
        if exp.synth.corpus.source == "grammar":
            payload["grammar_version"] = SENTENCES_VERSION
        return payload
    if stage == "extract":
        payload: dict[str, Any] = {"extract": section("extract")}
        # tokenizer.dtype applies on a GPU only (HuBERT runs fp32 on CPU): where the actors get no GPU, the units
        # are fp32's, so the key says so (else a bf16 GPU output and a CPU rerun of it shared one key and folder)
        tokenizer = exp.extract.tokenizer
        if tokenizer.kind == "hubert" and tokenizer.dtype != "float32" and not exp.extract.num_gpus_per_actor:
            payload["encoder_dtype"] = "float32"
        if any(path == "@synth" for _, path in exp.named_inputs()):
            payload["synth"] = stage_key(exp, "synth")
        return payload
    if stage == "pack":
        payload = {"pack": section("pack")}
        if exp.pack.interleave is not None:  # absent otherwise: speech-only keys stay
            payload["interleave_version"] = INTERLEAVE_VERSION
            # where spans are cut (frame rate) and where units and markers sit (unit count): keyed through
            # extract's key when it is an input, directly when the units come from slamkit files
            payload["units"] = {"frame_rate": exp.extract.tokenizer.frame_rate, "n_units": exp.extract.tokenizer.n_units}
        elif any(entry != "@extract" for _, entry in name_entries(exp.pack.inputs, {"@extract": "@extract"})):
            # slamkit JSONL units: train sizes the model's vocabulary from n_units (through @extract otherwise)
            payload["units"] = {"n_units": exp.extract.tokenizer.n_units}
        if any(d.corpus.source == "grammar" for d in exp.pack.text):
            payload["grammar_version"] = SENTENCES_VERSION
        # also a named `{name, path: "@extract"}` entry (an `in` on the list missed it: new units reused a stale pack)
        if any(entry == "@extract" for _, entry in name_entries(exp.pack.inputs, {"@extract": "@extract"})):
            payload["extract"] = stage_key(exp, "extract")
        return payload
    if stage == "train":
        payload = {"train": section("train"), "pack": stage_key(exp, "pack")}
        if exp.train.schedule.name == "inverse_sqrt" and INVERSE_SQRT_VERSION > 1:  # absent otherwise: keys stay
            payload["inverse_sqrt_version"] = INVERSE_SQRT_VERSION
        if exp.train.model.init == "random" and exp.train.model.base:  # built fp32 since 2026-12-02, not in the
            payload["random_init_dtype"] = "float32"                    # base's recorded dtype
        return payload
    if stage == "dpo":
        payload = {"dpo": section("dpo")}
        # How DPO trains (dpo.precision/compile/gradient_checkpointing/strategy, its own or train's): what every DPO
        # ran before these settings existed (fp32, no compile, no checkpointing, DDP) keeps today's keys; anything
        # else is keyed, so an fp32 DPO output is never reused as a bf16 one (the `slam` recipes' DPO became bf16).
        for name in TRAINER_FIELDS:
            del payload["dpo"][name]
        if changed := {name: value for name, value in exp.trainer_settings("dpo").items()
                       if value != DPO_TRAINER_BEFORE[name]}:
            payload["dpo_trainer"] = changed
        if exp.dpo.schedule == "inverse_sqrt" and INVERSE_SQRT_VERSION > 1:
            payload["inverse_sqrt_version"] = INVERSE_SQRT_VERSION
        if not exp.dpo.init:
            payload["train"] = stage_key(exp, "train")
        if "@grammar" in exp.dpo.inputs:
            payload.update(_spoken_grammar(exp), preferences_version=PREFERENCES_VERSION)
        return payload
    if stage == "eval":
        payload = {"eval": section("eval"), **_spoken_grammar(exp), "pairs_version": PAIRS_VERSION,
                   "readers_version": READERS_VERSION}
        if any(load_task(e.task).reader in CROSS_MODAL_READERS for e in exp.eval.task_entries()):  # else absent: keys stay
            payload["cross_modal_version"] = CROSS_MODAL_VERSION
        if any("frequency_band" in load_task(e.task).breakdown for e in exp.eval.task_entries()):
            payload["frequency_bands_version"] = FREQUENCY_BANDS_VERSION
        if evaluates_trained_stage(exp):  # not when every checkpoint is a folder given by path
            trained_by = trained_stage(exp)
            payload[trained_by] = stage_key(exp, trained_by)
        return payload
    raise ValueError(f"unknown stage {stage!r}")


def upstream_stages(exp: Experiment, stage: str) -> list[str]:
    """The stages whose outputs `stage` reads (the stage names in its payload)."""
    return [name for name in stage_payload(exp, stage) if name in STAGES and name != stage]


def stage_key(exp: Experiment, stage: str) -> str:
    return config_hash(stage_payload(exp, stage))


@dataclass
class StageDir:
    """A stage's output folder at `root` (a local path, or a URI when the workdir is in object storage). Files
    are written into `path` (the folder, or this machine's staging copy of it) and published; the manifest is
    published last, so a complete manifest means every file is there. Any process on any node reads a file
    or folder of it with `local(...)`, or hands `location(...)` to actors and workers."""

    stage: str
    key: str
    root: str

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    @property
    def path(self) -> Path:
        return local_path(self.root)

    def location(self, *parts: str) -> str:
        return join(self.root, *parts)

    def local(self, *parts: str) -> Path:
        """The local copy of a file or folder of this output (fetched once when remote)."""
        return localize(self.location(*parts))

    def publish(self, *parts: str) -> None:
        """Upload what was written locally under `parts` (everything when none); nothing to do when local."""
        publish(self.root, "/".join(parts))

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def errors_path(self) -> Path:
        return self.path / "errors.jsonl"

    def read_manifest(self) -> dict[str, Any] | None:
        text = read_text(self.location("manifest.json"))
        return json.loads(text) if text is not None else None

    def is_complete(self) -> bool:
        """Only `complete` counts: a `partial` output (some parts failed) is re-entered by the next run."""
        manifest = self.read_manifest()
        return manifest is not None and manifest.get("status") == "complete"

    def failed_parts(self) -> dict[str, str]:
        """The parts a `partial` output lacks (name -> reason); empty for any other status."""
        manifest = self.read_manifest() or {}
        return dict(manifest.get("failed", {})) if manifest.get("status") == "partial" else {}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        tmp.replace(self.manifest_path)  # atomic: a crash never leaves a half-written manifest
        self.publish("manifest.json")

    def write_errors(self, errors: list[dict[str, Any]]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.errors_path, "w") as f:
            for row in errors:
                f.write(json.dumps(row, default=str) + "\n")


def stage_dir(exp: Experiment, stage: str) -> StageDir:
    key = stage_key(exp, stage)
    return StageDir(stage, key, join(workdir_location(exp), stage, key))


def upstream_dir(exp: Experiment, stage: str) -> StageDir:
    """The output of an upstream stage, which must be complete."""
    sd = stage_dir(exp, stage)
    if not sd.is_complete():
        raise SlamError(
            f"this stage needs the output of `{stage}`, which is missing at {sd.root}. "
            f"Run `slam-ray {stage} EXPERIMENT` (with the same --set overrides) or `slam-ray run EXPERIMENT` first."
        )
    return sd


def trained_checkpoint_dir(exp: Experiment) -> StageDir:
    return upstream_dir(exp, trained_stage(exp))


class Timer:
    """Wall-clock seconds per named phase, for manifests and MLflow."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.timings[self.name] = round(time.perf_counter() - self.start, 3)
