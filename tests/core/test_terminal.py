"""The stderr filter of the CLI: Ray's known-harmless core-worker line and the workers' weight-loading bars are
dropped, everything else passes through, a progress bar's partial line at once (it must not wait for a newline that
never comes)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from slam_ray.core.terminal import filter_stream

NOISE_LINE = (b"[2026-11-30 22:17:49,310 E 4270 4270] core_worker.cc:2465: Actor with class name: "
              b"'MapWorker(MapBatches(SpeakActor))' and ID: '7657' has constructor arguments in the object store and "
              b"max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
              b"will fail. See https://github.com/ray-project/ray/issues/53727 for more details.\n")
FORWARDED = b"\x1b[36m(TrainController pid=8572)\x1b[0m " + NOISE_LINE


def run_filter(chunks: list[bytes], at_once: bytes | None = None) -> bytes:
    """What the filter writes for `chunks`, each one write; with `at_once`, the first chunk's output must be that,
    read before the next chunk is written (then not part of what is returned)."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    pump = threading.Thread(target=filter_stream, args=(src_r, dst_w), daemon=True)
    pump.start()
    for i, chunk in enumerate(chunks):
        os.write(src_w, chunk)
        if i == 0 and at_once is not None:
            assert os.read(dst_r, 65536) == at_once
    os.close(src_w)
    pump.join(timeout=10)
    out = b""
    while chunk := os.read(dst_r, 65536):
        out += chunk
    os.close(dst_r)
    return out


def test_the_noise_is_dropped_and_everything_else_kept():
    kept = [b"[synth] speak:  5%|| 142/3000\r", b"[synth] speak: 11%|| 330/3000\r",
            b"[synth] done in 61.2s\n", b"2026-11-30 WARNING something real\n",
            b"[2026-11-30 22:17:49,310 E 4270 4270] core_worker.cc:99: a real error\n"]
    out = run_filter([kept[0], NOISE_LINE, kept[1], FORWARDED[:40], FORWARDED[40:], kept[2], kept[3], kept[4]])
    assert b"has constructor arguments" not in out
    assert out == b"".join(kept)


@pytest.mark.parametrize("cut", [1, 20, 40, 80, 200])
def test_a_noise_line_read_together_with_a_bars_redraw_is_still_dropped(cut):
    """One read may hold a bar's redraw (ended by \\r, no newline) and the first bytes of a forwarded noise line
    (seen under load: the line's first 40 bytes reached the terminal); wherever the reads split it, nothing of the
    noise passes and the bar's redraw is not held back."""
    bar = b"[synth] speak: 11%|| 330/3000\r"
    for noise in (FORWARDED, NOISE_LINE, NOISE_LINE.replace(b"\n", b"\r\n")):
        # the bar's redraw at once: it does not wait for the noise line's newline
        rest = run_filter([bar + noise[:cut], noise[cut:] + b"[synth] done\n"], at_once=bar)
        assert rest == b"[synth] done\n", noise


def test_a_partial_progress_line_passes_before_its_newline():
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    pump = threading.Thread(target=filter_stream, args=(src_r, dst_w), daemon=True)
    pump.start()
    os.write(src_w, b"[extract] encode:  14%|# | 424/3000\r")
    assert os.read(dst_r, 100) == b"[extract] encode:  14%|# | 424/3000\r"  # would block forever if held back
    os.close(src_w)
    pump.join(timeout=10)
    os.close(dst_r)


def test_the_cli_filters_its_own_descriptor_2():
    """A command's own C++-style write to descriptor 2 (as Ray's core worker does) is dropped; Python's are kept."""
    code = ("import os, sys\n"
            "from slam_ray.core.terminal import quiet_ray_noise\n"
            "with quiet_ray_noise():\n"
            f"    os.write(2, {NOISE_LINE!r})\n"
            "    print('kept line', file=sys.stderr)\n"
            "print('after', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stderr == b"kept line\nafter\n"
    raw = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                         env={**os.environ, "SLAM_RAY_RAW_STDERR": "1"})
    assert b"has constructor arguments" in raw.stderr


def test_noise_sharing_a_line_with_a_progress_bar_and_terminal_line_ends():
    assert run_filter([b"[synth] speak:  5%|| 142/3000\r" + NOISE_LINE]) == b"[synth] speak:  5%|| 142/3000\r"
    assert run_filter([NOISE_LINE[:-1] + b"\r\n", b"next\r\n"]) == b"next\r\n"  # a pseudo-terminal's line ends


def test_on_a_terminal_the_command_still_sees_a_terminal_and_the_noise_is_dropped():
    import pty

    code = ("import os, sys\n"
            "from slam_ray.core.terminal import quiet_ray_noise\n"
            "with quiet_ray_noise():\n"
            "    print('tty', os.isatty(2), os.get_terminal_size(2).columns, file=sys.stderr, flush=True)\n"
            f"    os.write(2, {NOISE_LINE!r})\n"
            "    print('done', file=sys.stderr, flush=True)\n")
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 123, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    assert b"tty True 123" in out and b"done" in out
    assert b"has constructor arguments" not in out


def test_workers_weight_bars_are_dropped_and_the_drivers_own_kept():
    """transformers 5's bars, as Ray forwards them from an actor and a Train worker (each load or checkpoint save):
    dropped whole; a worker line that is more than a bar, and the driver's own bar, are kept."""
    actor = (b"\x1b[36m(MapWorker(MapBatches(FeatureActor)) pid=11115)\x1b[0m \rLoading weights:   0%|          | 0/68 "
             b"[00:00<?, ?it/s]\rLoading weights: 100%|##########| 68/68 [00:00<00:00, 4775.67it/s]\n")
    worker = (b"\x1b[36m(RayTrainWorker pid=21075, ip=10.0.0.2)\x1b[0m \rWriting model shards: 100%|##########| 1/1 "
              b"[00:00<00:00, 295.31it/s]\n")
    kept = [b"\x1b[36m(RayTrainWorker pid=21075)\x1b[0m [train] step 40/40  loss 1.584\n",
            b"\x1b[36m(EncodeActor pid=7)\x1b[0m Loading weights: 100%| 68/68\rTraceback (most recent call last):\n",
            b"Loading weights: 100%|##########| 68/68 [00:00<00:00, 4854.19it/s]\n"]
    plain = worker.replace(b" \rWriting", b" Writing")  # a bar drawn without its leading carriage return
    assert plain != worker
    out = run_filter([actor, kept[0], worker, kept[1], plain, kept[2]])
    assert out == b"".join(kept)
