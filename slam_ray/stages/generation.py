"""The `generate` eval task: continue spoken prompts, then (optionally) vocode, transcribe and score the text.

Prompts: the first `eval.generation.prompt_seconds` of each audio file of the task's `path` (a folder, a glob,
or a JSONL manifest of `{"path", "text"?}`), tokenised with the experiment's tokenizer and cut by unit
durations; or unit prompts from a slamkit features JSONL (`{"file_name", "units", "duration"}`). Sampling:
temperature, top-k, new tokens and repetition penalty from `eval.generation`, one seed per sample, so a rerun
gives the same units whatever the number of actors. Work is spread over Ray Data actors (`eval.num_actors`),
each holding the model, the vocoder and the ASR engine.

With `eval.generation.vocoder` set, each continuation (alone with `drop_prompt`, else prompt + continuation)
becomes audio, then text (`asr`), and `text_lm` gives GenPPL; Auto-BLEU needs only the transcripts. Prompt
files whose manifest line has a `text` are also transcribed whole: `asr_wer` says how far to trust the ASR.
Outputs in the eval folder, `<task>/`: `generated.jsonl` (units, transcripts), `audio/*.wav`.

An interleaved model (merged vocabulary) reads each prompt as its training read speech, `BOS <speech> units`, and
samples in one modality (`eval.generation.modality`): speech, only units or EOS (text ids masked); or text, after a
`<text>` marker only text ids, decoded by the experiment's text tokenizer and scored as the transcript.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slam_ray.config import EvalTask, Experiment
from slam_ray.core.stage_io import StageDir
from slam_ray.core.storage import join, model_source, write_bytes
from slam_ray.errors import SlamError
from slam_ray.lm.textmetrics import generative_summary, text_nll, word_error_rate
from slam_ray.lm.vocabulary import (
    MergedVocabulary,
    Vocabulary,
    load_text_tokenizer,
    speech_sequence,
    tokenizer_source,
    vocabulary_of_pack,
)
from slam_ray.parallel.audio_units import audio_units
from slam_ray.speech.units import EOS_ID, PAD_ID, tokens_to_units, units_to_tokens


def _natural(path: str) -> list:
    """Name order with numbers compared as numbers: `2_correct` before `10_correct` (the sSC layout)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _prompt_sources(path: str, n: int) -> list[dict[str, Any]]:
    """Rows `{id, path, text?}` or `{id, units, duration?}` for the first `n` prompts of the task's path."""
    p = Path(path).expanduser()
    if p.suffix == ".jsonl":
        if not p.is_file():
            raise SlamError(f"generate: prompt manifest {p} does not exist")
        rows = []
        for i, line in enumerate(t for t in p.read_text().splitlines() if t.strip()):
            rec = json.loads(line)
            uid = str(rec.get("id") or Path(rec.get("file_name") or rec.get("path") or f"prompt{i}").stem)
            if "units" in rec:
                rows.append({"id": uid, "units": rec["units"], "duration": rec.get("duration")})
            elif "path" in rec:
                audio = rec["path"] if Path(rec["path"]).is_absolute() else str(p.parent / rec["path"])
                rows.append({"id": uid, "path": audio, "text": rec.get("text")})
            else:
                raise SlamError(f"{p}:{i + 1}: a prompt line needs `path` (audio) or `units`")
    else:
        pattern = str(p / "**" / "*") if p.is_dir() else str(p)
        files = sorted((f for f in glob.glob(pattern, recursive=True)
                        if Path(f).suffix.lower() in (".wav", ".flac", ".ogg", ".mp3")), key=_natural)
        # a folder's prompts by their path in it (a/1.wav and b/1.wav are two prompts: a/1 -> a__1), a glob's by stem
        rows = [{"id": Path(f).relative_to(p).with_suffix("").as_posix().replace("/", "__") if p.is_dir()
                 else Path(f).stem, "path": f} for f in files]
    if not rows:
        raise SlamError(f"generate: no prompts in {path} (a folder or glob of audio, or a JSONL of paths or units)")
    first: dict[str, dict] = {}
    for row in rows:  # an id names the prompt's samples and their audio files: two prompts, one id would clash
        if (other := first.setdefault(row["id"], row)) is not row:
            raise SlamError(f"generate: two prompts in {path} have the id {row['id']!r} ({other.get('path', 'units')} "
                            f"and {row.get('path', 'units')}); give each its own `id` (JSONL) or file name")
    return rows[:n]


def _cut(units: list[int], durations: list[int] | None, seconds: float, frame_rate: float) -> list[int]:
    """The units that start within the first `seconds` (all of them without durations)."""
    if not durations:
        return list(units)
    starts = np.concatenate([[0], np.cumsum(durations)[:-1]]) / frame_rate
    return [u for u, s in zip(units, starts, strict=True) if s < seconds]


def prompts(exp: Experiment, entry: EvalTask) -> tuple[list[dict[str, Any]], list[dict]]:
    """(prompt rows with `units`, errors). Audio prompts are tokenised through eval's cache of audio units."""
    cfg = exp.eval.generation
    sources = _prompt_sources(entry.path, cfg.n_prompts)
    audio = [r["path"] for r in sources if "path" in r]
    units, durations, errors = audio_units(exp, audio) if audio else ({}, {}, [])
    out = []
    for row in sources:
        if "units" in row:
            found, runs = row["units"], row.get("duration")
        elif row["path"] in units:
            found, runs = units[row["path"]], durations[row["path"]]
        else:
            continue
        prompt = _cut(found, runs, cfg.prompt_seconds, exp.extract.tokenizer.frame_rate)
        if prompt:
            out.append({**row, "units": prompt})
    return out, errors


class OneModality:
    """A logits processor confining sampling to one modality of a merged vocabulary: `speech` leaves the units and
    EOS, `text` the text tokenizer's ids (EOS among them); every other id is -inf (an interleaved model would
    otherwise wander between modalities, and no vocoder speaks text)."""

    def __init__(self, vocab: MergedVocabulary, modality: str = "speech", special_ids: Sequence[int] = ()) -> None:
        """`special_ids`: the text tokenizer's special tokens, kept out of a text continuation (EOS still ends it)."""
        self.vocab, self.modality, self.special_ids = vocab, modality, list(special_ids)
        self.blocked = None  # made at the first call, on the scores' device and for their width

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.blocked is None or self.blocked.shape[-1] != scores.shape[-1] or self.blocked.device != scores.device:
            self.blocked = torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
            if self.modality == "text":
                self.blocked[: self.vocab.text_size] = False
                self.blocked[self.special_ids] = True
            else:
                self.blocked[self.vocab.unit_offset : self.vocab.unit_offset + self.vocab.n_units] = False
            self.blocked[self.vocab.eos_id] = False
        return scores.masked_fill(self.blocked, float("-inf"))


class GenerateActor:
    """Ray Data actor: prompt rows -> sampled continuations (+ audio, transcript when a vocoder is given).
    `vocabulary`: a merged vocabulary's pack-index entry for an interleaved model (the prompt is read as interleaved
    training reads speech, `BOS <speech> units`, and sampling stays in one modality: the units, or with
    `settings["modality"] == "text"` text tokens after a `<text>` marker, decoded by `text_tokenizer`); None =
    speech-only ids."""

    def __init__(self, checkpoint: str, settings: dict[str, Any], audio_dir: str, threads: int = 1,
                 vocabulary: dict[str, Any] | None = None, text_tokenizer: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from slam_ray.lm.textmetrics import Transcriber
        from slam_ray.parallel.actors import limit_threads
        from slam_ray.speech.vocoder import load_vocoder

        limit_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_source(checkpoint)).to(self.device).eval()
        self.s = settings
        self.text = settings.get("modality") == "text"
        self.vocoder = load_vocoder(settings["vocoder"]) if settings["vocoder"] and not self.text else None
        # the prompts' ASR check (`asr_wer`) only matters when transcripts come from the ASR: not in text mode
        self.asr = Transcriber(settings["asr"], self.device) if self.vocoder or (settings["wer"] and not self.text) else None
        self.audio_dir = audio_dir  # a folder or a URI: written through the storage layer
        self.merged = vocabulary_of_pack(vocabulary, 0) if vocabulary else None
        self.tokenizer = load_text_tokenizer(text_tokenizer) if self.text else None
        self.processors = None  # a merged vocabulary's sampling, kept to one modality (its mask made once)
        if self.merged is not None:
            from transformers import LogitsProcessorList

            special = [i for i in self.tokenizer.all_special_ids if i != self.merged.eos_id] if self.text else []
            self.processors = LogitsProcessorList([OneModality(self.merged, "text" if self.text else "speech", special)])

    def _continue(self, prompt: list[int], seed: int) -> list[int]:
        """The sampled continuation: units, or (text modality) text token ids."""
        import torch

        vocab = self.merged
        if vocab is None:
            prompt_ids, eos, pad = units_to_tokens(prompt, add_eos=False).tolist(), EOS_ID, PAD_ID
        else:
            prompt_ids = speech_sequence(vocab, prompt)[0][:-1]  # BOS <speech> units, without the EOS
            if self.text:
                prompt_ids.append(vocab.text_marker)  # a modality switch opens with its marker, as in training
            eos, pad = vocab.eos_id, vocab.pad_id
        ids = torch.tensor([prompt_ids], device=self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                      temperature=self.s["temperature"], top_k=self.s["top_k"],
                                      max_new_tokens=self.s["max_new_tokens"],
                                      repetition_penalty=self.s["repetition_penalty"],
                                      eos_token_id=eos, pad_token_id=pad, logits_processor=self.processors)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: new.index(eos)] if eos in new else new
        if vocab is None:
            return tokens_to_units(new).tolist()
        return new if self.text else [i - vocab.unit_offset for i in new]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import io

        import soundfile as sf

        from slam_ray.speech.audio import decode_audio
        from slam_ray.speech.vocoder import vocode

        rows = []
        for row in batch.to_dict("records"):
            prompt = [int(u) for u in row["units"]]
            new = self._continue(prompt, int(row["seed"]))
            units = [] if self.text else new
            out = {"key": row["key"], "id": row["id"], "sample": row["sample"], "seed": row["seed"],
                   "prompt_units": prompt, "units": units, "text_ids": new if self.text else [], "text": None,
                   "transcript": None, "audio": None, "wer_edits": None, "wer_words": None}
            spoken = units if self.s["drop_prompt"] else prompt + units
            if self.text:  # the continuation is text: scored as the transcript, nothing to vocode
                text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
                out.update(text=text, transcript=text)
            elif self.vocoder is not None and not spoken:  # the model ended at once (EOS first): it said nothing
                out.update(transcript="")
            elif self.vocoder is not None:
                wav = vocode(self.vocoder, spoken)
                path = join(self.audio_dir, f"{row['key']}.wav")
                buffer = io.BytesIO()
                sf.write(buffer, wav, self.vocoder.sample_rate, format="WAV")
                write_bytes(path, buffer.getvalue())
                out.update(audio=path, transcript=self.asr(decode_audio(buffer.getvalue())))
            if self.asr is not None and isinstance(row.get("text"), str) and isinstance(row.get("path"), str):
                edits, n_words = word_error_rate(row["text"], self.asr(decode_audio(row["path"])))
                out.update(wer_edits=edits, wer_words=n_words)
            rows.append(out)
        return pd.DataFrame(rows)


def run_generation(exp: Experiment, entry: EvalTask, checkpoint: str, out: StageDir, name: str,
                   vocab: Vocabulary | None = None) -> dict[str, Any]:
    """Generate from every prompt into the folder `name` of the eval output: `generated.jsonl` and the audio;
    return the task's results (figures + settings). `vocab`: the checkpoint's (a merged one for an interleaved
    model, whose continuations stay in `eval.generation.modality`); None = speech-only."""
    from slam_ray.parallel.actors import map_rows, one_cpu_actor

    cfg = exp.eval.generation
    text = cfg.modality == "text"  # only with pack.interleave: the experiment file's check
    if cfg.vocoder and not text:  # fail here with the reason, not in every actor's constructor
        from slam_ray.lm.textmetrics import check_asr
        from slam_ray.speech.vocoder import load_vocoder

        load_vocoder(cfg.vocoder)
        check_asr(cfg.asr)
    rows, errors = prompts(exp, entry)
    if not rows:
        raise SlamError(f"generate: none of the prompts in {entry.path} could be tokenised ({len(errors)} errors)")
    out_dir = out.path / name
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**cfg.model_dump(mode="json"), "wer": any(isinstance(r.get("text"), str) for r in rows)}
    work = [{"key": f"{r['id']}-{k}", "id": r["id"], "sample": k, "seed": cfg.seed * 1_000_003 + i * 97 + k,
             "units": r["units"], "path": r.get("path"), "text": r.get("text")}
            for i, r in enumerate(rows) for k in range(cfg.samples_per_prompt)]
    ctor = {"checkpoint": checkpoint, "settings": settings, "audio_dir": out.location(name, "audio"),
            "threads": max(1, int(exp.ray.actor_cpus)),
            "vocabulary": vocab.index_entry() if isinstance(vocab, MergedVocabulary) else None,
            "text_tokenizer": tokenizer_source(exp) if text else None}
    done = [df for df in map_rows(exp, work, GenerateActor, ctor, exp.eval.num_actors, 4, exp.eval.num_gpus_per_actor,
                                  in_driver=one_cpu_actor(exp.eval.num_actors, exp.eval.num_gpus_per_actor))]
    generated = pd.concat(done, ignore_index=True).sort_values("key").reset_index(drop=True)

    result: dict[str, Any] = {"prompts": len(rows), "samples": len(generated),
                              **({"mean_new_text_tokens": float(generated["text_ids"].map(len).mean())} if text else
                                 {"mean_new_units": float(generated["units"].map(len).mean())}),
                              "prompt_errors": len(errors), "checkpoint": str(checkpoint),
                              "settings": cfg.model_dump(mode="json")}
    if cfg.vocoder or text:
        transcripts = [t or "" for t in generated["transcript"]]
        nlls: list[float | None] = [None] * len(transcripts)
        if cfg.text_lm:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = "cuda" if torch.cuda.is_available() else "cpu"
            lm = AutoModelForCausalLM.from_pretrained(cfg.text_lm).to(device)
            tok = AutoTokenizer.from_pretrained(cfg.text_lm)
            kept = [i for i, t in enumerate(transcripts) if t.strip()]
            for i, nll in zip(kept, text_nll(lm, tok, [transcripts[i] for i in kept], device), strict=True):
                nlls[i] = nll
        result.update(generative_summary(transcripts, nlls, cfg.auto_bleu_n))
    if generated["wer_words"].notna().any():
        words_total = float(generated["wer_words"].sum())
        result["asr_wer"] = float(generated["wer_edits"].sum()) / max(words_total, 1.0)
    with open(out_dir / "generated.jsonl", "w") as f:
        for rec in generated.drop(columns=["wer_edits", "wer_words"]).to_dict("records"):
            f.write(json.dumps({k: (list(map(int, v)) if k.endswith(("units", "_ids")) else v) for k, v in rec.items()},
                               default=str) + "\n")
    print(f"[eval] {entry.key}: {len(generated)} continuations of {len(rows)} prompts -> {out_dir / 'generated.jsonl'}"
          + "".join(f", {k} {result[k]:.3f}" for k in ("genppl", f"auto_bleu_{cfg.auto_bleu_n}", "asr_wer") if k in result))
    return result
