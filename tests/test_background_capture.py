"""``Pipeline(compile=..., compile_in_background=True)``: each graph key is served by its plain chain at once while a
helper thread builds and captures its compiled chain, which then serves the key; a failed compile leaves the key
plain. On the CPU through the graph cache's eager backend, with ``torch.compile`` replaced by a recorder; on CUDA
with inductor."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import arrcoc
from arrcoc.runtime.graphs import GraphCache

cuda = pytest.mark.cuda


def _images(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 200, 224, generator=g) for _ in range(count)]


def _recording_compile(calls: list[str], fail: bool = False) -> Callable[..., Any]:
    """A stand-in for ``torch.compile``: the function as it is, noting the thread of each call (or failing)."""

    def compile(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        def compiled(*args: Any, **kw: Any) -> Any:
            calls.append(threading.current_thread().name)
            if fail:
                raise RuntimeError("the compiler gave up")
            return fn(*args, **kw)

        return compiled

    return compile


def _blocking_compile(release: threading.Event, building: threading.Event | None = None) -> Callable[..., Any]:
    """A stand-in for ``torch.compile`` whose compiled bodies wait for ``release`` (setting ``building`` first)."""

    def compile(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        def compiled(*args: Any, **kw: Any) -> Any:
            if building is not None:
                building.set()
            release.wait(60)
            return fn(*args, **kw)

        return compiled

    return compile


def test_the_plain_chain_serves_until_the_compiled_one_is_captured(
    tiny_config: arrcoc.PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", _recording_compile(calls))
    pipe = arrcoc.Pipeline(
        tiny_config, compile="head", compile_in_background=True, graph_cache=GraphCache(backend="eager")
    )
    plain = arrcoc.Pipeline(tiny_config, cuda_graphs=False)
    images = _images(3, seed=5)
    first = pipe(images, budget=[5, 20, 40])
    assert pipe.graph_cache.stats()["captures"] == 1  # the plain chain, captured in this thread
    assert pipe.wait_for_compile(timeout=120)
    compiled = pipe.compiled_chains
    assert compiled is not None and len(compiled.cache) == 1 and not compiled.failures
    assert calls and set(calls) == {"arrcoc-compile"}  # compiled bodies ran on the helper thread only
    second = pipe(images, budget=[5, 20, 40])
    assert compiled.cache.stats()["hits"] == 1 and pipe.graph_cache.stats()["hits"] == 0
    reference = plain(images, budget=[5, 20, 40])
    for out in (first, second):
        assert torch.equal(out.allocation, reference.allocation) and torch.equal(out.mask, reference.mask)
        torch.testing.assert_close(out.tokens, reference.tokens)
    pipe.warmup(sizes=(384,), batch_sizes=(2,), budget=20)  # warm-up queues the compile of what it captures
    assert pipe.wait_for_compile(timeout=120) and len(pipe.graph_cache) > 1
    assert set(compiled.cache._entries) == set(pipe.graph_cache._entries)
    pipe.to(torch.float64)  # the captured chains hold float32 tensors: both caches start over
    assert len(compiled.cache) == 0 and len(pipe.graph_cache) == 0


def test_a_compile_is_queued_only_once_its_plain_chain_is_captured(
    tiny_config: arrcoc.PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compile beside a capture can void it (docs/decisions.md): the plain capture of a key comes first."""
    monkeypatch.setattr(torch, "compile", _recording_compile([]))
    pipe = arrcoc.Pipeline(
        tiny_config, compile="head", compile_in_background=True, graph_cache=GraphCache(backend="eager")
    )
    assert pipe.compiled_chains is not None
    queued_after_capture: list[bool] = []
    ready = pipe.compiled_chains.ready

    def recording_ready(key: Any, *rest: Any) -> bool:
        queued_after_capture.append(key in pipe.graph_cache)
        return ready(key, *rest)

    monkeypatch.setattr(pipe.compiled_chains, "ready", recording_ready)
    pipe(_images(2, seed=7), budget=10)  # the first call: capture, then queue
    assert queued_after_capture == [True]
    pipe.warmup(sizes=(384,), batch_sizes=(2,), budget=20)
    assert queued_after_capture and all(queued_after_capture)
    assert pipe.wait_for_compile(timeout=120) and len(pipe.compiled_chains.cache) == len(pipe.graph_cache)


def test_a_new_key_runs_eagerly_while_a_build_is_under_way(
    tiny_config: arrcoc.PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No capture beside a compile: a key first seen during a build runs eagerly, and is captured after it."""
    building, release = threading.Event(), threading.Event()
    monkeypatch.setattr(torch, "compile", _blocking_compile(release, building))
    pipe = arrcoc.Pipeline(
        tiny_config, compile="head", compile_in_background=True, graph_cache=GraphCache(backend="eager")
    )
    plain = arrcoc.Pipeline(tiny_config, cuda_graphs=False)
    pipe(_images(2, seed=8), budget=10)
    assert building.wait(60)  # the helper thread is inside the first key's build
    other = [torch.rand(3, 384, 384, generator=torch.Generator().manual_seed(9))]
    out = pipe(other, budget=20)
    assert len(pipe.graph_cache) == 1  # not captured beside the build
    assert torch.equal(out.allocation, plain(other, budget=20).allocation)
    release.set()
    assert pipe.wait_for_compile(timeout=120)
    pipe(other, budget=20)  # the build is done: captured now, and its own build queued
    assert len(pipe.graph_cache) == 2 and pipe.wait_for_compile(timeout=120)
    assert len(pipe.compiled_chains.cache) == 2 and not pipe.compiled_chains.failures


def test_warmup_captures_every_plain_chain_before_any_compile_starts(
    tiny_config: arrcoc.PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build holds off captures, so warm-up queueing each compile after its capture would wait a compile per key."""
    release = threading.Event()
    monkeypatch.setattr(torch, "compile", _blocking_compile(release))
    pipe = arrcoc.Pipeline(
        tiny_config, compile="head", compile_in_background=True, graph_cache=GraphCache(backend="eager")
    )
    began = time.perf_counter()
    stats = pipe.warmup(sizes=(224, 384), batch_sizes=(1, 2), budget=20)
    assert time.perf_counter() - began < 30 and stats["captures"] == len(pipe.graph_cache) > 4
    release.set()
    assert pipe.wait_for_compile(timeout=120) and len(pipe.compiled_chains.cache) == len(pipe.graph_cache)


def test_a_failed_compile_leaves_the_key_on_its_plain_chain(
    tiny_config: arrcoc.PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "compile", _recording_compile([], fail=True))
    pipe = arrcoc.Pipeline(
        tiny_config, compile="head", compile_in_background=True, graph_cache=GraphCache(backend="eager")
    )
    images = _images(2, seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(images, budget=10)
        assert pipe.wait_for_compile(timeout=120)
    assert any("stays on its plain graph" in str(w.message) and "gave up" in str(w.message) for w in caught)
    assert pipe.compiled_chains is not None and list(pipe.compiled_chains.failures.values()) == [
        "RuntimeError: the compiler gave up"
    ]
    out = pipe(images, budget=10)  # the plain chain again, not a second attempt
    assert out.mask.sum().item() == 20 and pipe.graph_cache.stats()["hits"] == 1
    assert len(pipe.compiled_chains.cache) == 0


def test_a_deferred_compile_waits_for_start_compile_then_builds_every_key_served(
    tiny_config: arrcoc.PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", _recording_compile(calls))
    pipe = arrcoc.Pipeline(
        tiny_config, compile="head", compile_in_background="deferred", graph_cache=GraphCache(backend="eager")
    )
    images = _images(2, seed=8)
    first = pipe(images, budget=10)
    pipe.warmup(sizes=(384,), batch_sizes=(2,), budget=20)
    time.sleep(0.2)  # room for a helper thread that should not exist
    chains = pipe.compiled_chains
    assert chains is not None and not pipe.compile_started and chains._thread is None and not calls
    assert not pipe.wait_for_compile(timeout=30)  # at once: nothing is being built
    assert pipe(images, budget=10).allocation.equal(first.allocation) and pipe.graph_cache.stats()["hits"] == 1
    pipe.start_compile()
    assert pipe.compile_started and pipe.wait_for_compile(timeout=120)
    assert set(chains.cache._entries) == set(pipe.graph_cache._entries) and set(calls) == {"arrcoc-compile"}
    pipe.start_compile()  # again: nothing more
    second = pipe(images, budget=10)
    assert chains.cache.stats()["hits"] == 1 and torch.equal(second.allocation, first.allocation)
    pipe.warmup(sizes=(224,), batch_sizes=(8,), budget=20)  # a key met after the start is built as it comes
    assert pipe.wait_for_compile(timeout=120) and len(chains.cache) == len(pipe.graph_cache)


def test_compile_in_background_needs_a_compile(tiny_config: arrcoc.PipelineConfig) -> None:
    with pytest.raises(arrcoc.InvalidInputError, match="compile_in_background needs compile"):
        arrcoc.Pipeline(tiny_config, compile_in_background=True)
    with pytest.raises(arrcoc.InvalidInputError, match='compile_in_background must be False, True or "deferred"'):
        arrcoc.Pipeline(tiny_config, compile="head", compile_in_background="later")
    with pytest.raises(arrcoc.InvalidInputError, match="start_compile needs compile_in_background"):
        arrcoc.Pipeline(tiny_config, compile="head").start_compile()


@cuda
def test_the_compiled_chain_takes_over_with_the_plain_chains_allocations() -> None:
    """Inductor on the helper thread while this thread replays the plain graph; then the compiled graph serves and
    gives the plain pipeline's allocations (issue 22: >= 99% of images)."""
    from arrcoc.tools.bench_graphs import _world_images

    config = arrcoc.PipelineConfig.from_name("tiny", encoder_dtype="bfloat16")
    plain = arrcoc.Pipeline(config, device="cuda")
    pipe = arrcoc.Pipeline(config, device="cuda", compile="head", compile_in_background=True)
    images = _world_images(224, range(900_000, 900_128)).cuda()
    deadline = time.monotonic() + 300
    while True:  # the plain graph replays beside the compile
        a, b = plain(images[:64], budget=49), pipe(images[:64], budget=49)
        assert torch.equal(a.allocation, b.allocation) and pipe.graph_cache.stats()["captures"] == 1
        if pipe.wait_for_compile(timeout=0.2):
            break
        assert time.monotonic() < deadline, "the compile did not finish in 300 s"
    assert pipe.graph_cache.stats()["hits"] >= 1  # the plain graph served while the compile ran
    chains = pipe.compiled_chains
    assert chains is not None and not chains.failures and len(chains.cache) == 1
    same = []
    for start in range(0, 128, 64):
        a, b = plain(images[start : start + 64], budget=49), pipe(images[start : start + 64], budget=49)
        assert b.mask.sum().item() == 64 * 49
        same.append((a.allocation == b.allocation).flatten(1).all(1).cpu())
    assert chains.cache.stats()["hits"] == 2 and not pipe._eager_only
    assert torch.cat(same).sum().item() >= 127  # 99.2% of 128 scenes


def test_a_process_that_is_done_exits_without_waiting_for_a_compile(tmp_path) -> None:
    """The compile thread is a daemon: a job that ends before its compile does exits at once, with no warning."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(
        "import time, torch, arrcoc\n"
        "from arrcoc.runtime.graphs import GraphCache\n"
        "def compile(fn, **kwargs):\n"
        "    def compiled(*args, **kw):\n"
        "        time.sleep(60)\n"
        "        return fn(*args, **kw)\n"
        "    return compiled\n"
        "torch.compile = compile\n"
        "pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name('tiny'), compile='head', compile_in_background=True,\n"
        "                       graph_cache=GraphCache(backend='eager'))\n"
        "out = pipe([torch.rand(3, 64, 64)], budget=4)\n"
        "assert not pipe.wait_for_compile(timeout=0.5)\n"
        "print('done', int(out.mask.sum()), flush=True)\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "done 4" and "stays on its plain graph" not in proc.stderr
    assert time.monotonic() - start < 50  # well short of the compile's 60 s
