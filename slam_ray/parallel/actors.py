"""Ray Data helper shared by the stages: map rows through a pool of stateful actors, streaming results back.

Per-row failures never fail a block (Ray's `max_errored_blocks` would drop a corrupt file's good neighbours):
the actor catches them and returns the row with an `error` string, and the caller routes it to errors.jsonl.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from slam_ray.config import Experiment


def map_rows(
    exp: Experiment,
    rows: list[dict[str, Any]],
    actor_cls: type,
    ctor_kwargs: dict[str, Any],
    num_actors: int,
    batch_size: int,
    num_gpus: float = 0.0,
    prepare: tuple[Callable, dict[str, Any], float] | None = None,
    in_driver: bool = False,
) -> Iterator[pd.DataFrame]:
    """Yield output batches (pandas) of `actor_cls(**ctor_kwargs)(batch_df)` over `rows`, in any order. With
    `prepare` = (fn, kwargs, cpus), `fn(batch_df, **kwargs)` runs first as Ray tasks of `cpus` CPUs each and the
    actors get its output: CPU work such as decoding overlaps with the actors' (GPU) work. With `in_driver` (see
    `small_enough_for_the_driver`), one instance of the actor class does the work in this process instead, batch by
    batch, with the thread count it sets (an actor's one thread: the same results), restored afterwards."""
    if not rows:
        return
    if in_driver:
        if prepare is not None:
            raise ValueError("`prepare` feeds GPU actors from CPU tasks; the driver path runs without GPUs")
        yield from _in_this_process(rows, actor_cls, ctor_kwargs, batch_size)
        return
    import ray.data
    from ray.data import ActorPoolStrategy

    quiet_ray_data()
    # Small blocks so every actor gets work early; rows are tiny (paths and text).
    n_blocks = max(1, min(len(rows) // max(1, batch_size), 4 * num_actors * 8))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    if prepare is not None:
        fn, kwargs, cpus = prepare
        # Small task batches: the actors get their first rows early and the work spreads over the free CPUs.
        # max_calls=0 is Ray's default for tasks (a worker process is never recycled); given explicitly, these
        # remote args differ from the actors' (actors take no max_calls), which keeps Ray Data from fusing the
        # tasks into the actors: it fuses a task step into the next actor step whenever their remote args are
        # equal (e.g. decode_cpus == actor_cpus), and decoding would then run inside the actors.
        ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_size=max(1, batch_size // 4), batch_format="pandas",
                            num_cpus=cpus, max_calls=0)
    ds = ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=ctor_kwargs,
        compute=ActorPoolStrategy(size=min(num_actors, n_blocks)),
        batch_size=batch_size,
        batch_format="pandas",
        num_cpus=exp.ray.actor_cpus,
        num_gpus=num_gpus,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pandas")


def _in_this_process(rows: list[dict[str, Any]], actor_cls: type, ctor_kwargs: dict[str, Any],
                     batch_size: int) -> Iterator[pd.DataFrame]:
    """Batches in and out pass through Arrow tables converted by Ray Data's own code, as its blocks do: a missing
    value reads as None, never the NaN pandas makes of it (truthy: a column of `error` NaNs read as errors)."""
    import pyarrow as pa
    import torch
    from ray.data.block import BlockAccessor

    def as_arrow_would(frame: pd.DataFrame | pa.Table) -> pd.DataFrame:
        table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
        return BlockAccessor.for_block(table).to_pandas()

    threads = torch.get_num_threads()
    try:
        actor = actor_cls(**ctor_kwargs)
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            columns = list(dict.fromkeys(k for row in batch for k in row))
            yield as_arrow_would(actor(as_arrow_would(pa.table({k: [row.get(k) for row in batch] for k in columns}))))
    finally:
        torch.set_num_threads(threads)


def small_enough_for_the_driver(seconds: float | None, limit: float, num_gpus: float = 0.0) -> bool:
    """Whether work of `seconds` of audio (None: not known) is better done in the driver than by a pool of actors:
    at most `limit` seconds and no GPU involved (on the actors or here), so both ways compute the same on a CPU
    with one thread. Each actor is a process that imports torch (and transformers for HuBERT): a pool costs
    ~10-15 s of start-up on 2 cores, more than a few minutes of audio take on one thread."""
    import torch

    return seconds is not None and seconds <= limit and not num_gpus and not torch.cuda.is_available()


def one_cpu_actor(num_actors: int, num_gpus: float) -> bool:
    """Whether a pool is one actor without a GPU: its work is then done in the driver, which would only wait for
    it (the actor would add its process's start-up, ~5-10 s here, and its model's second load)."""
    return num_actors == 1 and not num_gpus


class _DropOwnChoice(logging.Filter):
    """Drops Ray Data's one-time notice that progress bars are off: turning them off is slam_ray's choice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_data() -> None:
    """Keep Ray Data's internals off the terminal; its full logs stay in the session's ray-data.log.

    The stages draw their own progress (files, audio hours, errors), so Ray Data's progress display is off: on a
    non-terminal stdout it is a multi-line `logging_progress` block every few seconds. Its console handler shows
    warnings and errors only (execution plans and "Starting execution" lines are INFO)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
            continue  # Ray Data's log files keep everything
        handler.setLevel(max(handler.level, logging.WARNING))
        if not any(isinstance(f, _DropOwnChoice) for f in handler.filters):
            handler.addFilter(_DropOwnChoice())


def error_row(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    reason = str(exc) or type(exc).__name__
    return {**{k: v for k, v in row.items() if isinstance(v, str | int | float)}, "error": reason}


def limit_threads(n: int = 1) -> None:
    """Called in actor constructors: one intra-op thread per actor, so actors do not oversubscribe the cores."""
    import torch

    torch.set_num_threads(n)
