"""Helpers the tests share: a scaled-down experiment, a reduced pipeline's outputs linked into a test's workdir,
real speech for miniature benchmark layouts, tiny models (text LM, HuBERT, VITS, HiFi-GAN) and files that tests of
several folders build, and killing a run (or one of its workers) mid-way.
Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

# Real speech with slamkit's own unit files (MIT; origin and licence in tests/data/slamkit_example/README.md).
FIXTURES = Path(__file__).resolve().parent / "data" / "slamkit_example"

S3_SECRET = "planted-SECRET-9f8e7d6c5b4a"  # the secret key: must never reach params, tags, artifacts or manifests

# The session's reduced quickstart trains with these (`small_experiment`'s 30 steps, a checkpoint every 10): tests
# that need a trained model of that shape link its train stage instead of training their own.
REDUCED_TRAIN = {"checkpoint_every": 10}


class CliRun(NamedTuple):
    """An experiment run through `slam-ray run` in a subprocess: its experiment file, the finished process and
    the text of Ray Data's logs of that run."""

    exp: Any
    path: Path
    proc: subprocess.CompletedProcess
    data_logs: str


def small_experiment(workdir: Path | str, **sections):
    """A quickstart-shaped experiment scaled down to seconds per stage."""
    from slam_ray.config import Experiment

    data = {
        "name": "tiny",
        "workdir": str(workdir),
        "ray": {"actor_cpus": 0.5, "worker_cpus": 1},
        "synth": {"corpus": {"n_sentences": 240}, "num_actors": 2, "batch_size": 16},
        "extract": {"tokenizer": {"n_units": 48, "fit_frames": 4000}, "batch_size": 16},
        "pack": {"context_len": 128, "val_fraction": 0.05},
        "train": {"batch_size": 8, "max_steps": 30, "max_minutes": None, "log_every": 5,
                  "model": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                            "intermediate_size": 128}},
        "eval": {"n_pairs": 12, "batch_size": 16},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return Experiment.model_validate(data)


def link_upstream(exp, built, stages: tuple[str, ...] = ("synth", "extract", "pack")) -> None:
    """Link `built`'s finished outputs of `stages` into `exp`'s workdir (the same stage keys: they only differ in
    later stages), so a test reuses the session's reduced pipeline instead of building it again."""
    from slam_ray.core.stage_io import stage_dir

    for stage in stages:
        source, target = stage_dir(built, stage), stage_dir(exp, stage)
        assert source.key == target.key, f"{stage}: the test's config changes this stage; build it instead"
        assert source.is_complete(), f"{stage} of the shared pipeline is not complete"
        target.path.parent.mkdir(parents=True, exist_ok=True)
        if not target.path.exists():
            os.symlink(source.path, target.path)


def link_caches(exp, built, kinds: tuple[str, ...] = ("eval_pairs", "eval_units", "dpo_triples")) -> None:
    """Link `built`'s finished workdir caches (spoken and tokenised eval pairs, eval audio units, DPO triples)
    entry by entry into `exp`'s workdir: an entry of the same key is read instead of spoken and encoded again, and
    one of another key is built in `exp`'s own folder, not in `built`'s."""
    from slam_ray.core.storage import workdir_path

    for kind in kinds:
        source = workdir_path(built) / kind
        for entry in sorted(source.iterdir()) if source.is_dir() else []:
            target = workdir_path(exp) / kind / entry.name
            if entry.is_dir() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(entry, target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def speak_wav(path: Path, text: str, voice: str = "en-us", speed: int = 160) -> Path:
    """Real speech for miniature benchmark layouts: espeak-ng straight to a 22 kHz WAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    return path


def make_benchmark_layouts(root: Path) -> dict[str, Path]:
    """Miniature copies of the official layouts, spoken by espeak-ng: ZeroSpeech 2021 lexical + syntactic dev
    (wavs + gold.csv), a SpokenStoryCloze folder, two SALMon subsets, and a JSONL manifest with a 3-way group."""
    import pandas as pd

    voices = ["en-us", "en-gb"]
    lexical = root / "zr2021" / "lexical" / "dev"
    rows = []
    for i, (word, nonword, freq) in enumerate([("garden", "gardel", 120), ("window", "wintow", 40),
                                                ("pencil", "pentil", 3), ("zebra", "zeblo", 0)]):
        for voice in voices:
            for text, correct in ((word, 1), (nonword, 0)):
                name = f"{'w' if correct else 'n'}{i}_{voice}"
                speak_wav(lexical / f"{name}.wav", text, voice)
                rows.append({"filename": name, "id": i, "voice": voice, "frequency": freq if correct else None,
                             "word": text, "phones": "", "length": len(text), "correct": correct})
    pd.DataFrame(rows).to_csv(lexical / "gold.csv", index=False)
    syntactic = root / "zr2021" / "syntactic" / "dev"
    rows = []
    for i, (good, bad, kind) in enumerate([("the dog runs", "the dog run", "agreement"),
                                           ("the cats sleep", "the cats sleeps", "agreement"),
                                           ("a big bird sings", "a bird big sings", "word_order")]):
        for voice in voices:
            for text, correct in ((good, 1), (bad, 0)):
                name = f"{i}_{voice}_{correct}"
                speak_wav(syntactic / f"{name}.wav", text, voice)
                rows.append({"filename": name, "id": i, "voice": voice, "type": kind, "subtype": kind,
                             "correct": correct, "transcription": text})
    pd.DataFrame(rows).to_csv(syntactic / "gold.csv", index=False)
    ssc = root / "sSC"
    for i, (story, right, wrong) in enumerate([("she was hungry", "so she ate", "so the car flew"),
                                               ("it rained all day", "the grass was wet", "the moon sang"),
                                               ("he lost his keys", "he looked for them", "a fish is blue")]):
        speak_wav(ssc / f"{i}_correct.wav", f"{story} {right}")
        speak_wav(ssc / f"{i}_incorrect.wav", f"{story} {wrong}")
    salmon = root / "salmon"
    for subset in ("gender_consistency", "speaker_consistency"):
        for i in range(3):
            speak_wav(salmon / subset / f"sample_{i}_0.wav", "one two three four", voices[0])
            speak_wav(salmon / subset / f"sample_{i}_1.wav", "one two three four", voices[i % 2])
    manifest = root / "pairs" / "pairs.jsonl"
    lines = []
    for i, (pos, negs) in enumerate([("the girl sings", ["sings the girl"]),
                                     ("a boy walks", ["walks boy a", "boy a walks"])]):
        speak_wav(manifest.parent / f"p{i}.wav", pos)
        for k, neg in enumerate(negs):
            speak_wav(manifest.parent / f"n{i}_{k}.wav", neg)
        lines.append({"id": f"m{i}", "positive": f"p{i}.wav", "negatives": [f"n{i}_{k}.wav" for k in range(len(negs))],
                      "subset": "pairs" if len(negs) == 1 else "groups"})
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return {"zerospeech": root / "zr2021", "ssc": ssc, "salmon": salmon, "manifest": manifest}


def save_tiny_qwen25(folder: Path, texts: list[str], rows: int = 320) -> Path:
    """A random Qwen2.5-shaped text LM (grouped-query attention, tied embeddings, RoPE theta 1e6) with a byte-level
    BPE tokenizer trained here on `texts`, saved as a Hugging Face folder like `Qwen/Qwen2.5-0.5B`'s: more
    embedding rows (`rows`) than tokenizer tokens, EOS `<|endoftext|>` also its pad, no BOS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 max_position_embeddings=512,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})).save_pretrained(folder)
    return folder


def save_tiny_text_lm(folder: Path) -> Path:
    """A tiny random GPT-2 with a word-level tokenizer, saved like any HF text LM (for GenPPL)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", *TEXT_LM_WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(folder)
    return folder


TEXT_LM_WORDS = ["the", "dog", "cat", "runs", "sat", "a", "one", "two", "three", "four"]


def save_tiny_whisper(folder: Path) -> Path:
    """A tiny random Whisper (English-only) whose vocabulary is the tiny text LM's words, saved with its feature
    extractor and tokenizer the way a Hub checkpoint is: what `eval.generation.asr` loads by path. Its random
    transcripts are words, so GenPPL and Auto-BLEU have text to score."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    specials = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|startoflm|>",
                "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    vocab = {f"\u0120{w}": i for i, w in enumerate(TEXT_LM_WORDS)}  # \u0120: a leading space, byte-level
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *specials]}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_target_positions=64, decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, bos_token_id=end))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=False, max_length=24, begin_suppress_tokens=[end],
        suppress_tokens=[ids[t] for t in specials])  # words or the end, whatever the random weights prefer
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return folder


def plain_text_nll(model, tokenizer, text: str) -> float:
    """A text's mean next-token NLL under a text LM through one plain, unpadded forward pass (GenPPL by hand)."""
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return -logp.gather(-1, ids[0, 1:, None]).mean().item()


def plain_nll(model, units: list[int]) -> float:
    """slamkit's score by hand: mean NLL of every token after BOS (EOS included), one unpadded sequence, through a
    plain forward pass (what the eval tests check slam_ray's scoring against)."""
    import torch

    ids = torch.tensor([[1, *(u + 2 for u in units), 1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return -logp.gather(-1, ids[0, 1:, None]).mean().item()


def actors_of(ray_module) -> list:  # noqa: ANN001
    """The actors of the Ray instance this process joined (state API records, any state), asked at its address:
    with no address the state API picks "the latest" local instance, which on a machine running a second Ray (a
    developer's own, another test process's) is not this one."""
    from ray.util.state import list_actors

    return list_actors(address=ray_module.get_runtime_context().gcs_address, limit=10_000,
                       raise_on_missing_output=False)


def kill_a_worker_during(run: Callable[[], object], ready: Callable[[], bool],
                         actor_class: str = "RayTrainWorker") -> tuple[int | None, list[BaseException]]:
    """Run `run` in a thread and SIGKILL one live actor of `actor_class` (a Ray Train worker by default) as soon
    as `ready()`; wait for `run` to end. Returns (the killed pid or None if it ended first, the errors `run`
    raised)."""
    import signal
    import threading
    import time

    import ray
    from ray.util.state import list_actors

    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as e:  # surfaced by the caller's assertion
            errors.append(e)

    runner = threading.Thread(target=target)
    runner.start()
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and runner.is_alive():
        if ready():
            # the address, not a scan of the machine's Ray processes: another local Ray would make that ambiguous
            workers = list_actors(address=ray.get_runtime_context().gcs_address,
                                  filters=[("class_name", "=", actor_class), ("state", "=", "ALIVE")])
            if workers:
                victim = workers[0].pid
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=600)
    return victim, errors


def kill_when(command: list[str], cwd: Path, ready: Callable[[], bool], timeout: float = 300,
              env: dict[str, str] | None = None) -> None:
    """Start `command` in its own process group and SIGKILL the whole group (the driver, and its local Ray if it
    started one) as soon as `ready()`; fails if it finishes first or `ready()` never comes. Its output is kept
    in cwd/killed.log."""
    log_path = cwd / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
        deadline = time.time() + timeout
        try:
            while not ready():
                assert proc.poll() is None, "finished before it could be killed:\n" + log_path.read_text()[-3000:]
                assert time.time() < deadline, "not ready to be killed in time"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)



def kill_and_rerun(exp, stage: str, parts: str, n_parts: int, cwd: Path, suffix: str = ".parquet",
                   ray_address: str | None = None):
    """SIGKILL `slam-ray <stage>` on `exp` once two of its `n_parts` shard files (`<output>/<parts>/part-*`) exist,
    run the same command again, and check the rerun kept the finished shards (counted as resumed, files not
    rewritten). Returns the stage's output folder for the caller to compare with a clean run. With `ray_address`
    both runs join that Ray (a driver killed on a running cluster: Ray ends its actors, which may still finish the
    shard they were writing) instead of starting their own."""
    import sys

    from slam_ray.config import to_yaml
    from slam_ray.core.stage_io import stage_dir

    path = cwd / f"{stage}_killed.yaml"
    path.write_text(to_yaml(exp))
    command = [sys.executable, "-m", "slam_ray.cli", stage, str(path)]
    out = stage_dir(exp, stage)
    env = {**os.environ, "RAY_ADDRESS": ray_address} if ray_address else None
    kill_when(command, cwd, lambda: len(list((out.path / parts).glob(f"part-*{suffix}"))) >= 2, env=env)
    before = {p.name: p.stat().st_mtime_ns for p in (out.path / parts).glob(f"part-*{suffix}")}
    assert 2 <= len(before) < n_parts
    rerun = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    # A shard a Ray worker was writing when the driver died may still land (the worker finishes its task, e.g.
    # pack's): it counts as resumed too, but nothing finished before the kill is redone.
    assert len(before) <= out.read_manifest()["counts"]["shards_resumed"] < n_parts
    for name, mtime in before.items():
        assert (out.path / parts / name).stat().st_mtime_ns == mtime  # not redone
    # MLflow: the killed driver's stage run is closed KILLED by the rerun (it was left RUNNING for ever), saying why
    from mlflow.tracking import MlflowClient

    from slam_ray.core.tracking import tracking_uri

    client = MlflowClient(tracking_uri(exp))
    runs = client.search_runs([client.get_experiment_by_name(exp.name).experiment_id],
                              f"tags.`slam_ray.stage` = '{stage}' and tags.`slam_ray.key` = '{out.key}'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"], [r.info.status for r in runs]
    killed = next(r for r in runs if r.info.status == "KILLED")
    assert "driver died" in killed.data.tags["slam_ray.stop_reason"]
    return out

# --- tiny models and files that tests of several folders build (imports inside: conftest imports this module) ---

TINY_HIFIGAN = {"num_embeddings": 20, "embedding_dim": 16, "model_in_dim": 16, "upsample_initial_channel": 32,
                "upsample_rates": [5, 4], "upsample_kernel_sizes": [11, 8], "resblock_kernel_sizes": [3, 5],
                "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]], "resblock": "1", "sampling_rate": 16000}


def save_weight_normed(model, folder, step: int = 1000):
    """Save a `UnitHifiGan` the way textlesslib/speech-resynthesis training does: every conv weight-normalised."""
    import copy

    import torch
    from torch.nn.utils import weight_norm

    normed = copy.deepcopy(model)
    for module in normed.modules():
        if isinstance(module, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
            weight_norm(module)
    with torch.no_grad():  # make g differ from |v| so folding really matters
        for name, p in normed.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(1.7)
    state = normed.state_dict()
    assert any(k.endswith("weight_g") for k in state)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": state}, folder / f"g_{step:08d}")
    (folder / "config.json").write_text(json.dumps(model.cfg))
    return normed


def save_tiny_hubert(folder, rate: int, seed: int = 0) -> str:
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    convs = 7 if rate == 50 else 8  # mHuBERT-25Hz: one more stride-2 conv, hop 640
    config = HubertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * convs, conv_stride=(5,) + (2,) * (convs - 1), conv_kernel=(10, 3, 3, 3, 3) + (2,) * (convs - 5),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        # the 50 Hz one is HuBERT-large-shaped (layer norm, pre-LN), the 25 Hz one base-shaped (group norm, post-LN)
        feat_extract_norm="layer" if rate == 50 else "group", do_stable_layer_norm=rate == 50,
    )
    HubertModel(config).eval().save_pretrained(folder)
    return str(folder)


def long_speech(fixtures, path, seconds: float, sr: int = 16_000):
    """A long file of real speech (the fixture over and over), written block by block; returns its samples."""
    import soundfile as sf

    from slam_ray.speech.audio import decode_audio

    speech = decode_audio(fixtures / "audio1.flac")
    total = int(seconds * sr)
    with sf.SoundFile(path, "w", sr, 1, "PCM_16") as f:
        written = 0
        while written < total:
            piece = speech[: total - written]
            f.write(piece)
            written += len(piece)
    return sf.read(path, dtype="float32")[0]


def save_tiny_vits(folder, seed: int = 0, speakers: int = 1) -> str:
    """A randomly initialised VitsModel (a few hundred k parameters) and a character VitsTokenizer, saved with
    save_pretrained: what `hf` loads for an MMS-TTS id, at toy size. VitsTokenizer needs a vocab.json."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(["<pad>", *" abcdefghijklmnopqrstuvwxyz'-"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(str(folder / "vocab.json"), pad_token="<pad>", unk_token="<unk>", add_blank=True,
                              normalize=True, phonemize=False, is_uroman=False)
    config = VitsConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                        flow_size=16, spectrogram_bins=33, upsample_initial_channel=32, upsample_rates=[8, 8, 4],
                        upsample_kernel_sizes=[16, 16, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
                        prior_encoder_num_flows=1, prior_encoder_num_wavenet_layers=1, duration_predictor_num_flows=1,
                        duration_predictor_filter_channels=16, depth_separable_num_layers=1,
                        posterior_encoder_num_wavenet_layers=1, wavenet_kernel_size=3, sampling_rate=22050,
                        num_speakers=speakers, speaker_embedding_size=8 if speakers > 1 else 0)
    torch.manual_seed(seed)
    VitsModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def dpo_curve(exp, metric: str = "dpo/loss") -> dict[int, float]:
    """{step: value} of a DPO metric over the experiment's DPO runs in MLflow."""
    from mlflow.tracking import MlflowClient

    from slam_ray.core.tracking import tracking_uri

    client = MlflowClient(tracking_uri(exp))
    experiment = client.get_experiment_by_name(exp.name)
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], "tags.`slam_ray.stage` = 'dpo'")
    return {m.step: m.value for r in runs for m in client.get_metric_history(r.info.run_id, metric)}


def logged_steps(exp, stage: str, metric: str):
    """How many times each step of `metric` was logged in the stage's MLflow runs (a Counter): a run resumed from
    a checkpoint logs again only the steps after it; one restarted from scratch logs its first steps twice."""
    from collections import Counter

    from mlflow.tracking import MlflowClient

    from slam_ray.core.tracking import tracking_uri

    client = MlflowClient(tracking_uri(exp))
    experiment = client.get_experiment_by_name(exp.name)
    runs = client.search_runs([experiment.experiment_id], f"tags.`slam_ray.stage` = '{stage}'") if experiment else []
    return Counter(m.step for r in runs for m in client.get_metric_history(r.info.run_id, metric))


def slamkit_jsonl(path, triples: list[dict]) -> None:
    """Triples written the way slamkit's preference_alignment_feature_extractor writes them."""
    from slam_ray.speech.units import tokens_to_units, write_jsonl

    def part(tokens):
        units = tokens_to_units(tokens).tolist()
        return {"units": units, "duration": [1] * len(units)}

    write_jsonl(path, [{"prompt": part(t["prompt"]), "chosen": part(t["chosen"]), "rejected": part(t["rejected"])}
                       for t in triples])


def external_start(tmp_path, n_triples: int, **dpo) -> object:
    """An experiment whose DPO starts from a tiny Qwen2 saved here and reads `n_triples` slamkit preference
    triples from a JSONL (every 10th held out): no upstream stage, no speech."""
    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.config import with_values

    exp = small_experiment(tmp_path / "w", stages=["dpo"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=exp.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "start")
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(2, exp.vocab_size, size=n).tolist()  # noqa: E731
    slamkit_jsonl(tmp_path / "prefs.jsonl", [{"prompt": tokens(8), "chosen": tokens(10), "rejected": tokens(10)}
                                             for _ in range(n_triples)])
    return with_values(exp, {"dpo.init": str(tmp_path / "start"), "dpo.inputs": [str(tmp_path / "prefs.jsonl")],
                             "dpo.reference": "model", **{f"dpo.{k}": v for k, v in dpo.items()}}, "test")


def aligned_features_jsonl(path: Path, n: int, n_units: int, seed: int, frame_rate: int = 25) -> list[dict]:
    """A slamkit features JSONL of `n` utterances with words (`aligned_text`): words `u<i>w<j>` (unique, so a text
    piece names its utterance) of 0.2-0.5 s with 0-0.3-s pauses, over de-duplicated random units of 1-4 frames
    each. Returns the rows written."""
    import numpy as np

    from slam_ray.speech.units import write_jsonl

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words, t = [], float(rng.uniform(0, 0.3))
        for j in range(int(rng.integers(8, 30))):
            length = float(rng.uniform(0.2, 0.5))
            words.append([f" u{i}w{j}", round(t, 3), round(t + length, 3)])
            t += length + float(rng.uniform(0, 0.3))
        units, durations, frames = [], [], 0
        while frames < (t + 0.2) * frame_rate:
            unit = int(rng.integers(0, n_units - 1))
            units.append(unit + 1 if units and unit >= units[-1] else unit)  # never the previous unit again
            durations.append(int(rng.integers(1, 5)))
            frames += durations[-1]
        rows.append({"units": units, "duration": durations, "file_name": f"talk/{i:04d}.flac", "aligned_text": words})
    write_jsonl(path, rows)
    return rows


def interleaved_experiment(tmp_path: Path, train: dict | None = None, **interleave):
    """An experiment packing two slamkit features files: `talk` (words and units, interleaved) and `plain` (units
    only), with a tiny Qwen2.5-shaped text LM as the TWIST base whose tokenizer makes the text ids."""
    import numpy as np

    from slam_ray.speech.units import write_jsonl

    rng = np.random.default_rng(1)
    plain = [rng.integers(0, 500, size=rng.integers(5, 30)).tolist() for _ in range(20)]
    write_jsonl(tmp_path / "plain.jsonl", ({"units": u, "duration": [1] * len(u), "file_name": f"plain/{i:04d}.flac"}
                                           for i, u in enumerate(plain)))
    talk = aligned_features_jsonl(tmp_path / "talk.jsonl", 60, n_units=48, seed=0)
    lm = save_tiny_qwen25(tmp_path / "lm", [" ".join(w for w, _, _ in r["aligned_text"]) for r in talk])
    exp = small_experiment(
        tmp_path / "w", stages=["pack", "train"], extract={"tokenizer": {"n_units": 500, "frame_rate": 25}},
        pack={"inputs": [{"name": "talk", "path": str(tmp_path / "talk.jsonl")},
                         {"name": "plain", "path": str(tmp_path / "plain.jsonl")}],
              "context_len": 64, "val_fraction": 0.1, "interleave": {"datasets": ["talk"], **interleave}},
        train={"model": {"init": "twist", "base": str(lm)}, **(train or {})})
    return exp, talk, plain
