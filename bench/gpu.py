"""GPU figures that need no Ray (a bare GPU machine is enough): training tokens/s and MFU of the paper's 358M
model, and unit-extraction audio-hours per GPU-hour for an mHuBERT-base-shaped tokenizer.

Training: slam_ray's own model builder (`slam_ray.lm.model.build_model`) and optimizers, the Slam model with random
weights (Qwen2.5-0.5B's shape over the 502 unit ids, tied head), context 1024, bf16 autocast, and the train
loop's step (micro-batch forward/backward x grad_accum, clip at 0.5, optimizer step). MFU is computed as `train`
logs it: tokens/s x (6N + 12 L H T) over the dense bf16 data-sheet peak; the bf16 matmul rate measured here is
printed beside it. The Ray Train wrapper's own overhead is measured by bench/train.py (CPU).

Extraction: the work of one `extract` actor on a GPU (`UnitTokenizer.encode_batch`: layers up to the one read,
padded batches with masks and masked group norm, bf16, matmul-argmin on the GPU) over audio already decoded
(decoding runs in CPU tasks beside it), in chunks of `--flushes` seconds like the actor's flushes, for each
batching variant over file set A (cold: batch shapes new to cuDNN), then set B (files never seen), then A and B
again (the steady state of a long job); against slamkit's loop (files sorted by length, padded batches of 8,
every layer computed, decode included) and the one-forward-per-utterance path; the units of the batched path are
compared with per-utterance units. The whole Ray pipeline on a GPU is bench/extract.py (Ray carried there).

    python bench/gpu.py [--steps 12] [--files 400] [--variants 16,8,adamw_fused,1] [--profile] [--skip train]
                        [--shapes 1,4,1,0.5,0,200;0,1,0,0.75,0,800] [--flushes 200,800]
    (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

SLAM_MODEL = {
    "hidden_size": 896,
    "num_layers": 24,
    "num_heads": 14,
    "num_kv_heads": 2,
    "intermediate_size": 4864,
}
VOCAB = 502  # <pad>, <s> and 500 units
CONTEXT = 1024
# slam_ray's GPU batching: width quantum (s), row quantum, cuDNN (0/1), min fill, cudnn.benchmark (0/1), padded
# seconds per forward
SHIPPED_SHAPE = "1,4,1,0.5,0,200"


def parse_shape(spec: str) -> tuple:
    """A `--shapes` entry; fields left out take the shipped values."""
    given = spec.split(",")
    q, r, c, f, b, s = given + SHIPPED_SHAPE.split(",")[len(given) :]
    return float(q), int(r), c == "1", float(f), b == "1", float(s)


def audio_seconds(audios: list[np.ndarray]) -> float:
    return sum(len(a) for a in audios) / 16_000


def bf16_matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    import torch

    a, b = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def document_windows(n_windows: int, folder: Path, context: int = CONTEXT, vocab: int = VOCAB, n_val: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """Windows packed by the pack stage's own writer from utterances of 40-600 units (LibriSpeech-like after
    de-duplication at 25 Hz), with the position ids document masking feeds the model, and the effective attention
    context the MFU then counts (sum of squared document lengths over the window length). `n_val` validation
    windows more (other utterances) make `folder` a pack output the train stage reads."""
    from slam_ray.lm.packed import PackedWindows, utterance_stream, write_index, write_shard
    from slam_ray.stages.train import effective_context

    rng = np.random.default_rng(0)
    rows = {}
    for split, count in (("train", n_windows), ("val", n_val)):
        lengths = rng.integers(40, 601, size=count * context // 300 + 8)
        values = rng.integers(0, vocab - 2, size=int(lengths.sum())).astype(np.uint16)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens, starts = utterance_stream(values, offsets, np.arange(len(lengths)))
        end = count * context
        rows[split] = [write_shard(folder, split, 0, tokens[:end], starts[starts < end], context)] if count else []
    write_index(folder, context, rows)
    windows = PackedWindows(folder, "train")
    rows = np.arange(len(windows))
    positions = windows.positions(rows)
    return windows[rows], positions, effective_context(positions)


def train_throughput(batch: int, grad_accum: int, optimizer: str, compile_model: bool, steps: int,
                     document_mask: bool = False) -> dict:
    """The train step's tokens/s and MFU; with `document_mask`, on windows of real document boundaries with
    restarting position ids and `use_cache=False`, as the train stage runs it (transformers' packed-sequence
    path: a block mask for sdpa, varlen for flash_attention_2)."""
    import torch
    from train import packed_windows

    from slam_ray.config import ModelConfig, OptimizerConfig
    from slam_ray.lm.model import build_model, count_parameters
    from slam_ray.lm.optim import build_optimizer
    from slam_ray.parallel.train_utils import flops_per_token, peak_tflops

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SLAM_MODEL), VOCAB, max_positions=CONTEXT).cuda()
    n_params = count_parameters(model)
    opt = build_optimizer(OptimizerConfig(name=optimizer, lr=1e-3), model.parameters())
    net = torch.compile(model) if compile_model else model
    attention_context = float(CONTEXT)
    if document_mask:
        with tempfile.TemporaryDirectory() as tmp:
            data, pos, attention_context = document_windows(64, Path(tmp))
        windows, positions = torch.from_numpy(data.astype(np.int64)).cuda(), torch.from_numpy(pos).cuda()
    else:
        windows = torch.from_numpy(packed_windows(64, CONTEXT, VOCAB).astype(np.int64)).cuda()

    def step(i: int) -> float:
        for micro in range(grad_accum):
            start = ((i * grad_accum + micro) * batch) % (len(windows) - batch)
            x = windows[start : start + batch]
            masking = ({"position_ids": positions[start : start + batch], "use_cache": False} if document_mask
                       else {})
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(input_ids=x, labels=x, **masking).loss / grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    for i in range(3):  # warm-up (and compilation)
        step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    start = time.perf_counter()
    for i in range(steps):
        loss = step(3 + i)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = steps * batch * grad_accum * CONTEXT / seconds
    cfg = model.config
    flops = flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, attention_context)
    peak = peak_tflops(torch.cuda.get_device_name())
    result = {
        "batch": batch,
        "grad_accum": grad_accum,
        "optimizer": optimizer,
        "compile": compile_model,
        "document_mask": document_mask,
        "attention_context": round(attention_context, 1),
        "params": n_params,
        "tokens_per_s": round(tokens_per_s),
        "step_s": round(seconds / steps, 4),
        "warmup_s": round(warm_s, 1),
        "loss": round(loss * grad_accum, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "model_tflops": round(tokens_per_s * flops / 1e12, 1),
        "mfu": round(tokens_per_s * flops / (peak * 1e12), 4) if peak else None,
    }
    return result


def chunks_by_seconds(audios: list[np.ndarray], seconds: float) -> list[list[np.ndarray]]:
    """The actor's flushes: consecutive files until `seconds` of audio are pending."""
    out, current, total = [], [], 0
    for a in audios:
        current.append(a)
        total += len(a)
        if total >= seconds * 16_000:
            out.append(current)
            current, total = [], 0
    return out + ([current] if current else [])


def extraction(
    n_files: int,
    tmp: Path,
    profile: bool = False,
    shapes: tuple = (parse_shape(SHIPPED_SHAPE),),
    flushes: tuple = (200, 800),
) -> dict:
    """Each batching variant runs over two different file sets of the same kind: set A first (for the first
    variant this is the cold start: every batch shape is new to cuDNN), then set B (files never seen, batch
    shapes partly seen), then A and B again (every shape seen: the steady state of a long extraction job)."""
    import torch
    from extract import make_files, mhubert_base_shaped, plain_loop

    from slam_ray.config import TokenizerConfig
    from slam_ray.speech.audio import decode_audio
    from slam_ray.speech.tokenizer import UnitTokenizer

    sets = []
    for seed, name in ((0, "a"), (1, "b")):
        (tmp / name).mkdir()
        sets.append(make_files(tmp / name, n_files, seed=seed))
    model = mhubert_base_shaped(tmp / "model")
    from transformers import HubertConfig

    dim = HubertConfig.from_pretrained(model).hidden_size
    centroids = np.random.default_rng(0).normal(size=(500, dim)).astype(np.float32)
    audio_a, audio_b = ([decode_audio(p) for p in paths] for paths in sets)
    seconds_a, seconds_b = audio_seconds(audio_a), audio_seconds(audio_b)
    result: dict = {"files_per_set": n_files, "audio_seconds_a": round(seconds_a, 1), "audio_seconds_b": round(seconds_b, 1)}

    loop_s, _ = plain_loop(sets[0], model, 11, centroids, 8, 4, "bfloat16")
    result["slamkit_loop_audio_h_per_gpu_h"] = round(seconds_a / loop_s, 1)  # audio-s per s = audio-h per GPU-h
    print(
        f"slamkit loop (decode + all 12 layers, padded batches of 8, bf16), set A: "
        f"{result['slamkit_loop_audio_h_per_gpu_h']} audio-h/GPU-h",
        flush=True,
    )

    tok = UnitTokenizer(
        TokenizerConfig(kind="hubert", model=model, layer=11, n_units=500, dtype="bfloat16"),
        centroids,
        np.zeros(dim, np.float32),
        np.ones(dim, np.float32),
    )
    tok.encode(audio_a[0])  # model on the device, allocator and CUDA context warm; no batch shape seen yet
    feats = tok.features

    def rate(audios: list[np.ndarray], flush: int) -> tuple[float, list]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        encoded = [enc for chunk in chunks_by_seconds(audios, flush) for enc in tok.encode_batch(chunk)]
        torch.cuda.synchronize()
        return round(audio_seconds(audios) / (time.perf_counter() - start), 1), encoded

    # (width quantum in seconds, row quantum, cuDNN, min fill, cudnn.benchmark, padded seconds per forward)
    for quantum, rows, cudnn, fill, autotune, forward in shapes:
        feats.width_quantum, feats.row_quantum, feats.use_cudnn = max(1, int(quantum * 16_000)), rows, cudnn
        feats.min_fill, feats.max_batch_samples = fill, int(forward * 16_000)
        feats.cudnn_benchmark = autotune
        for flush in flushes:
            first, _ = rate(audio_a, flush)
            steady, batched = rate(audio_b, flush)
            again = [rate(audios, flush)[0] for audios in (audio_a, audio_b)]  # every shape seen before
            key = (
                f"flush{flush}_forward{forward}_q{quantum}_r{rows}_{'cudnn' if cudnn else 'nocudnn'}_fill{fill}"
                f"{'_autotune' if autotune else ''}"
            )
            result[key] = {"set_a": first, "set_b": steady, "set_a_again": again[0], "set_b_again": again[1]}
            print(
                f"slam_ray actor work, flushes of {flush} s, forwards of <= {forward} s, widths to {quantum} s, "
                f"rows to {rows}, cuDNN {cudnn}, min fill {fill}, cudnn.benchmark {autotune}: set A {first}, then "
                f"set B (unseen files) {steady}, A and B again {again[0]} / {again[1]} audio-h/GPU-h",
                flush=True,
            )
    some = audio_b[:100]  # one forward per utterance is slow: the first 100 files of set B
    torch.cuda.synchronize()
    start = time.perf_counter()
    alone = [tok.encode(a) for a in some]
    torch.cuda.synchronize()
    result["per_utterance_audio_h_per_gpu_h"] = round(audio_seconds(some) / (time.perf_counter() - start), 1)
    same_files = sum(
        a["units"].tolist() == b["units"].tolist() for a, b in zip(alone, batched[: len(some)], strict=True)
    )
    frames = [
        (tok.assign(tok.features(a)), f)
        for a, f in zip(audio_b[:50], tok.features.batch(audio_b[:50]), strict=True)
    ]
    same_frames = sum(int((a == tok.assign(f)).sum()) for a, f in frames) / sum(len(a) for a, _ in frames)
    result.update(
        batched_equals_alone_files=f"{same_files}/{len(some)}",
        batched_equals_alone_frames=round(same_frames, 5),
    )
    print(
        f"per utterance: {result['per_utterance_audio_h_per_gpu_h']} audio-h/GPU-h; batched == alone: "
        f"{same_files}/{len(some)} files, {same_frames:.4%} of frames (bf16)",
        flush=True,
    )
    if profile:
        result["profile"] = profile_extraction(tok, audio_a)
    return result


def profile_extraction(tok, audios: list[np.ndarray]) -> dict:  # noqa: ANN001
    """Where a forward's time goes: 32 files of exactly 10 s, conv front end vs whole model, cuDNN autotuning
    off/on, fp32 vs bf16 agreement of the units, and the profiler's top device kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from slam_ray.speech.tokenizer import UnitTokenizer

    feats = tok.features
    batch = np.stack([a[: 10 * 16_000] for a in audios if len(a) >= 10 * 16_000][:32])
    x = torch.from_numpy(batch).to(feats.device, feats.dtype)

    def timed(fn, repeats: int = 5) -> float:  # noqa: ANN001
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    out = {}
    with torch.inference_mode():
        for autotune in (False, True):
            torch.backends.cudnn.benchmark = autotune
            conv = timed(lambda: feats.model.feature_extractor(x))
            whole = timed(lambda: feats.model(x))
            out[f"cudnn_benchmark_{autotune}"] = {
                "conv_ms": round(conv * 1e3, 2),
                "model_ms": round(whole * 1e3, 2),
                "audio_h_per_gpu_h": round(len(batch) * 10 / whole, 1),
            }
            print(
                f"cudnn.benchmark={autotune}: conv front end {conv * 1e3:.1f} ms, model {whole * 1e3:.1f} ms for "
                f"{len(batch) * 10} s of audio -> {len(batch) * 10 / whole:.0f} audio-h/GPU-h",
                flush=True,
            )
        torch.backends.cudnn.benchmark = False
        for cudnn, offset in ((True, 0), (False, 100)):
            with torch.backends.cudnn.flags(enabled=cudnn):
                torch.cuda.synchronize()
                start = time.perf_counter()
                for k in range(1, 6):  # five widths never seen before
                    feats.model(x[:, : x.shape[1] - 7 * k - offset])
                torch.cuda.synchronize()
                new = (time.perf_counter() - start) / 5
                same = timed(lambda: feats.model(x))  # noqa: B023
            out[f"new_width_model_ms_cudnn_{cudnn}"] = round(new * 1e3, 2)
            out[f"same_width_model_ms_cudnn_{cudnn}"] = round(same * 1e3, 2)
            print(
                f"cuDNN {cudnn}: a forward of a width not seen before ~{out[f'new_width_model_ms_cudnn_{cudnn}']} ms, "
                f"of a repeated width {same * 1e3:.1f} ms",
                flush=True,
            )
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            feats.model(x)
            torch.cuda.synchronize()
    try:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14), flush=True)
    except Exception as e:  # the sort key's name moved between torch versions
        print(f"profiler table: {e!r}")
        print(prof.key_averages().table(row_limit=14), flush=True)
    torch.backends.cudnn.benchmark = False
    # precision: units of 50 files alone vs batched in fp32 (TF32 convs as torch defaults), and bf16 vs fp32
    tok32 = UnitTokenizer(tok.cfg.model_copy(update={"dtype": "float32"}), tok.centroids, tok.mean, tok.std)
    some = audios[:50]
    alone32 = [tok32.assign(tok32.features(a)) for a in some]
    batched32 = [tok32.assign(f) for f in tok32.features.batch(some)]
    alone16 = [tok.assign(tok.features(a)) for a in some]
    n = sum(len(a) for a in alone32)
    out["fp32_batched_equals_alone_frames"] = round(
        sum(int((a == b).sum()) for a, b in zip(alone32, batched32, strict=True)) / n, 5
    )
    out["bf16_equals_fp32_frames"] = round(
        sum(int((a == b).sum()) for a, b in zip(alone32, alone16, strict=True)) / n, 5
    )
    print(
        f"units: fp32 batched == alone on {out['fp32_batched_equals_alone_frames']:.4%} of frames; bf16 == fp32 on "
        f"{out['bf16_equals_fp32_frames']:.4%}",
        flush=True,
    )
    return out


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per training variant")
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument(
        "--variants",
        default="8,10,adamw,0,1;16,5,adamw,1,1;16,5,adamw,1,0;32,4,adamw_fused,1,0",
        help="training variants: batch,grad_accum,optimizer,compile(0/1)[,document_mask(0/1)] separated by ';' "
             "(default: the slam recipe as shipped, 8 x 10 with document masks; 16 x 5 compiled with and without "
             "them; the fastest full-window setting measured before)",
    )
    parser.add_argument("--profile", action="store_true", help="also profile the extraction forward")
    parser.add_argument(
        "--shapes",
        default=SHIPPED_SHAPE,
        help="padded batches: width quantum (s),row quantum,cuDNN (0/1),min fill,cudnn.benchmark (0/1),padded "
        "seconds per forward;... (the first is the cold start; default: slam_ray's)",
    )
    parser.add_argument("--flushes", default="200,800", help="seconds of audio per actor flush")
    parser.add_argument("--skip", choices=["train", "extract"], default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    figures: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bf16_matmul_tflops": round(bf16_matmul_tflops(), 1),
    }
    print(json.dumps(figures), flush=True)
    if args.skip != "train":
        figures["train"] = []
        for variant in args.variants.split(";"):
            batch, accum, optimizer, compiled, *mask = variant.split(",")
            batch, accum, compiled, masked = int(batch), int(accum), compiled == "1", mask == ["1"]
            try:
                row = train_throughput(batch, accum, optimizer, compiled, args.steps, masked)
            except Exception as e:  # one failing variant (e.g. compile) must not lose the others' figures
                row = {
                    "batch": batch,
                    "grad_accum": accum,
                    "optimizer": optimizer,
                    "compile": compiled,
                    "error": repr(e)[:300],
                }
            figures["train"].append(row)
            torch.cuda.empty_cache()  # the variant's model and optimizer are gone with its frame
            torch.cuda.reset_peak_memory_stats()
            print(json.dumps(row), flush=True)
    if args.skip != "extract":
        with tempfile.TemporaryDirectory() as tmp:
            shapes = [parse_shape(v) for v in args.shapes.split(";")]
            flushes = tuple(int(f) for f in args.flushes.split(","))
            figures["extract"] = extraction(args.files, Path(tmp), args.profile, shapes, flushes)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
