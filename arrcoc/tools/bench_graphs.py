"""Benchmark of the CUDA-graph chain against eager stages and ``torch.compile(mode="reduce-overhead")``.

``python -m arrcoc.tools.bench_graphs`` (or ``arrcoc bench --graphs``) writes ``graphs-<device>[-tag]`` ``.json``
and ``.md`` into ``--out`` (``arrcoc-results/`` unless told; ``bench/results/`` holds the committed ones). Per bucket size and batch, on one process:

- GPU time (CUDA events, median) of the whole chain eager, as one graph, as one graph per stage, compiled
  with ``torch.compile(mode="reduce-overhead")`` and graphed after ``torch.compile`` (``Pipeline(compile=True)``);
- the graphed chain with its independent branches on side streams and on one stream (``concurrent=False``),
  plain and compiled;
- GPU time of each stage eager and as its own graph;
- CPU issue time (``perf_counter`` around the issuing call, no sync inside; the queue drains between calls):
  replay alone, and a whole graphed call (input copy + replay + copy-out, ``copy=True`` and ``copy=False``),
  the per-stage chain's five launches, and the time to build the result views;
- the encoder alone captured the same way as the chain (one plain graph; compiled as ``Pipeline(compile=True)``
  compiles it, then one plain graph): what arrcoc's own stages add, plain and compiled;
- capture time, pool bytes, compile time; the warm-up of 5 sizes x 3 batch buckets;
- ``--threads``: 8 threads calling one pipeline (one lock around replay), every result checked;
- ``--agreement``: the share of generated scenes whose allocation a plain graphed pipeline and
  ``Pipeline(compile=True)`` agree on;
- ``--restart``: seconds from process start to the first compressed batch, in fresh processes one after the other
  (plain graphs, and compiled with torch.compile's on-disk caches from the earlier runs).

Repetitions adapt to the case (at most ``--reps``, about ``--seconds`` per measurement) so the whole run
stays bounded; ``--quick`` runs a small matrix.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import DEFAULT_WEIGHTS_DIR, PipelineConfig
from ..pipeline import Pipeline, graph_inputs, token_capacity
from ..runtime.graphs import GraphCache, GraphChain
from ..stages import greedy_pick, texture
from .bench import _images
from .timing import device_times_ms, write_report

__all__ = [
    "main",
    "time_graphs",
    "time_compiled",
    "time_threads",
    "time_warmup",
    "profile_kernels",
    "allocation_agreement",
    "compare_compiled",
    "time_first_batch",
    "time_restart",
]

logger = logging.getLogger(__name__)

STAGE_NAMES = ("encode", "score", "balance", "allocate", "compress")


def _issue_us(fn: Callable[[], Any], reps: int) -> float:
    """Median microseconds the CPU spends issuing one call (no sync inside; the queue drains between)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def _gpu_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    return statistics.median(device_times_ms(fn, torch.device("cuda"), warmup, reps))


def _reps(fn: Callable[[], Any], most: int, seconds: float) -> int:
    """How many repetitions fit in about ``seconds`` (at least 5, at most ``most``), from one timed call."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    return max(5, min(most, int(seconds / max(once, 1e-6))))


def _case(pipe: Pipeline, size: int, batch: int) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """The stages and inputs of one benchmark case (the demo scene; budget = 25% of the patches; 4 query tokens)."""
    device = pipe.device
    (group,) = pipe.preprocessor(_images(size, batch), device=device)
    grid = pipe.encoder(group.bucket).grid
    budget = max(1, grid[0] * grid[1] // 4)
    capacity = token_capacity(budget)
    query = torch.randn(batch, 4, pipe.width, generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {
        "pixels": group.pixels,
        "valid": group.valid,
        "query": query,
        "query_mask": torch.ones(batch, 4, dtype=torch.bool, device=device),
        "budget": torch.full((batch,), budget, device=device),
    }
    info = {"size": size, "batch": batch, "budget": budget, "capacity": capacity}
    return pipe.stages(group.bucket, capacity), inputs, info


@torch.inference_mode()
def time_graphs(pipe: Pipeline, size: int, batch: int, *, reps: int = 50, seconds: float = 1.0) -> dict[str, Any]:
    """Eager vs graphed (one graph, and one per stage) timings for one bucket size and batch size."""
    stages, inputs, result = _case(pipe, size, batch)
    state = dict(inputs)

    def eager() -> dict[str, Any]:
        for _, fn in stages:
            state.update(fn(state))
        return state

    eager()
    reps = result["reps"] = _reps(eager, reps, seconds)
    result["eager_ms"] = _gpu_ms(eager, reps)
    result["eager_issue_us"] = _issue_us(eager, min(reps, 20))
    result["eager_stage_ms"] = {name: _gpu_ms(lambda fn=fn: state.update(fn(state)), reps) for name, fn in stages}

    # one graph for the whole chain, through the cache as a call uses it
    cache = pipe.graph_cache
    key = pipe._graph_key(size, batch, result["capacity"], 4)
    torch.cuda.synchronize()
    start = time.perf_counter()
    chain = pipe._chain(key)
    torch.cuda.synchronize()
    if chain is None:
        raise RuntimeError(f"capture failed for {size}px batch {batch}: {pipe._eager_only[key]}")
    result["capture_s"] = time.perf_counter() - start
    result["pool_bytes"], result["entry_bytes"] = chain.pool_bytes, chain.bytes
    values = graph_inputs(key, inputs)
    chain.inputs.write(values)  # the case's image, question and budget, not the capture's placeholders

    def call(copy: bool) -> Callable[[], Any]:
        return lambda: cache.run(key, lambda: pipe._build(key), values, batch, copy)

    result["graphed_ms"] = _gpu_ms(chain.replay, reps)
    result["call_ms"] = _gpu_ms(call(True), reps)  # input copy + replay + copy-out, GPU side
    issue_reps = _reps(chain.replay, 200, 2 * seconds)  # host times vary more than GPU times: more samples
    one = torch.zeros(1, device=pipe.device)
    result["launch_issue_us"] = _issue_us(lambda: one.add_(1), 200)  # what one kernel launch costs this host
    result["replay_issue_us"] = _issue_us(chain.replay, issue_reps)
    result["call_issue_us"] = _issue_us(call(True), issue_reps)
    result["call_zero_copy_issue_us"] = _issue_us(call(False), issue_reps)
    result["views_us"] = _issue_us(lambda: dict(call(True)()), issue_reps) - result["call_issue_us"]
    out = call(True)()
    eager()
    result["max_abs_diff_tokens"] = float(
        (out["tokens"].float() - state["tokens"].float()).abs().max()
    )  # ok-sync: report
    result["allocation_equal"] = bool(torch.equal(out["allocation"], state["allocation"]))  # ok-sync: report

    try:
        result.update(_time_pipeline_call(pipe, size, batch, inputs["query"], result["budget"], min(reps, 20)))
    except Exception as err:  # a diagnostic: never lose the case for it
        result["pipe_call_error"] = _error(err)

    # the encoder alone, captured the same way (one plain graph, same batch and dtype): what arrcoc's stages add
    result["encoder_graphed_ms"] = _encoder_graphed_ms(pipe, key, inputs["pixels"], reps)
    result["chain_over_encoder"] = result["graphed_ms"] / result["encoder_graphed_ms"]

    # the same chain with every branch on one stream: what running branches side by side saves
    serial = GraphChain(
        pipe.stages(size, result["capacity"], concurrent=False),
        pipe._static_inputs(key),
        torch.cuda.graph_pool_handle(),
        outputs=("tokens", "allocation"),
    )
    serial_out = serial.run(values, batch)
    result["serial_equal"] = bool(
        torch.equal(serial_out["tokens"], out["tokens"])  # ok-sync: report
        and torch.equal(serial_out["allocation"], out["allocation"])
    )
    result["graphed_serial_ms"] = _gpu_ms(serial.replay, reps)
    result["concurrency_speedup"] = result["graphed_serial_ms"] / result["graphed_ms"]
    del serial, serial_out

    # one graph per stage, chained (the earlier design), for per-stage times and the launch-count comparison
    start = time.perf_counter()
    per_stage = GraphChain(
        stages, pipe._static_inputs(key), torch.cuda.graph_pool_handle(), outputs=("tokens",), per_stage=True
    )
    torch.cuda.synchronize()
    result["per_stage_capture_s"] = time.perf_counter() - start
    per_stage.inputs.write(values)
    result["per_stage_ms"] = _gpu_ms(per_stage.replay, reps)
    result["per_stage_issue_us"] = _issue_us(per_stage.replay, reps)
    result["graphed_stage_ms"] = {
        name: _gpu_ms(graph.replay, reps) for name, graph in per_stage.graphs if name != "pack"
    }
    del per_stage
    result["speedup"] = result["eager_ms"] / result["graphed_ms"]
    result["stage_speedup"] = {
        n: result["eager_stage_ms"][n] / result["graphed_stage_ms"][n] for n in result["graphed_stage_ms"]
    }
    return result


def _encoder_graphed_ms(pipe: Pipeline, key: Any, pixels: Tensor, reps: int, *, compile: bool = False) -> float:
    """GPU ms of ``pipe``'s encoder alone for ``key``'s bucket and batch, captured as one plain graph.

    ``compile=True`` wraps it as :meth:`Pipeline.stages` does for ``Pipeline(compile=True)``
    (``torch.compile(encoder.features, dynamic=False)``), so that chain and encoder are compared in the same mode.
    """
    encoder = pipe.encoder(key.bucket)
    features = torch.compile(encoder.features, dynamic=False) if compile else encoder.features
    alone = GraphChain(
        [("encode", lambda s: {"features": features(s["pixels"])[0]})],
        {"pixels": pipe._static_inputs(key)["pixels"]},
        torch.cuda.graph_pool_handle(),
        outputs=("features",),
    )
    alone.run({"pixels": pixels}, pixels.shape[0])
    return _gpu_ms(alone.replay, reps)


def _time_pipeline_call(pipe: Pipeline, size: int, batch: int, query: Tensor, budget: int, reps: int) -> dict[str, Any]:
    """A whole ``pipe(images, query, budget)`` call on a uint8 GPU batch: wall ms (synchronised) and host syncs."""
    images = _images(size, batch).cuda()

    def call() -> Any:
        return pipe(images, query=query, budget=budget)

    for _ in range(3):
        call()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # one warning per synchronizing operation (the mode's own "prototype feature" notice is not one)
    syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
    return {"pipe_call_ms": statistics.median(times), "pipe_call_syncs": len(syncs), "pipe_call_sync_ops": syncs[:5]}


def _whole(stages: list[Any]) -> Callable[..., tuple[Tensor, ...]]:
    def whole(pixels: Tensor, valid: Tensor, query: Tensor, query_mask: Tensor, budget: Tensor) -> tuple[Tensor, ...]:
        s = {"pixels": pixels, "valid": valid, "query": query, "query_mask": query_mask, "budget": budget}
        for _, fn in stages:
            s.update(fn(s))
        return s["tokens"], s["mask"], s["allocation"]

    return whole


def _error(err: BaseException) -> str:
    frames = [
        f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(err.__traceback__)
    ]
    return f"{type(err).__name__}: {str(err)[:400]} [last frames: {' <- '.join(reversed(frames[-4:]))}]"


@torch.inference_mode()
def time_compiled(
    pipe: Pipeline,
    result: dict[str, Any],
    *,
    reps: int = 50,
    save: Callable[[], None] = lambda: None,
    whole: bool = True,
) -> None:
    """Add ``torch.compile(mode="reduce-overhead")`` and graphed+compiled timings of the same chain to ``result``.

    Where inductor fails on the whole chain, each stage is compiled alone (default mode) to name the stage
    that fails, and the ``cudagraphs`` backend (dynamo + CUDA graph trees, no inductor) is timed instead.
    ``whole=False`` leaves the whole-chain ``torch.compile`` out (its cold compile is the slowest step) and times
    only the graphed+compiled chain and, beside it, the encoder alone compiled and graphed the same way.
    """
    size, batch, reps = result["size"], result["batch"], min(reps, result.get("reps", reps))
    _, inputs, _ = _case(pipe, size, batch)
    stages = pipe.stages(size, result["capacity"], concurrent=False)  # the plain chain a user would compile
    args = tuple(inputs[k] for k in ("pixels", "valid", "query", "query_mask", "budget"))
    for backend, options in (("inductor", {"mode": "reduce-overhead"}), ("cudagraphs", {})) if whole else ():
        torch._dynamo.reset()
        compiled = torch.compile(_whole(stages), backend=backend, **options)
        start = time.perf_counter()
        try:
            for _ in range(3):  # compile, record, then replay
                compiled(*args)
            torch.cuda.synchronize()
        except Exception as err:  # a compiler bug must not end the benchmark
            result.setdefault("compile_errors", {})[backend] = _error(err)
            if backend == "inductor":
                save()
                _isolate(stages, inputs, result, save, pipe)
            continue
        result["compile_backend"] = backend
        result["compile_s"] = time.perf_counter() - start
        result["compiled_ms"] = _gpu_ms(lambda c=compiled: c(*args), reps)
        result["compiled_issue_us"] = _issue_us(lambda c=compiled: c(*args), reps)
        result["graphed_over_compiled"] = result["graphed_ms"] / result["compiled_ms"]
        save()  # before the graphed+compiled pipeline compiles again: a time limit keeps this much
        break
    torch._dynamo.reset()
    # graphed + compiled: each stage compiled (fusion), then the chain captured as one graph
    key = pipe._graph_key(size, batch, result["capacity"], 4)
    both, chain = _captured(pipe, True, key, result, "graphed_compiled")
    if chain is None:
        return
    values = graph_inputs(key, inputs)
    chain.inputs.write(values)
    result["graphed_compiled_ms"] = _gpu_ms(chain.replay, reps)
    # the same compiled bodies on one stream (dynamo's cache holds them: no second compile)
    serial = GraphChain(
        both.stages(size, result["capacity"], concurrent=False, compile=True),
        both._static_inputs(key),
        torch.cuda.graph_pool_handle(),
        outputs=("tokens",),
    )
    serial.inputs.write(values)
    result["graphed_compiled_serial_ms"] = _gpu_ms(serial.replay, reps)
    if "compiled_ms" in result:
        result["graphed_compiled_over_compiled"] = result["graphed_compiled_ms"] / result["compiled_ms"]
    del serial
    save()
    # the encoder alone, compiled as the pipeline compiles it, then one plain graph: dynamo's cache holds its body
    result["encoder_graphed_compiled_ms"] = _encoder_graphed_ms(both, key, inputs["pixels"], reps, compile=True)
    result["compiled_chain_over_encoder"] = result["graphed_compiled_ms"] / result["encoder_graphed_compiled_ms"]
    del both, chain
    torch._dynamo.reset()
    save()
    # arrcoc's own stages compiled, the backbone plain: against the encoder alone as one plain graph
    head, chain = _captured(pipe, "head", key, result, "graphed_head_compiled")
    if chain is None:
        return
    chain.inputs.write(values)
    result["graphed_head_compiled_ms"] = _gpu_ms(chain.replay, reps)
    if "encoder_graphed_ms" in result:
        result["head_compiled_chain_over_encoder"] = result["graphed_head_compiled_ms"] / result["encoder_graphed_ms"]
    del head, chain
    torch._dynamo.reset()


def _captured(
    pipe: Pipeline, compile: bool | str, key: Any, result: dict[str, Any], name: str
) -> tuple[Pipeline, GraphChain | None]:
    """``Pipeline(compile=compile)`` on ``pipe``'s config, weights and device, and its chain for ``key`` captured as one
    graph (None where capture failed); ``result[name + "_capture_s"]``: the seconds it took, compile included, or
    ``result[name + "_error"]``: why it failed."""
    other = Pipeline(pipe.config, weights=pipe.weights_path, device=pipe.device, compile=compile)
    start = time.perf_counter()
    chain = other._chain(key)
    torch.cuda.synchronize()
    if chain is None:
        result[f"{name}_error"] = other._eager_only[key]
    else:
        result[f"{name}_capture_s"] = time.perf_counter() - start
    return other, chain


def _isolate(
    stages: list[Any],
    inputs: dict[str, Any],
    result: dict[str, Any],
    save: Callable[[], None],
    pipe: Pipeline | None = None,
    backend: str | Callable[..., Any] = "inductor",
) -> None:
    """Compile each stage alone with inductor (post-encode stages first: the likelier culprits, and quicker);
    the failures go to ``result["inductor_stage_errors"]``, the stages that compile to ``inductor_stages_ok``.
    Where the score stage fails, each of ``pipe``'s scorers is compiled alone too (``inductor_scorer_errors``,
    ``inductor_scorers_ok``), to name the scorer."""
    state = dict(inputs)
    for _, fn in stages:  # eager first, so every stage has its inputs
        state.update(fn(state))

    def attempt(kind: str, name: str, fn: Callable[[dict[str, Any]], Any]) -> None:
        ok_or_error = _try_compile(fn, state, backend)
        if ok_or_error is None:
            result.setdefault(f"inductor_{kind}s_ok", []).append(name)
        else:
            result.setdefault(f"inductor_{kind}_errors", {})[name] = ok_or_error
        save()

    result.setdefault("inductor_stage_errors", {})
    result.setdefault("inductor_stages_ok", [])
    for name, fn in sorted(stages, key=lambda stage: stage[0] == "encode"):
        attempt("stage", name, fn)
    if "score" in result["inductor_stage_errors"] and pipe is not None:
        result.setdefault("inductor_scorer_errors", {})
        result.setdefault("inductor_scorers_ok", [])
        for name, scorer in pipe.head.scorers.items():

            def one(s: dict[str, Any], scorer: Any = scorer) -> Tensor:
                return scorer(s["features"], s["texture"], s["patch_valid"], s["query"], s["query_mask"])

            attempt("scorer", name, one)
    torch._dynamo.reset()


def _try_compile(
    fn: Callable[[dict[str, Any]], Any], state: dict[str, Any], backend: str | Callable[..., Any] = "inductor"
) -> str | None:
    """Compile ``fn`` (fresh dynamo state) and run it once; ``None``, or the error's description."""
    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=backend)(state)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return None
    except Exception as err:
        return _error(err)


def allocation_agreement(
    plain: Tensor, compiled: Tensor, plain_tokens: Tensor | None = None, compiled_tokens: Tensor | None = None
) -> dict[str, Any]:
    """How far two runs' allocations of the same images agree.

    Args:
        plain, compiled: ``(N, rh, rw)`` tokens per region of the same ``N`` images from two runs.
        plain_tokens, compiled_tokens: ``(N, T, D)`` packed tokens of the same runs (optional): their largest
            absolute difference is taken over the images whose allocations agree (elsewhere slots hold other regions).

    Returns:
        ``images``, ``equal_images`` and ``equal_share`` (images whose allocation is identical),
        ``max_region_diff`` (the largest change of one region's count), ``max_moved_tokens`` (the most tokens one
        image places elsewhere: half the L1 distance, as both allocations spend the same budget) and, given tokens,
        ``max_abs_diff_tokens`` and ``token_scale`` (the largest absolute token, to read the difference against).
    """
    if plain.shape != compiled.shape:
        raise ValueError(f"allocations differ in shape: {tuple(plain.shape)} vs {tuple(compiled.shape)}")
    diff = (plain.long() - compiled.long()).flatten(1).abs()  # (N, rh * rw)
    equal = diff.sum(1) == 0  # (N,)
    images = int(plain.shape[0])
    out: dict[str, Any] = {
        "images": images,
        "equal_images": int(equal.sum()),  # ok-sync: report
        "equal_share": float(equal.float().mean()) if images else float("nan"),  # ok-sync: report
        "max_region_diff": int(diff.max()) if diff.numel() else 0,  # ok-sync: report
        "max_moved_tokens": int(diff.sum(1).max()) // 2 if images else 0,  # ok-sync: report
    }
    if plain_tokens is not None and compiled_tokens is not None:
        same = (plain_tokens[equal].float() - compiled_tokens[equal].float()).abs()  # (E, T, D)
        out["max_abs_diff_tokens"] = float(same.max()) if same.numel() else None  # ok-sync: report
        out["token_scale"] = float(plain_tokens.float().abs().max())  # ok-sync: report
    return out


def _world_images(size: int, seeds: range) -> Tensor:
    """``(N, 3, size, size)`` uint8 scenes of the generated VQA world (shapes, text, clutter), one per seed."""
    from ..world.data import make_sample

    return torch.stack([torch.from_numpy(np.array(make_sample(s, size).image)).permute(2, 0, 1) for s in seeds])


def compare_compiled(
    config: PipelineConfig,
    *,
    weights: str | None = None,
    size: int = 224,
    batch: int = 64,
    images: int = 512,
    budget: int | None = None,
    seed: int = 900_000,
    device: str = "cuda",
    mode: str = "compiled",
) -> dict[str, Any]:
    """Allocations of a plain graphed ``Pipeline`` and a compiled one (``mode``: ``"compiled"``,
    ``Pipeline(compile=True)``, or ``"head"``, ``compile="head"``) on the same images.

    ``images`` generated VQA-world scenes (seeds ``seed, seed + 1, ...``) go through both pipelines ``batch`` at a
    time, with no question and ``budget`` tokens each (default: a quarter of the patches), as the data-set job
    calls its pipeline; the result is :func:`allocation_agreement`'s, with the case and each pipeline's first-call
    seconds (compile and capture included). On a CPU both run the same eager stages (a check of this code only).
    """
    config = config.replace(buckets=(size,))
    pipes = {
        "plain": Pipeline(config, weights=weights, device=device),
        "compiled": Pipeline(config, weights=weights, device=device, compile=COMPILE_MODES[mode]),
    }
    grid = pipes["plain"].encoder(size).grid
    budget = budget or max(1, grid[0] * grid[1] // 4)
    allocations: dict[str, list[Tensor]] = {name: [] for name in pipes}
    tokens: dict[str, list[Tensor]] = {name: [] for name in pipes}
    result: dict[str, Any] = {
        "size": size,
        "batch": batch,
        "budget": budget,
        "seed": seed,
        "mode": mode,
        "first_call_s": {},
    }
    for start in range(0, images, batch):
        pixels = _world_images(size, range(seed + start, seed + min(images, start + batch))).to(device)
        for name, pipe in pipes.items():
            began = time.perf_counter()
            out = pipe(pixels, budget=budget)
            allocations[name].append(out.allocation.cpu())  # ok-sync: compared after the runs
            tokens[name].append(out.tokens.cpu())  # ok-sync: compared after the runs
            result["first_call_s"].setdefault(name, time.perf_counter() - began)
    result.update(
        allocation_agreement(
            torch.cat(allocations["plain"]),
            torch.cat(allocations["compiled"]),
            torch.cat(tokens["plain"]),
            torch.cat(tokens["compiled"]),
        )
    )
    eager = {name: [str(reason) for reason in pipe._eager_only.values()] for name, pipe in pipes.items()}
    result["capture_failures"] = {name: reasons for name, reasons in eager.items() if reasons}
    del pipes
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return result


#: How ``--first-batch``, ``--restart`` and ``--agreement`` build a pipeline: ``Pipeline(compile=...)``.
COMPILE_MODES: dict[str, bool | str] = {"plain": False, "compiled": True, "head": "head"}

#: The pipelines ``--restart`` starts: :data:`COMPILE_MODES`, and ``compile="head"`` compiled in the background.
RESTART_MODES: dict[str, bool | str] = {**COMPILE_MODES, "background": "head"}

#: The line a ``--first-batch`` child prints: this marker, then its JSON.
FIRST_BATCH_MARK = "arrcoc-first-batch "


def time_first_batch(
    config: PipelineConfig,
    *,
    weights: str | None = None,
    compile: bool | str = False,
    in_background: bool = False,
    size: int = 224,
    batch: int = 64,
) -> dict[str, Any]:
    """In a fresh process: build a pipeline and compress one batch as the data-set job does (no question, a quarter
    of the patches, ``copy=False``); returns the wall-clock times (``time.time()``) when it was entered (the
    interpreter's start and the imports are done) and when the batch is done, with the seconds spent building the
    pipeline and in the first call (compile and capture included). ``in_background``: the compile runs on a helper
    thread; also when the compiled graph's first batch is done (``compiled_at``)."""
    entered_at = time.time()
    began = time.perf_counter()
    pipe = Pipeline(
        config.replace(buckets=(size,)),
        weights=weights,
        device="cuda",
        compile=compile,
        compile_in_background=in_background,
    )
    grid = pipe.encoder(size).grid
    built = time.perf_counter()
    pixels = _images(size, batch).cuda()

    def compress() -> None:
        out = pipe(pixels, budget=max(1, grid[0] * grid[1] // 4), copy=False)
        out.tokens.sum().item()  # ok-sync: a batch is done when its tokens are

    compress()
    done = time.perf_counter()
    result = {
        "entered_at": entered_at,
        "done_at": time.time(),
        "build_s": built - began,
        "first_call_s": done - built,
        "graphed": not pipe._eager_only,
    }
    if pipe.compiled_chains is not None:
        pipe.wait_for_compile()
        compress()
        result["compiled_at"] = time.time()
        result["compiled_served"] = pipe.compiled_chains.cache.stats()["hits"] == 1
    return result


def _first_batch_of(stdout: str) -> dict[str, Any] | None:
    """The JSON a ``--first-batch`` child printed after :data:`FIRST_BATCH_MARK`, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(FIRST_BATCH_MARK):
            return json.loads(line[len(FIRST_BATCH_MARK) :])
    return None


def time_restart(
    config_args: list[str],
    *,
    modes: tuple[str, ...] = ("plain", "compiled"),
    runs: int = 2,
    fresh_cache: bool = False,
    size: int = 224,
    batch: int = 64,
    timeout_s: float = 300.0,
    save: Callable[[dict[str, Any]], None] = lambda _: None,
) -> dict[str, Any]:
    """Seconds from process start to the first compressed batch, in ``runs`` fresh processes per mode, one after
    the other, so that each later run finds torch.compile's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``) from the
    earlier ones.

    Args:
        config_args: the pipeline's options for the child (``--preset``, ``--encoder``, ``--dtype``, ``--pretrained``).
        size, batch: the bucket size and batch of the first batch.
        modes: ``"plain"`` (graphs), ``"compiled"`` (``Pipeline(compile=True)``), ``"head"`` (``compile="head"``),
            ``"background"`` (``compile="head", compile_in_background=True``).
        fresh_cache: give the children an empty cache folder of their own, so that the first run compiles cold;
            otherwise they share this process's (warm, where it compiled the same case already).
        save: called with the result after every run, so a time limit keeps what was measured.
    """
    env = dict(os.environ)
    if fresh_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="arrcoc-inductor-")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache = env.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    result: dict[str, Any] = {
        "size": size,
        "batch": batch,
        "cache_dir": cache,
        "fresh_cache": fresh_cache,
        "cache_files_before": sum(len(files) for _, _, files in os.walk(cache)),
        "runs": [],
    }
    for mode in modes:
        for run in range(1, runs + 1):
            command = [sys.executable, "-m", "arrcoc.tools.bench_graphs", "--first-batch", mode, *config_args]
            command += ["--sizes", str(size), "--batches", str(batch)]
            started = time.time()
            entry: dict[str, Any] = {"mode": mode, "run": run}
            try:
                proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
                child = _first_batch_of(proc.stdout)
                if child is None:
                    entry["error"] = f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}"
                else:
                    entry.update({k: v for k, v in child.items() if not k.endswith("_at")})
                    entry["seconds"] = child["done_at"] - started
                    entry["start_s"] = child["entered_at"] - started  # the interpreter, imports, arguments
                    if "compiled_at" in child:
                        entry["compiled_s"] = child["compiled_at"] - started
            except subprocess.TimeoutExpired:
                entry["error"] = f"no first batch within {timeout_s:.0f} s"
            result["runs"].append(entry)
            save(result)
    return result


@torch.inference_mode()
def profile_kernels(pipe: Pipeline, size: int, batch: int, *, compile: bool | str = False) -> dict[str, Any]:
    """Per stage, eager: how many GPU kernels it launches and their summed time (``torch.profiler``).

    Next to a stage's graphed time this splits it into kernel time and the gaps between kernels, which is
    what a graph of many small kernels spends most of its time on. ``compile=True`` (or ``"head"``) profiles the
    bodies ``Pipeline(compile=...)`` captures (inductor's fused kernels).
    """
    from torch.profiler import ProfilerActivity, profile

    _, inputs, info = _case(pipe, size, batch)
    stages = pipe.stages(size, info["capacity"], concurrent=False, compile=compile)
    state = dict(inputs)
    for _ in range(2):  # compile and warm up first
        for _, fn in stages:
            state.update(fn(state))
    torch.cuda.synchronize()
    result: dict[str, Any] = {"size": size, "batch": batch, "compiled": compile, "stages": {}}
    for name, fn in stages:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            state.update(fn(state))
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        totals: dict[str, float] = {}
        for e in kernels:
            totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
        top = sorted(totals.items(), key=lambda item: -item[1])[:8]
        result["stages"][name] = {
            "kernels": len(kernels),
            "kernel_us": sum(totals.values()),
            "top": [(k[:90], round(v, 1)) for k, v in top],
        }
    return result


def time_threads(config: PipelineConfig, *, threads: int = 8, calls: int = 100, size: int = 224) -> dict[str, Any]:
    """Throughput of ``threads`` threads calling one cache (one lock around replay) at batch 1.

    Each thread calls ``GraphCache.run`` on preprocessed inputs of its own (so the figure is the cache's
    cost, not preprocessing) and checks every result against the same call made alone.
    """
    pipe = Pipeline(config, device="cuda", graph_cache=GraphCache(max_entries=64))
    with torch.inference_mode():
        _, base, info = _case(pipe, size, 1)
        key = pipe._graph_key(size, 1, info["capacity"], 4)

        def call(values: dict[str, Tensor]) -> Tensor:
            return pipe.graph_cache.run(key, lambda: pipe._build(key), values, 1)["tokens"]

        jobs = [
            graph_inputs(
                key,
                {**base, "pixels": base["pixels"].roll(7 * i, -1), "budget": torch.full((1,), 10 + i, device="cuda")},
            )
            for i in range(threads)
        ]
        expected = [call(values) for values in jobs]
    barrier, wrong = threading.Barrier(threads + 1, timeout=300), [0] * threads  # a failing thread breaks it, not hangs

    def work(i: int) -> None:
        with torch.inference_mode():
            call(jobs[i])  # warm, before the clock starts
            torch.cuda.synchronize()
            barrier.wait()
            outs = [call(jobs[i]) for _ in range(calls)]
            torch.cuda.synchronize()
            barrier.wait()
            wrong[i] = sum(not torch.equal(o, expected[i]) for o in outs)  # ok-sync: checked after timing

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    barrier.wait()
    wall = time.perf_counter() - start
    for w in workers:
        w.join()
    stats = pipe.graph_cache.stats()
    return {
        "threads": threads,
        "calls_per_thread": calls,
        "size": size,
        "wall_s": wall,
        "calls_per_s": threads * calls / wall,
        "ms_per_call": wall / (threads * calls) * 1e3,
        "wrong_results": sum(wrong),
        "entries": stats["entries"],
        "bytes": stats["bytes"],
        "captures": stats["captures"],
    }


def time_warmup(
    config: PipelineConfig, sizes: tuple[int, ...] = (224, 384, 512, 768, 1024), batches: tuple[int, ...] = (1, 8, 64)
) -> dict[str, Any]:
    """Seconds and bytes to capture every size x batch bucket (compression and relevance-only chains), one pool."""
    warm = Pipeline(
        config.replace(buckets=sizes), device="cuda", graph_cache=GraphCache(max_entries=4 * len(sizes) * len(batches))
    )
    for size in sizes:
        warm.encoder(size)  # build the bucket models first: the warm-up measures captures
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    start = time.perf_counter()
    stats = warm.warmup(sizes, batch_sizes=batches)
    torch.cuda.synchronize()
    out = {
        "sizes": list(sizes),
        "batches": list(batches),
        "seconds": time.perf_counter() - start,
        "reserved_growth_bytes": torch.cuda.memory_reserved() - before,
        **{k: v for k, v in stats.items() if k != "per_entry"},
    }
    del warm
    torch.cuda.empty_cache()
    return out


def _old_call(chain: GraphChain, values: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """The previous design's host work per call, for comparison: per-tensor input copies, one clone per result."""
    static = chain.inputs.views
    for name in ("pixels", "valid", "budget"):
        static[name][:rows].copy_(values[name])
        static[name][rows:].copy_(values[name][:1].expand_as(static[name][rows:]))
    for name in ("query", "query_mask"):
        tokens = values[name].shape[1]
        static[name].zero_()
        static[name][:rows, :tokens].copy_(values[name])
        static[name][rows:, :tokens].copy_(values[name][:1].expand_as(static[name][rows:, :tokens]))
    chain.replay()
    return {k: v[:rows].clone() for k, v in chain.outputs.views.items()}


@torch.inference_mode()
def time_host(preset: str = "tiny", reps: int = 20000) -> dict[str, Any]:
    """Host cost of one graphed call at batch 1, on any machine: the replay is a no-op, so only Python, dispatch
    and the copy ops remain (tensors are tiny: a 32px bucket with the pipeline's real inputs and 17 results).
    CPU ops stand in for kernel launches; on a GPU host the same calls launch CUDA kernels instead."""
    pipe = Pipeline(PipelineConfig.from_name(preset, buckets=(32,)), graph_cache=GraphCache(backend="eager"))
    key = pipe._graph_key(32, 1, 64, 1)
    chain = pipe._chain(key)
    chain.replay = lambda: setattr(chain, "generation", chain.generation + 1)  # the GPU's part
    values = graph_inputs(key, {k: v.clone() for k, v in chain.inputs.views.items()})
    # successive calls bring new image tensors (preprocessing makes them) and may pass the same small ones again
    calls = itertools.cycle([values, {**values, "pixels": values["pixels"].clone(), "valid": values["valid"].clone()}])
    cache = pipe.graph_cache

    def median_us(fn: Callable[[], Any]) -> float:
        for _ in range(min(reps, 500)):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    build = lambda: pipe._build(key)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CUDA launches use no intra-op threads; a busy CPU pool would time its barriers instead
    try:
        out = _host_figures(chain, cache, key, build, calls, median_us, reps, preset)
        out.update(_pipeline_host_figures(pipe, median_us))
        return out
    finally:
        torch.set_num_threads(threads)


def _pipeline_host_figures(pipe: Pipeline, median_us: Callable[[Callable[[], Any]], float]) -> dict[str, Any]:
    """The whole user-facing call, ``pipe(images)`` on a uint8 ``(1, 3, 32, 32)`` tensor (budget 4, no query), with
    both chains' replays stubbed: preprocessing, query and budget checks, the graphed call and the output
    object; then what reading the usual fields adds, ``pipe.score``, and where the time goes."""
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pipe(images, budget=4), pipe.score(images)  # capture both chains (compression and relevance-only)
    for chain in pipe.graph_cache._entries.values():
        chain.replay = lambda c=chain: setattr(c, "generation", c.generation + 1)  # the GPU's part

    def read(out: Any) -> None:  # what a VLM consumer reads
        out.tokens, out.mask, out.positions  # noqa: B018

    out: dict[str, Any] = {}
    out["pipe_call_us"] = median_us(lambda: pipe(images, budget=4))
    out["pipe_zero_copy_call_us"] = median_us(lambda: pipe(images, budget=4, copy=False))
    out["pipe_call_read_us"] = median_us(lambda: read(pipe(images, budget=4)))
    out["pipe_zero_copy_call_read_us"] = median_us(lambda: read(pipe(images, budget=4, copy=False)))
    out["pipe_score_us"] = median_us(lambda: pipe.score(images))
    out["preprocess_us"] = median_us(lambda: pipe.preprocessor(images, device=pipe.device))
    preprocessed = itertools.cycle([pipe.preprocessor(images, device=pipe.device) for _ in range(2)])  # new tensors
    real = pipe.preprocessor
    pipe.preprocessor = lambda *_, **__: next(preprocessed)  # type: ignore[assignment,method-assign]  # the rest alone
    try:
        out["pipe_call_after_preprocess_us"] = median_us(lambda: pipe(images, budget=4))
        out["pipe_zero_copy_call_after_preprocess_us"] = median_us(lambda: pipe(images, budget=4, copy=False))
    finally:
        pipe.preprocessor = real
    return out


def _host_figures(
    chain: GraphChain,
    cache: GraphCache,
    key: Any,
    build: Callable[[], Any],
    calls: Iterator[dict[str, Tensor]],
    median_us: Callable[[Callable[[], Any]], float],
    reps: int,
    preset: str,
) -> dict[str, Any]:
    out = {
        "preset": preset,
        "inputs": len(chain.inputs.names),
        "results": len(chain.outputs.names),
        "reps": reps,
        "cpu": f"{os.cpu_count()}cpu-{platform.machine()}",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    out["previous_design_us"] = median_us(lambda: _old_call(chain, next(calls), 1))
    out["call_us"] = median_us(lambda: cache.run(key, build, next(calls), 1, True))
    out["zero_copy_call_us"] = median_us(lambda: cache.run(key, build, next(calls), 1, False))
    out["call_with_views_us"] = median_us(lambda: dict(cache.run(key, build, next(calls), 1, True)))
    out["zero_copy_with_views_us"] = median_us(lambda: dict(cache.run(key, build, next(calls), 1, False)))
    return out


def _host_markdown(report: dict[str, Any]) -> str:
    h = report["host"]
    return "\n".join(
        [
            f"# arrcoc graph call, host cost per call — {h['cpu']}",
            "",
            f"torch {report['torch']}, {report['date']}, preset `{h['preset']}`, batch 1, median of {h['reps']} calls; the "
            f"replay is a no-op, so this is Python, dispatch and copy ops only ({h['inputs']} inputs, {h['results']} results; "
            f"CPU ops stand in for kernel launches; one intra-op thread; load average {h['load_average']}). Successive "
            "calls bring new image tensors and the same small ones (query, mask, budget), as successive `pipe()` calls "
            "do; the `pipe` rows build result tensors only where they read them.",
            "",
            "| path | µs per call |",
            "|---|---:|",
            f"| previous design: per-tensor input copies + one clone per result | {h['previous_design_us']:.1f} |",
            f"| `GraphCache.run`, copy=True (one input cat, replay, one clone) | {h['call_us']:.1f} |",
            f"| `GraphCache.run`, copy=False (zero-copy) | {h['zero_copy_call_us']:.1f} |",
            f"| copy=True + building every result view | {h['call_with_views_us']:.1f} |",
            f"| copy=False + every result view | {h['zero_copy_with_views_us']:.1f} |",
            *_pipeline_rows(h),
            "",
        ]
    )


def _pipeline_rows(h: dict[str, Any]) -> list[str]:
    """The whole ``pipe(images)`` call's rows (absent from reports written before they were measured)."""
    rows = [
        ("`pipe(images, budget=4)` (uint8 1x3x32x32 tensor), copy=True", "pipe_call_us"),
        ("`pipe(images, budget=4, copy=False)`", "pipe_zero_copy_call_us"),
        ("`pipe(...)` copy=True + reading tokens, mask, positions", "pipe_call_read_us"),
        ("`pipe(..., copy=False)` + reading tokens, mask, positions", "pipe_zero_copy_call_read_us"),
        ("`pipe.score(images)`", "pipe_score_us"),
        ("of which preprocessing (`pipe.preprocessor(images)`)", "preprocess_us"),
        ("`pipe(...)` after preprocessing (preprocessor stubbed), copy=True", "pipe_call_after_preprocess_us"),
        ("`pipe(...)` after preprocessing, copy=False", "pipe_zero_copy_call_after_preprocess_us"),
    ]
    return [f"| {label} | {h[key]:.1f} |" for label, key in rows if key in h]


def _kwargs(report: dict[str, Any]) -> str:
    """The encoder's keyword arguments and weights folder, where the report names them."""
    kwargs = ", ".join(f"{k}={v}" for k, v in report.get("encoder_kwargs", {}).items())
    weights = f"weights `{report['pretrained']}`" if report.get("pretrained") else ""
    inside = "; ".join(part for part in (kwargs, weights) if part)
    return f" [{inside}]" if inside else ""


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return fmt.format(row[key]) if key in row else "—"


def _encoder_rows(results: list[dict[str, Any]]) -> list[str]:
    """The table of what arrcoc's stages add beside the encoder, plain and compiled ('—' where not measured)."""
    rows = [r for r in results if "encoder_graphed_ms" in r or "encoder_graphed_compiled_ms" in r]
    return [
        "",
        "What arrcoc's own stages add beside the encoder: the graphed chain against the same encoder alone captured "
        "the same way, same batch and dtype (*plain*: one plain graph of each; *compiled*: `Pipeline(compile=True)`'s "
        "chain against the encoder compiled as it compiles it, then one plain graph; *head compiled*: "
        "`Pipeline(compile=\"head\")`'s chain, arrcoc's stages compiled and the backbone not, against the plain "
        "encoder):",
        "",
        "| size | batch | plain: encoder ms | plain: chain ms | plain: chain / encoder "
        "| compiled: encoder ms | compiled: chain ms | compiled: chain / encoder "
        "| head compiled: chain ms | head compiled: chain / encoder |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['size']} | {r['batch']} | {_cell(r, 'encoder_graphed_ms', '{:.3f}')} | "
            f"{_cell(r, 'graphed_ms', '{:.3f}')} | {_cell(r, 'chain_over_encoder', '{:.2f}x')} | "
            f"{_cell(r, 'encoder_graphed_compiled_ms', '{:.3f}')} | {_cell(r, 'graphed_compiled_ms', '{:.3f}')} | "
            f"{_cell(r, 'compiled_chain_over_encoder', '{:.2f}x')} | {_cell(r, 'graphed_head_compiled_ms', '{:.3f}')} | "
            f"{_cell(r, 'head_compiled_chain_over_encoder', '{:.2f}x')} |"
            for r in rows
        ),
    ]


def _agreement_lines(a: dict[str, Any] | None) -> list[str]:
    """The compiled-vs-plain allocation agreement, as a sentence and a one-row table."""
    if not a:
        return []
    if "error" in a:
        return ["", f"Compiled vs plain allocations: not measured (`{a['error']}`)."]
    lines = [
        "",
        f"Compiled vs plain allocations: {a['images']} generated VQA-world scenes at {a['size']}px, batch {a['batch']}, "
        f"no question, budget {a['budget']}, through a plain graphed `Pipeline` and "
        f"`Pipeline(compile={_compile_arg(a.get('mode', 'compiled'))})`: **{100 * a['equal_share']:.1f}%** of the "
        "images get the identical allocation.",
        "",
        "| images | identical | share | most tokens one image moves | largest change of one region "
        "| largest token difference (identical allocations) | largest token | first call s, plain / compiled |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {a['images']} | {a['equal_images']} | {100 * a['equal_share']:.1f}% | {a['max_moved_tokens']} | "
        f"{a['max_region_diff']} | {_cell(a, 'max_abs_diff_tokens', '{:.3g}')} | {_cell(a, 'token_scale', '{:.3g}')} | "
        f"{_cell(a.get('first_call_s', {}), 'plain', '{:.1f}')} / {_cell(a.get('first_call_s', {}), 'compiled', '{:.1f}')} |",
    ]
    if a.get("capture_failures"):
        lines += ["", f"Capture failed (those calls ran eagerly): {a['capture_failures']}"]
    return lines


def _compile_arg(mode: str) -> str:
    """``Pipeline``'s ``compile=`` argument of a mode of :data:`COMPILE_MODES`, as written in Python."""
    return repr(COMPILE_MODES[mode]).replace("'", '"')


def _restart_lines(r: dict[str, Any] | None) -> list[str]:
    """Seconds from process start to the first compressed batch, one row per fresh process."""
    if not r:
        return []
    cache = "an empty cache folder of their own" if r.get("fresh_cache") else "this run's cache folder"
    lines = [
        "",
        f"Start-up: seconds from process start to the first compressed batch ({r.get('size', 224)}px, batch "
        f"{r.get('batch', 64)}, no question, `copy=False`, as the data-set job calls it), in fresh processes one "
        f"after the other; they share {cache} (`{r['cache_dir']}`, {r['cache_files_before']} files before the "
        "first), so a later run finds torch.compile's on-disk caches from the earlier ones:",
        "",
        "| mode | run | to first batch s | interpreter and imports s | building the pipeline s "
        "| first call s (compile, capture, run) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in r["runs"]:
        if "error" in run:
            lines.append(f"| {run['mode']} | {run['run']} | — | — | — | — |")
            continue
        graphed = "" if run.get("graphed", True) else " (capture failed: eager)"
        lines.append(
            f"| {run['mode']}{graphed} | {run['run']} | {run['seconds']:.1f} | {_cell(run, 'start_s', '{:.1f}')} | "
            f"{run['build_s']:.1f} | "
            f"{run['first_call_s']:.1f} |"
        )
    served = [run for run in r["runs"] if "compiled_s" in run]
    if served:
        lines += [
            "",
            "*background*: the plain graphs compress from the first batch while a helper thread compiles the head; "
            "seconds from process start until the compiled graph's first batch is done: "
            + ", ".join(
                f"run {run['run']} {run['compiled_s']:.1f} s"
                + ("" if run.get("compiled_served") else " (not served by the compiled graph)")
                for run in served
            )
            + ".",
        ]
    errors = [f"- {run['mode']} run {run['run']}: `{run['error']}`" for run in r["runs"] if "error" in run]
    return lines + (["", *errors] if errors else [])


def _pick_kernel(report: dict[str, Any]) -> str:
    """How the query-free pick ran, for reports that say (``pick_kernel``)."""
    if "pick_kernel" not in report:
        return ""
    said = "query-free pick: " + ("one Triton kernel, " if report["pick_kernel"] else "the torch loop, ")
    if "texture_kernel" in report:
        said += "texture: " + ("two Triton kernels, " if report["texture_kernel"] else "torch, ")
    return said


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# arrcoc CUDA graphs vs eager vs torch.compile — {report['device']}",
        "",
        f"torch {report['torch']}, encoder `{report['encoder']}`{_kwargs(report)} ({report['encoder_dtype']}), "
        f"{_pick_kernel(report)}"
        f"{report['date']}. "
        "Median over an adaptive number of runs after warm-up; GPU ms from CUDA events; CPU issue µs from "
        "perf_counter around the issuing call (no sync inside; *one kernel launch* = a one-element `add_`, "
        "this host's floor for any call that launches work). Budget = 25% of the patches, 4 query tokens. "
        "*graphed* = the chain as one CUDA graph, independent branches on side streams (*one stream*: without); *call issue* = input copy + replay + copy-out "
        "(`GraphCache.run`), *zero-copy* the same with `copy=False`; *views* = building the result tensors.",
        "",
    ]
    if "warmup" in report:
        w = report["warmup"]
        lines += [
            f"Warm-up of sizes {w['sizes']} x batches {w['batches']} (compression and relevance-only chains, "
            f"{w['captures']} captures, one pool): **{w['seconds']:.2f} s**, {w['bytes'] / 2**20:.0f} MiB kept "
            f"by the entries, {w['reserved_growth_bytes'] / 2**20:.0f} MiB reserved.",
            "",
        ]
    lines += [
        "| size | batch | eager ms | graphed ms | speed-up | graphed, one stream ms | per-stage graphs ms | compiled ms "
        "| graphed / compiled | graphed+compiled ms | graphed+compiled, one stream ms | one kernel launch µs | replay issue µs | call issue µs | zero-copy issue µs | views µs | per-stage graphs issue µs "
        "| eager issue µs | capture s | compile s | pool MiB | whole pipe() call ms | host syncs per call |",
        "|" + "---:|" * 23,
    ]
    for r in report["results"]:
        note = "" if r.get("compile_backend", "inductor") == "inductor" else f" ({r['compile_backend']})"
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['eager_ms']:.3f} | {r['graphed_ms']:.3f} | {r['speedup']:.1f}x | "
            f"{_cell(r, 'graphed_serial_ms', '{:.3f}')} | {r['per_stage_ms']:.3f} | {_cell(r, 'compiled_ms', '{:.3f}')}{note} | "
            f"{_cell(r, 'graphed_over_compiled', '{:.2f}')} | {_cell(r, 'graphed_compiled_ms', '{:.3f}')} | "
            f"{_cell(r, 'graphed_compiled_serial_ms', '{:.3f}')} | {_cell(r, 'launch_issue_us', '{:.1f}')} | {r['replay_issue_us']:.1f} | {r['call_issue_us']:.1f} | "
            f"{r['call_zero_copy_issue_us']:.1f} | {r['views_us']:.1f} | {r['per_stage_issue_us']:.1f} | "
            f"{r['eager_issue_us']:.0f} | {r['capture_s']:.2f} | {_cell(r, 'compile_s', '{:.1f}')} | {r['pool_bytes'] / 2**20:.1f} | "
            f"{_cell(r, 'pipe_call_ms', '{:.3f}')} | {_cell(r, 'pipe_call_syncs', '{}')} |"
        )
    errors = {
        f"{r['size']}x{r['batch']}": {
            **r.get("compile_errors", {}),
            **{f"inductor, stage {k}": v for k, v in r.get("inductor_stage_errors", {}).items()},
            **{f"inductor, scorer {k}": v for k, v in r.get("inductor_scorer_errors", {}).items()},
        }
        for r in report["results"]
        if "compile_errors" in r
    }
    if errors:
        lines += ["", "torch.compile failures (the cell then times the next backend that worked):", ""]
        lines += [f"- {case} {backend}: `{message}`" for case, d in errors.items() for backend, message in d.items()]
        lines += [
            f"- {r['size']}x{r['batch']}: stages inductor compiles alone: {', '.join(r['inductor_stages_ok']) or 'none'}"
            for r in report["results"]
            if "inductor_stages_ok" in r
        ]
        lines += [
            f"- {r['size']}x{r['batch']}: scorers inductor compiles alone: {', '.join(r['inductor_scorers_ok']) or 'none'}"
            for r in report["results"]
            if "inductor_scorers_ok" in r
        ]
    syncing = next((r for r in report["results"] if r.get("pipe_call_sync_ops")), None)
    if syncing:
        lines += [
            "",
            f"Host syncs in one whole `pipe()` call ({syncing['size']}x{syncing['batch']}, first of "
            f"{syncing['pipe_call_syncs']}): " + "; ".join(f"`{op}`" for op in syncing["pipe_call_sync_ops"]),
        ]
    lines += _encoder_rows(report["results"])
    lines += _agreement_lines(report.get("agreement"))
    lines += _restart_lines(report.get("restart"))
    lines += [
        "",
        "Per stage, GPU ms eager → as its own graph (speed-up):",
        "",
        "| size | batch | " + " | ".join(STAGE_NAMES) + " |",
        "|---:|---:|" + "---:|" * len(STAGE_NAMES),
    ]
    for r in report["results"]:
        cells = [
            f"{r['eager_stage_ms'][n]:.3f} → {r['graphed_stage_ms'][n]:.3f} ({r['stage_speedup'][n]:.1f}x)"
            for n in STAGE_NAMES
        ]
        lines.append(f"| {r['size']} | {r['batch']} | " + " | ".join(cells) + " |")
    for p in report.get("profiles", []):
        graphed = next((r for r in report["results"] if (r["size"], r["batch"]) == (p["size"], p["batch"])), None)
        lines += [
            "",
            f"Kernels per stage at {p['size']}x{p['batch']}, "
            + {False: "eager", True: "compiled", "head": 'compiled as `compile="head"`'}[p["compiled"]]
            + " (torch.profiler; graphed ms from the table above, where it applies):",
            "",
            "| stage | kernels | kernel ms | graphed ms | top kernels (µs) |",
            "|---|---:|---:|---:|---|",
        ]
        for name, st in p["stages"].items():
            own = _cell(graphed["graphed_stage_ms"], name, "{:.3f}") if graphed and not p["compiled"] else "—"
            top = "; ".join(f"`{k}` {v}" for k, v in st["top"][:3])
            lines.append(f"| {name} | {st['kernels']} | {st['kernel_us'] / 1e3:.3f} | {own} | {top} |")
    if "threads" in report:
        t = report["threads"]
        lines += [
            "",
            f"{t['threads']} threads x {t['calls_per_thread']} calls at {t['size']}px batch 1 on one pipeline "
            "(`GraphCache.run`, results checked against the same call alone):",
            "",
            "| calls/s | ms per call | wrong results | entries | MiB | captures |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {t['calls_per_s']:.0f} | {t['ms_per_call']:.3f} | {t['wrong_results']} | {t['entries']} | "
            f"{t['bytes'] / 2**20:.1f} | {t['captures']} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the graph benchmark (CUDA only); returns an exit code."""
    parser = argparse.ArgumentParser(
        prog="arrcoc bench --graphs",
        description="CUDA graphs vs eager vs torch.compile.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 1024], help="bucket sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="batch sizes")
    parser.add_argument("--preset", default="default", help="pipeline preset")
    parser.add_argument(
        "--pretrained",
        nargs="?",
        const="",
        default=None,
        metavar="FOLDER",
        help="build the pipeline from a folder saved by Pipeline.save_pretrained (its config and encoder weights) "
        "instead of --preset; without FOLDER the shipped weights, as the data-set job uses",
    )
    parser.add_argument("--encoder", default=None, help="override the preset's timm encoder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="encoder dtype")
    parser.add_argument(
        "--compile",
        nargs="*",
        default=["224x1"],
        help="SIZExBATCH cases also timed with torch.compile(mode='reduce-overhead') and graphed+compiled",
    )
    parser.add_argument(
        "--no-reduce-overhead",
        action="store_true",
        help="in --compile cases time only the graphed+compiled chain (and the encoder compiled the same way), "
        "not torch.compile(mode='reduce-overhead') of the whole chain",
    )
    parser.add_argument(
        "--agreement",
        nargs="?",
        const="224x64",
        default=None,
        metavar="SIZExBATCH",
        help="compare the allocations of a plain graphed Pipeline and Pipeline(compile=True) on the same "
        "generated scenes (no question), at this case",
    )
    parser.add_argument("--agreement-images", type=int, default=512, help="images for --agreement")
    parser.add_argument(
        "--agreement-mode",
        choices=["compiled", "head"],
        default="compiled",
        help='the compiled pipeline --agreement compares: Pipeline(compile=True) or compile="head"',
    )
    parser.add_argument(
        "--restart",
        nargs="?",
        const="224x64",
        default=None,
        metavar="SIZExBATCH",
        help="seconds from process start to the first compressed batch of this case, in fresh processes one "
        "after the other (the later ones find torch.compile's on-disk caches)",
    )
    parser.add_argument(
        "--restart-modes",
        nargs="+",
        default=["plain", "compiled"],
        choices=list(RESTART_MODES),
        help='pipelines --restart starts: plain graphs, Pipeline(compile=True), Pipeline(compile="head"), '
        'Pipeline(compile="head", compile_in_background=True)',
    )
    parser.add_argument("--restart-runs", type=int, default=2, help="fresh processes per --restart mode")
    parser.add_argument(
        "--restart-fresh",
        action="store_true",
        help="give the --restart processes an empty TORCHINDUCTOR_CACHE_DIR, so that the first compiles cold "
        "(otherwise they share this run's caches)",
    )
    parser.add_argument(
        "--first-batch",
        choices=list(RESTART_MODES),
        default=None,
        help="(what --restart runs) build one pipeline, compress one batch of the first size and batch, print "
        "the timings and exit",
    )
    parser.add_argument("--reps", type=int, default=50, help="most timed runs per measurement")
    parser.add_argument("--seconds", type=float, default=0.5, help="about this long per measurement (fewer reps)")
    parser.add_argument("--skip", nargs="*", default=[], help="SIZExBATCH cases to leave out (e.g. 1024x64)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the 5 sizes x 3 batches warm-up measurement")
    parser.add_argument("--threads", action="store_true", help="also time 8 threads calling one pipeline")
    parser.add_argument(
        "--profile",
        nargs="*",
        default=[],
        help="SIZExBATCH cases whose stages are profiled (kernel count and time, eager and compiled)",
    )
    parser.add_argument("--quick", action="store_true", help="sizes 224 512, batches 1 8, 20 reps")
    parser.add_argument(
        "--out", default="arrcoc-results", help="output folder (pass bench/results to update the committed ones)"
    )
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument(
        "--host",
        action="store_true",
        help="only the host cost of a call (no GPU needed): writes graphs-host-<cpu>.json/.md",
    )
    parser.add_argument("--host-reps", type=int, default=20000, help="timed calls per --host measurement")
    args = parser.parse_args(argv)
    if args.host:
        host = {
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "host": time_host(reps=args.host_reps),
        }
        write_report(host, _host_markdown(host), args.out, f"graphs-host-{host['host']['cpu']}", args.tag)
        return 0
    if not torch.cuda.is_available():
        parser.error("the graph benchmark needs a CUDA GPU")
    if args.quick:
        args.sizes, args.batches, args.reps = [224, 512], [1, 8], min(args.reps, 20)
    config, weights, config_args = _config(parser, args)
    if args.first_batch:
        first = time_first_batch(
            config,
            weights=weights,
            compile=RESTART_MODES[args.first_batch],
            in_background=args.first_batch == "background",
            size=args.sizes[0],
            batch=args.batches[0],
        )
        print(FIRST_BATCH_MARK + json.dumps(first), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "encoder": config.encoder,
        "encoder_kwargs": config.encoder_kwargs,
        "pretrained": weights,
        "encoder_dtype": args.dtype,
        "pick_kernel": greedy_pick.USE_KERNEL,  # the query-free pick as one Triton kernel; ARRCOC_PICK_KERNEL=0: not
        "texture_kernel": texture.USE_KERNEL,  # the texture as Triton kernels; ARRCOC_TEXTURE_KERNEL=0: not
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "max_reps": args.reps,
        "results": [],
    }
    name = f"graphs-{report['device']}"

    def save() -> None:  # after every step: a later failure keeps what was measured
        write_report(report, _markdown(report), args.out, name, args.tag)

    if not args.no_warmup:
        report["warmup"] = time_warmup(config)
        logger.info("warm-up: %.2f s, %d captures", report["warmup"]["seconds"], report["warmup"]["captures"])
    pipe = Pipeline(config.replace(buckets=tuple(sorted(set(args.sizes)))), weights=weights, device="cuda")
    for size in args.sizes:
        for batch in args.batches:
            if f"{size}x{batch}" in args.skip:
                continue
            try:
                report["results"].append(time_graphs(pipe, size, batch, reps=args.reps, seconds=args.seconds))
                logger.info(
                    "%dx%d: eager %.3f ms, graphed %.3f ms, call issue %.1f us",
                    size,
                    batch,
                    report["results"][-1]["eager_ms"],
                    report["results"][-1]["graphed_ms"],
                    report["results"][-1]["call_issue_us"],
                )
                save()
            except Exception as err:  # e.g. out of memory at the largest case: record, go on
                report.setdefault("failures", {})[f"{size}x{batch}"] = _error(err)
                logger.warning("%dx%d failed: %s", size, batch, err)
            pipe.graph_cache.clear()
            torch.cuda.empty_cache()
    if args.threads:
        pipe.graph_cache.clear()
        torch.cuda.empty_cache()
        try:
            report["threads"] = time_threads(config.replace(buckets=tuple(sorted(set(args.sizes)))))
        except Exception as err:
            report.setdefault("failures", {})["threads"] = _error(err)
        save()
    for case in args.profile:
        size, batch = (int(v) for v in case.split("x"))
        for compiled in (False, "head"):  # the plain chain's launches, and what compiling arrcoc's stages leaves
            try:
                report.setdefault("profiles", []).append(profile_kernels(pipe, size, batch, compile=compiled))
            except Exception as err:  # a diagnostic: never lose the benchmark for it
                report.setdefault("failures", {})[f"profile {case} compile={compiled}"] = _error(err)
            save()
        torch._dynamo.reset()
    for result in report["results"]:  # compiled last: its CUDA graph trees stay resident
        if f"{result['size']}x{result['batch']}" in args.compile:
            try:
                time_compiled(pipe, result, reps=args.reps, save=save, whole=not args.no_reduce_overhead)
            except Exception as err:
                result.setdefault("compile_errors", {})["benchmark"] = _error(err)
            save()
    del pipe
    torch.cuda.empty_cache()
    if args.agreement:
        size, batch = (int(v) for v in args.agreement.split("x"))
        try:
            report["agreement"] = compare_compiled(
                config, weights=weights, size=size, batch=batch, images=args.agreement_images, mode=args.agreement_mode
            )
            logger.info("agreement: %.1f%% identical", 100 * report["agreement"]["equal_share"])
        except Exception as err:
            report["agreement"] = {"error": _error(err)}
        save()
    if args.restart:
        size, batch = (int(v) for v in args.restart.split("x"))

        def keep(restart: dict[str, Any]) -> None:
            report["restart"] = restart
            save()

        time_restart(
            config_args,
            modes=tuple(args.restart_modes),
            runs=args.restart_runs,
            fresh_cache=args.restart_fresh,
            size=size,
            batch=batch,
            save=keep,
        )
    save()
    return 0


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[PipelineConfig, str | None, list[str]]:
    """The pipeline's config, its weights file (None: random initialisation) and the options that rebuild both."""
    overrides: dict[str, Any] = {"encoder_dtype": args.dtype}
    if args.encoder:
        overrides["encoder"] = args.encoder
    config_args = ["--dtype", args.dtype] + (["--encoder", args.encoder] if args.encoder else [])
    if args.pretrained is None:
        return PipelineConfig.from_name(args.preset, **overrides), None, [*config_args, "--preset", args.preset]
    if args.encoder:
        parser.error("--encoder and --pretrained: the weights are the pretrained folder's encoder's")
    folder = Path(args.pretrained) if args.pretrained else DEFAULT_WEIGHTS_DIR
    try:
        config = PipelineConfig.from_json((folder / "config.json").read_text()).replace(**overrides)
    except OSError as err:
        parser.error(f"--pretrained: {err}")
    return config, os.fspath(folder / "encoder.safetensors"), [*config_args, "--pretrained", args.pretrained]


if __name__ == "__main__":
    raise SystemExit(main())
