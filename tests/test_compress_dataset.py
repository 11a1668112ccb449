"""compress-dataset: one process and two (gloo, torchrun) write the same shards; kills and restarts lose nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import arrcoc
from arrcoc.datasets import compress_dataset
from arrcoc.datasets.compress_dataset import EXIT_INCOMPLETE, list_sources
from arrcoc.datasets.compress_dataset import main as compress_main
from arrcoc.datasets.shards import INDEX_NAME, SHARD_DIR, ShardFile, load_index, load_record

BROKEN = {"broken.jpg": b"this is not a JPEG", "empty.png": b""}
SHARD_SIZE = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with 64 and 128 px buckets (4x4 and 8x8 patches): every code path, little arithmetic."""
    folder = tmp_path_factory.mktemp("model")
    arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny", buckets=(64, 128))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 readable images (two buckets, one sub-folder, odd shapes) and three broken files."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    rng = np.random.default_rng(7)
    for i in range(24):
        side = (20, 64) if i % 4 else (70, 128)  # every 4th goes to the 128 px bucket
        h, w = (int(v) for v in rng.integers(*side, size=2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ("sub" if i % 5 == 0 else ".") / f"img{i:02d}.png")
    for name, data in BROKEN.items():
        (folder / name).write_bytes(data)
    whole = (folder / "img01.png").read_bytes()
    (folder / "sub" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return folder


def _args(source: Path, dest: Path, model: Path, *extra: str) -> list[str]:
    return [
        os.fspath(source),
        os.fspath(dest),
        "--budget",
        "8",
        "--pretrained",
        os.fspath(model),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--shard-size",
        str(SHARD_SIZE),
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, source: Path, model: Path) -> Path:
    """One process, no torchrun, in this process (one thread, like the subprocesses)."""
    dest = tmp_path_factory.mktemp("reference")
    with _one_thread():
        assert compress_main(_args(source, dest, model, "--workers", "0")) == 0
    return dest


class _one_thread:
    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


def _shards(dest: Path) -> dict[str, tuple[dict[str, str], dict[str, torch.Tensor]]]:
    """Each file under ``shards/``: its header metadata and its tensors (a header's key order is not fixed)."""
    out = {}
    for path in sorted((dest / SHARD_DIR).iterdir()):
        with safe_open(os.fspath(path), framework="pt") as handle:
            out[path.name] = (handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()})
    return out


def _assert_same_dataset(got: Path, want: Path) -> None:
    assert (got / INDEX_NAME).read_text() == (want / INDEX_NAME).read_text()
    got_shards, want_shards = _shards(got), _shards(want)
    assert sorted(got_shards) == sorted(want_shards)  # no temporary files left behind either
    for name, (metadata, tensors) in want_shards.items():
        assert got_shards[name][0] == metadata, name
        assert sorted(got_shards[name][1]) == sorted(tensors), name
        for key, value in tensors.items():
            assert torch.equal(got_shards[name][1][key], value), f"{name}: {key} differs"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_index_lists_every_image_once_and_broken_ones_with_reasons(reference: Path, source: Path) -> None:
    index = load_index(reference)
    sources = list_sources(source)
    assert len(sources) == 27
    assert [r["index"] for r in index] == list(range(27))
    assert [r["source"] for r in index] == sources
    broken = {Path(r["source"]).name: r["error"] for r in index if r["status"] == "error"}
    assert sorted(broken) == sorted([*BROKEN, "truncated.png"])
    assert "not an image file" in broken["broken.jpg"] and "broken.jpg" in broken["broken.jpg"]
    assert "truncated" in broken["truncated.png"]
    for record in index:
        assert record["shard"] == f"{SHARD_DIR}/shard-{record['index'] // SHARD_SIZE:06d}.safetensors"
        assert (record["offset"] is None) == (record["status"] == "error")
    for shard in {r["shard"] for r in index}:  # rows of a shard: 0..n-1, in source order
        offsets = [r["offset"] for r in index if r["shard"] == shard and r["status"] == "ok"]
        assert offsets == list(range(len(offsets)))
    assert {r["bucket"] for r in index if r["status"] == "ok"} == {64, 128}


def test_shards_whose_images_all_compressed_were_finished_in_place(reference: Path) -> None:
    """Their headers keep the room the writer set aside (the records fitted it); a shard with broken images was
    gathered and written whole by safetensors, whose header pads to 8 bytes only."""
    index = load_index(reference)
    kinds = set()
    for shard in sorted({r["shard"] for r in index}):
        data = (reference / shard).read_bytes()
        length = _header_length(reference / shard)
        padding = length - len(data[8 : 8 + length].rstrip(b" "))
        complete = all(r["status"] == "ok" for r in index if r["shard"] == shard)
        assert (padding >= 64) == complete, (shard, padding)
        kinds.add(complete)
    assert kinds == {True, False}


def test_records_read_back_equal_the_pipeline(reference: Path, model: Path) -> None:
    pipe = arrcoc.Pipeline.from_pretrained(model)
    records = [r for r in load_index(reference) if r["status"] == "ok"][:6]
    out = pipe([r["source"] for r in records], budget=8)
    for i, record in enumerate(records):
        got = load_record(reference, record)
        rh, rw = out.region_grid[i].tolist()
        torch.testing.assert_close(got["tokens"], out.tokens[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(got["mask"], out.mask[i]) and int(got["mask"].sum()) == 8
        assert torch.equal(got["positions"], out.positions[i])
        assert torch.equal(got["allocation"], out.allocation[i, :rh, :rw])
        assert torch.equal(got["source_size"], out.source_size[i])
        assert got["scale"] == out.scale[i] and int(got["bucket"]) == record["bucket"]
    with pytest.raises(arrcoc.InvalidInputError, match="holds no tensors"):
        load_record(reference, next(r for r in load_index(reference) if r["status"] == "error"))


def _rank(rank: int, world: int, port: int, args: list[str], die_after_one_shard: bool) -> None:
    """A process as torchrun starts it (its environment), forked from this one so torch is imported already."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    if die_after_one_shard:
        real = ShardFile.finish

        def finish(shard: ShardFile, *rest: object) -> None:
            if any(shard.path.parent.glob("shard-*.safetensors")):
                # die while writing the second shard: its temporary file left as it is, no clean-up of any kind
                os.kill(os.getpid(), signal.SIGKILL)
            real(shard, *rest)

        ShardFile.finish = finish
    sys.exit(compress_main(args))


def _run_processes(world: int, args: list[str], *, die_after_one_shard: bool = False) -> list[int | None]:
    """Exit codes of ``world`` processes running ``arrcoc compress-dataset args`` as torchrun would start them."""
    context = torch.multiprocessing.get_context("fork")
    port = _free_port()
    processes = [
        context.Process(target=_rank, args=(rank, world, port, args, die_after_one_shard)) for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + 120
    # poll the exit status rather than join(): a killed process's orphaned DataLoader worker keeps the join
    # sentinel open until it notices (seconds later), though the process itself is gone
    while any(process.is_alive() for process in processes) and time.monotonic() < deadline:
        time.sleep(0.02)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


def test_two_processes_write_the_same_dataset_as_one(
    tmp_path: Path, source: Path, model: Path, reference: Path
) -> None:
    dest = tmp_path / "two"
    args = _args(source, dest, model, "--workers", "1", "--stats-json", os.fspath(tmp_path / "stats-{rank}.json"))
    assert _run_processes(2, args) == [0, 0]
    stats = [json.loads((tmp_path / f"stats-{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["world_size"] for s in stats] == [2, 2]
    assert [s["shards_written"] for s in stats] == [3, 3]  # shards 0, 2, 4 and 1, 3, 5: disjoint, all of them
    assert sum(s["images"] for s in stats) == 27 and sum(s["errors"] for s in stats) == 3
    _assert_same_dataset(dest, reference)


@pytest.mark.parametrize(
    ("per_node", "gpus", "local", "device", "backend"),
    [(2, 2, 1, 1, "nccl"), (2, 1, 1, 0, "gloo"), (4, 2, 3, 1, "gloo"), (3, 2, 2, 0, "gloo")],
)
def test_ranks_beyond_the_gpus_share_them_through_gloo(
    monkeypatch: pytest.MonkeyPatch, per_node: int, gpus: int, local: int, device: int, backend: str
) -> None:
    """NCCL holds one rank per GPU: more processes than GPUs on a node take GPU LOCAL_RANK mod count, over gloo."""
    env = dict(RANK=local, LOCAL_RANK=local, WORLD_SIZE=per_node, LOCAL_WORLD_SIZE=per_node, MASTER_PORT=1)
    for name, value in {**env, "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    chosen, groups = [], []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(compress_dataset.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(compress_dataset.dist, "init_process_group", lambda name, **_: groups.append(name))
    monkeypatch.setattr(compress_dataset.dist, "get_rank", lambda: local)
    monkeypatch.setattr(compress_dataset.dist, "get_world_size", lambda: per_node)
    launch = compress_dataset._launch("cuda", 1.0)
    assert chosen == [torch.device("cuda", device)] and launch.device == torch.device("cuda", device)
    assert groups == [backend] and (launch.rank, launch.world, launch.owns_group) == (local, per_node, True)


def test_a_rank_beyond_the_gpus_without_local_world_size_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without LOCAL_WORLD_SIZE rank 0 would pick NCCL and rank 2 gloo: the group would never form."""
    for name, value in dict(RANK=2, LOCAL_RANK=2, WORLD_SIZE=3, MASTER_ADDR="127.0.0.1", MASTER_PORT=1).items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(arrcoc.InvalidInputError, match="LOCAL_RANK 2 has no GPU of its own .* LOCAL_WORLD_SIZE"):
        compress_dataset._launch("cuda", 1.0)


def test_a_decode_bound_lone_process_on_a_gpu_is_told_of_a_second() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    bound = compress_dataset.DatasetStats(seconds=2.0, decode_thread_seconds=1.8)
    hint = compress_dataset._decode_hint(bound, cuda)
    assert hint is not None and "busy 90%" in hint and "--nproc-per-node 2" in hint
    assert (
        compress_dataset._decode_hint(compress_dataset.DatasetStats(seconds=2.0, decode_thread_seconds=1.0), cuda)
        is None
    )
    assert compress_dataset._decode_hint(bound, cpu) is None  # no decode thread off the GPU
    two = compress_dataset.DatasetStats(seconds=2.0, decode_thread_seconds=1.8, world_size=2)
    assert compress_dataset._decode_hint(two, cuda) is None  # already several processes
    assert compress_dataset._decode_hint(compress_dataset.DatasetStats(), cuda) is None  # nothing ran


def test_a_killed_run_restarts_and_completes_with_nothing_lost_or_duplicated(
    tmp_path: Path, source: Path, model: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "killed"
    args = _args(source, dest, model, "--workers", "1")
    assert _run_processes(1, args, die_after_one_shard=True) == [-signal.SIGKILL]
    assert [p.name for p in (dest / SHARD_DIR).iterdir() if not p.name.startswith(".")] == ["shard-000000.safetensors"]
    assert any(p.name.endswith(".tmp") for p in (dest / SHARD_DIR).iterdir())
    assert not (dest / INDEX_NAME).exists()
    with _one_thread():
        assert compress_main(args) == 0
    assert "5 shards written, 1 already complete" in capsys.readouterr().out
    _assert_same_dataset(dest, reference)


def test_a_run_that_fails_midway_leaves_no_temporary_file(
    tmp_path: Path, source: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards are written into temporaries as their batches land; a run that fails removes those it opened."""
    placed = []
    real = ShardFile.place

    def place(shard: ShardFile, *args: object) -> None:
        real(shard, *args)
        placed.append(shard.path.name)
        if len(set(placed)) == 2:  # the second shard has its temporary and one batch: the disk fills up
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardFile, "place", place)
    dest = tmp_path / "full"
    with _one_thread(), pytest.raises(OSError, match="No space left"):
        compress_main(_args(source, dest, model, "--workers", "0"))
    assert sorted(p.name for p in (dest / SHARD_DIR).iterdir()) == ["shard-000000.safetensors"]


def test_max_shards_stops_early_and_a_rerun_resumes(
    tmp_path: Path, source: Path, model: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "partial"
    with _one_thread():
        assert compress_main(_args(source, dest, model, "--workers", "0", "--max-shards", "2")) == EXIT_INCOMPLETE
        assert sorted(_shards(dest)) == ["shard-000000.safetensors", "shard-000001.safetensors"]
        assert not (dest / INDEX_NAME).exists()
        assert compress_main(_args(source, dest, model, "--workers", "0")) == 0
    assert "4 shards written, 2 already complete" in capsys.readouterr().out
    _assert_same_dataset(dest, reference)


def test_other_settings_into_the_same_folder_are_refused(
    tmp_path: Path, reference: Path, source: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(source, reference, model)
    args[args.index("--budget") + 1] = "12"
    before = tmp_path / "before"
    shutil.copytree(reference, before)
    assert compress_main(args) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "differing: budget" in error
    _assert_same_dataset(reference, before)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--budget", "0", "budget must be a whole number >= 1"),
        ("--shard-size", "0", "shard_size must be"),
        ("--device", "cuda:3", "--device must be cpu or cuda"),
    ],
)
def test_bad_arguments_are_clear_errors(
    tmp_path: Path, source: Path, model: Path, flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(source, tmp_path / "out", model)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert compress_main(args) == 2
    assert message in capsys.readouterr().err


def test_a_list_file_keeps_its_order_and_reports_missing_files(tmp_path: Path, source: Path, model: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"# three images\n{source / 'img03.png'}\n\nmissing.png\n{source / 'img02.png'}\n")
    assert list_sources(listing) == [
        os.fspath(source / "img03.png"),
        os.fspath(tmp_path / "missing.png"),
        os.fspath(source / "img02.png"),
    ]
    dest = tmp_path / "listed"
    assert compress_main(_args(listing, dest, model, "--workers", "0")) == 0
    index = load_index(dest)
    assert [r["status"] for r in index] == ["ok", "error", "ok"]
    assert "no such file" in index[1]["error"]
    with pytest.raises(arrcoc.InvalidInputError, match="folder of images or a list file"):
        list_sources(source / "img02.png")


def test_a_query_file_steers_every_image_and_is_part_of_the_settings(
    tmp_path: Path, source: Path, model: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    pipe = arrcoc.Pipeline.from_pretrained(model)
    query = torch.randn(3, pipe.width, generator=torch.Generator().manual_seed(3))
    save_file({"query": query}, tmp_path / "query.safetensors")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{source / 'img04.png'}\n{source / 'img08.png'}\n")
    dest = tmp_path / "steered"
    args = _args(listing, dest, model, "--workers", "0", "--query-file", os.fspath(tmp_path / "query.safetensors"))
    assert compress_main(args) == 0
    steered = pipe([os.fspath(source / "img04.png"), os.fspath(source / "img08.png")], query=query, budget=8)
    unsteered = {r["source"]: r for r in load_index(reference)}
    for i, record in enumerate(load_index(dest)):
        got = load_record(dest, record)
        rh, rw = steered.region_grid[i].tolist()
        assert (rh, rw) == (2, 2)  # the 128 px bucket: four regions to share the relevance
        torch.testing.assert_close(got["relevance"], steered.relevance[i, :rh, :rw], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got["relevance"], load_record(reference, unsteered[record["source"]])["relevance"])
    save_file({"query": -query}, tmp_path / "query.safetensors")
    assert compress_main(args) == 2
    assert "differing: query_sha256" in capsys.readouterr().err


@pytest.mark.cuda
def test_cuda_graphs_write_what_the_pipeline_returns_for_the_same_batch(
    tmp_path: Path, source: Path, model: Path
) -> None:
    from arrcoc.datasets.compress_dataset import _Decode
    from arrcoc.stages.gpu_input import valid_mask
    from arrcoc.stages.preprocess import PreprocessedBatch

    small = [p for p in list_sources(source) if Path(p).name in {f"img{i:02d}.png" for i in (1, 2, 3, 5, 6, 7)}]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(small) + "\n")
    pipe = arrcoc.Pipeline.from_pretrained(model, device="cuda")
    assert pipe.cuda_graphs
    stats = compress_dataset.compress_dataset(
        listing, tmp_path / "gpu", pipe, 8, batch_size=8, workers=2, progress=False
    )
    assert stats.complete and stats.images == 6 and stats.errors == 0
    loaded = [_Decode(list(enumerate(small)), pipe.config.buckets)[i] for i in range(6)]
    assert {item.bucket for item in loaded} == {64}  # one bucket, one batch: the same graph replay
    sizes = torch.tensor([item.content_size for item in loaded])
    batch = PreprocessedBatch(
        pixels=torch.stack([item.pixels for item in loaded]),
        valid=valid_mask(sizes, 64),
        scale=torch.tensor([item.scale for item in loaded]),
        source_size=torch.tensor([item.source_size for item in loaded]),
        content_size=sizes,
        indices=list(range(6)),
        names=small,
        bucket=64,
    )
    out = pipe(batch, budget=8)
    for i, record in enumerate(load_index(tmp_path / "gpu")):
        got = load_record(tmp_path / "gpu", record, device="cuda")
        for key in ("tokens", "positions", "mask", "weights", "prefix"):
            assert torch.equal(got[key], getattr(out, key)[i]), key


@pytest.mark.cuda
def test_torchrun_on_one_gpu_with_nccl_matches_one_process(
    tmp_path: Path, source: Path, model: Path, reference: Path
) -> None:
    import subprocess

    args = _args(source, tmp_path / "nccl", model, "--workers", "2")
    args[args.index("--device") + 1] = "cuda"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "1",
            "-m",
            "arrcoc.cli",
            "compress-dataset",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/1" in done.stdout and "complete" in done.stdout
    got, want = load_index(tmp_path / "nccl"), load_index(reference)
    assert [(r["source"], r["status"], r["shard"]) for r in got] == [
        (r["source"], r["status"], r["shard"]) for r in want
    ]


def test_compressed_dataset_serves_every_ok_record_through_a_dataloader(reference: Path) -> None:
    from arrcoc.datasets.shards import CompressedDataset

    dataset = CompressedDataset(reference)
    ok = [r for r in load_index(reference) if r["status"] == "ok"]
    assert len(dataset) == len(ok) == 24
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1, collate_fn=lambda item: item)
    for item, record in zip(loader, ok):
        assert item["record"] == record
        want = load_record(reference, record)
        assert all(torch.equal(item[key], want[key]) for key in want)


def test_cap_budget_lowers_what_exact_budgets_refuse(tmp_path: Path, source: Path, model: Path) -> None:
    """A budget above an image's real patches: an error record by default, capped with --cap-budget."""
    exact, capped = tmp_path / "exact", tmp_path / "capped"
    args = _args(source, exact, model, "--workers", "0")
    args[args.index("--budget") + 1] = "14"
    with _one_thread():
        assert compress_main(args) == 0
        args[1] = os.fspath(capped)
        assert compress_main([*args, "--cap-budget"]) == 0
    refused = [r for r in load_index(exact) if r["status"] == "error" and "budget" in r["error"]]
    assert refused, "some small images hold fewer than 14 real patches"
    ok = [r for r in load_index(capped) if r["status"] == "ok"]
    assert len(ok) == 24
    budgets = {r["source"]: int(load_record(capped, r)["budget"]) for r in ok}
    assert max(budgets.values()) == 14 and all(budgets[r["source"]] < 14 for r in refused)
    assert json.loads((capped / "manifest.json").read_text())["budget_policy"] == "cap"


def test_compile_option_reaches_the_pipeline_and_bad_choices_are_refused(
    tmp_path: Path, source: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    built: list[object] = []
    original = compress_dataset.Pipeline.from_pretrained

    def recording(*args, **kwargs):
        built.append((kwargs["compile"], kwargs.get("compile_in_background", False), kwargs["graph_batch"]))
        # the option's path, not a CPU compile
        return original(*args, **{**kwargs, "compile": False, "compile_in_background": False})

    monkeypatch.setattr(compress_dataset.Pipeline, "from_pretrained", recording)
    with _one_thread():
        assert compress_main([*_args(source, tmp_path / "out", model, "--workers", "0"), "--compile", "head"]) == 0
    assert built == [("head", False, 4)]  # compiled: every batch pads to the job's batch size
    assert "--compile head: the first batch of each bucket size compiles" in capsys.readouterr().err
    with _one_thread():
        assert compress_main([*_args(source, tmp_path / "plain", model, "--workers", "0")]) == 0
    assert "compiles" not in capsys.readouterr().err and built[-1] == (False, False, None)
    with _one_thread():  # the plain graphs at once, the head compiled on a helper thread: no wait to announce
        args = [*_args(source, tmp_path / "background", model, "--workers", "0"), "--compile", "background"]
        assert compress_main(args) == 0
    assert "compiles" not in capsys.readouterr().err and built[-1] == ("head", True, 4)
    with pytest.raises(SystemExit):
        compress_main([*_args(source, tmp_path / "bad", model), "--compile", "fast"])
    assert "--compile: invalid choice: 'fast'" in capsys.readouterr().err
    # the default, auto: the head compiled in the background once the job decides, on CUDA; plain graphs elsewhere
    options = compress_dataset.compile_options("auto", 4, torch.device("cuda"))
    assert options == {"compile": "head", "compile_in_background": "deferred", "graph_batch": 4}
    assert compress_dataset.compile_options("auto", 4, torch.device("cpu"))["compile"] is False


def test_a_job_starts_its_deferred_compile_only_with_work_enough_left(
    tmp_path: Path, source: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--compile auto``: the job decides once, ``COMPILE_PROBE_SECONDS`` in, from its rate so far."""
    from arrcoc.runtime.graphs import GraphCache

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the decision, not a CPU compile
    monkeypatch.setattr(compress_dataset, "COMPILE_PROBE_SECONDS", 0.0)
    outcomes = []
    for worth, name in ((1e9, "short"), (0.0, "long")):
        monkeypatch.setattr(compress_dataset, "COMPILE_WORTH_SECONDS", worth)
        pipe = arrcoc.Pipeline.from_pretrained(
            model, compile="head", compile_in_background="deferred", graph_cache=GraphCache(backend="eager")
        )
        with _one_thread():
            stats = compress_dataset.compress_dataset(
                source, tmp_path / name, pipe, 8, batch_size=4, workers=0, shard_size=SHARD_SIZE, progress=False
            )
        assert pipe.wait_for_compile(timeout=120) is pipe.compile_started
        outcomes.append((pipe.compile_started, stats.compile_started_at is not None))
        _assert_same_dataset(tmp_path / name, tmp_path / "short")
    assert outcomes == [(False, False), (True, True)]


def test_the_compile_starts_when_the_images_left_take_compile_worth_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    class Recorder:
        started = 0

        def start_compile(self) -> None:
            self.started += 1

    monkeypatch.setattr(compress_dataset, "COMPILE_WORTH_SECONDS", 300.0)
    stats = compress_dataset.DatasetStats(images=100)
    pipe = Recorder()
    # 100 images in 10 s: 2,999 left take 299.9 s, 3,000 take 300
    assert not compress_dataset._start_compile(pipe, stats, 10.0, 2999) and stats.compile_started_at is None
    assert compress_dataset._start_compile(pipe, stats, 10.0, 3000) and stats.compile_started_at == 10.0
    assert pipe.started == 1


def _image_rows(count: int, grid: tuple[int, int], seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` images' rows of every shard key; per-region maps on ``grid``."""
    from arrcoc.datasets.shards import ROW_KEYS

    generator = torch.Generator().manual_seed(seed)
    shapes = {"tokens": (6, 5), "prefix": (1, 5), "positions": (6, 4), "mask": (6,), "weights": (6,)}
    shapes.update(allocation=grid, relevance=grid, region_grid=(2,), patch_grid=(2,), source_size=(2,))
    rows = []
    for _ in range(count):
        row = {}
        for key in ROW_KEYS:
            shape = shapes.get(key, ())
            if key in ("tokens", "prefix", "weights", "relevance", "scale"):
                row[key] = torch.rand(shape, generator=generator).to(
                    torch.float16 if key == "tokens" else torch.float32
                )
            elif key == "mask":
                row[key] = torch.rand(shape, generator=generator) < 0.5
            else:
                row[key] = torch.randint(0, 99, shape, generator=generator)
        rows.append(row)
    return rows


def _stacked(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The shard tensors of ``rows`` stacked in order, per-region maps padded to their largest grid."""
    from arrcoc.datasets.shards import ROW_KEYS

    out = {}
    for key in ROW_KEYS:
        values = [row[key] for row in rows]
        if key in ("allocation", "relevance"):
            rh, rw = max(v.shape[0] for v in values), max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, rw - v.shape[1], 0, rh - v.shape[0])) for v in values]
        out[key] = torch.stack(values)
    return out


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


_RECORDS = [{"index": i, "source": f"image-{i}.jpg", "status": "ok"} for i in range(10)]


@pytest.mark.parametrize(
    ("batches", "in_place"),
    [
        ([[0, 3], [1, 2, 4], [7, 8, 9], [5, 6]], True),  # every image, in the order the writer hands them over
        ([[7, 2, 9], [0, 5], [3, 1, 8, 4, 6]], True),  # every image, out of order: streamed at the last batch
        ([[6, 2], [0, 3]], False),  # gaps: the images between failed, so the rows that did are gathered
        ([[1, 0], [2]], False),  # the first images only
    ],
)
def test_a_shard_file_filled_batch_by_batch_holds_the_rows_stacked_in_order(
    tmp_path: Path, batches: list[list[int]], in_place: bool
) -> None:
    """What the writer thread writes as batches land is what stacking the shard's rows at the end would give, read
    back through safetensors, whether the file was finished in place or gathered and written whole."""
    from arrcoc.datasets.shards import ROW_KEYS, ShardFile, read_shard_records

    path = tmp_path / "shard-000000.safetensors"
    shard = ShardFile(path, 10, header_room=4090)
    by_position = {}
    for number, positions in enumerate(batches):
        rows = _image_rows(len(positions), (2, 2) if number % 2 else (3, 4), seed=number)  # two buckets' grids
        shard.place(positions, {key: torch.stack([row[key] for row in rows]) for key in ROW_KEYS})
        by_position.update(zip(positions, rows))
    want = _stacked([by_position[p] for p in sorted(by_position)])
    got = shard.tensors()
    assert list(got) == list(ROW_KEYS)
    assert shard.written == min(set(range(11)) - set(by_position))
    shard.finish(_RECORDS, "run")
    assert list(tmp_path.iterdir()) == [path]  # no temporary left
    assert (_header_length(path) == 4096) == in_place  # the room kept for the header, or save_file's own
    assert read_shard_records(path) == ("run", _RECORDS)
    with safe_open(os.fspath(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(ROW_KEYS)
        for key in ROW_KEYS:
            stored = handle.get_tensor(key)
            assert stored.dtype == want[key].dtype and torch.equal(stored, want[key]), key
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize(
    ("size", "room", "why"),
    [
        (4, 64, "the header outgrew its room"),
        (3, 4096, "the streamed tensors end off the 8-byte alignment"),  # 3 x (192 + 60) bytes
    ],
)
def test_a_complete_shard_file_that_cannot_finish_in_place_is_written_whole(
    tmp_path: Path, size: int, room: int, why: str
) -> None:
    from arrcoc.datasets.shards import ROW_KEYS, ShardFile

    path = tmp_path / "shard.safetensors"
    shard = ShardFile(path, size, header_room=room)
    rows = _image_rows(size, (3, 4), seed=0)
    shard.place(list(range(size)), {key: torch.stack([row[key] for row in rows]) for key in ROW_KEYS})
    shard.finish(_RECORDS[:size], "run")
    assert _header_length(path) != -(-room // 8) * 8, why
    with safe_open(os.fspath(path), framework="pt") as handle:
        for key, value in _stacked(rows).items():
            assert torch.equal(handle.get_tensor(key), value), key
    assert list(tmp_path.iterdir()) == [path]


def test_a_discarded_shard_file_leaves_nothing(tmp_path: Path) -> None:
    from arrcoc.datasets.shards import ROW_KEYS, ShardFile

    shard = ShardFile(tmp_path / "shard.safetensors", 4, header_room=4096)
    rows = _image_rows(2, (2, 2), seed=0)
    shard.place([0, 1], {key: torch.stack([row[key] for row in rows]) for key in ROW_KEYS})
    assert len(list(tmp_path.iterdir())) == 1  # the temporary, rows 0 and 1 of the streamed tensors in it
    shard.discard()
    assert list(tmp_path.iterdir()) == [] and shard.tensors() == {}
