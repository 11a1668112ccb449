"""The ``arrcoc`` command: compress or score image files, run the demo, run the benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import PipelineConfig
from .errors import ArrcocError, InvalidInputError
from .outputs import CompressionOutput, ScoreOutput
from .pipeline import Pipeline

__all__ = ["main"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jp2"}

EPILOG = """examples:
  arrcoc compress photos/ --budget 128 --out out/      # out/<name>.png heat map + allocation, out/<name>.json
  arrcoc demo --out demo/                              # offline demo on a drawn street scene
"""


def _pipeline(args: argparse.Namespace) -> Pipeline:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.preset:
        return Pipeline(PipelineConfig.from_name(args.preset), device=device)
    return Pipeline.from_pretrained(args.pretrained, device=device)


def _load_query(args: argparse.Namespace) -> tuple[Any, torch.Tensor | None]:
    if getattr(args, "query_embedding", None):
        path = Path(args.query_embedding)
        if not path.is_file():
            raise InvalidInputError(f"--query-embedding {os.fspath(path)!r}: no such file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
            if "query" not in tensors:
                raise InvalidInputError(f"--query-embedding {os.fspath(path)!r} holds no tensor named 'query'")
            return tensors["query"], tensors.get("query_mask")
        return torch.load(path, map_location="cpu", weights_only=True), None
    return getattr(args, "query", None), None


def _image_files(inputs: list[str], recursive: bool) -> list[Path]:
    """Files named, and image files inside folders named (sorted); missing paths are kept to be reported."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            files.extend(sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files


def _write_atomic(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written outputs."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _stems(files: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for path in files:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        out.append(path.stem if count == 0 else f"{path.stem}-{count}")
    return out


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _save(result: ScoreOutput, index: int, image: torch.Tensor, out_dir: Path, stem: str, extra: dict[str, Any]) -> None:
    from .overlay import render_overlay

    picture = render_overlay(image, result, index)
    _write_atomic(out_dir / f"{stem}.png", lambda p: picture.save(p, format="PNG"))
    report = {"source": extra.pop("source"), **result.image(index), **extra}
    _write_atomic(out_dir / f"{stem}.json", lambda p: Path(p).write_text(json.dumps(report, indent=1)))


def _run_files(args: argparse.Namespace, compress: bool) -> int:
    from .preprocess import load_image

    pipe = _pipeline(args)
    query, query_mask = _load_query(args)
    pipe.prepare_query(query, query_mask, 1)  # a bad query is a usage error, found before any work
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _image_files(args.inputs, args.recursive)
    if not files:
        raise InvalidInputError(f"no image files found in {args.inputs}")
    work = list(zip(files, _stems(files)))
    failed: list[tuple[Path, str]] = []
    written = 0
    start = time.perf_counter()
    with tqdm(total=len(work), unit="img", disable=args.quiet, file=sys.stderr) as bar:
        for chunk in _chunks(work, args.batch_size):
            loaded = []
            for path, stem in chunk:
                try:
                    loaded.append((path, stem, load_image(path, name=os.fspath(path))))
                except ArrcocError as err:
                    failed.append((path, str(err)))
                    bar.update(1)
            for group in _run_batch(pipe, loaded, query, query_mask, args, compress, failed):
                result, items = group
                for i, (path, stem, image) in enumerate(items):
                    extra = {"source": os.fspath(path), "timings_ms": result.timings, "batch_size": len(items)}
                    _save(result, i, image, out_dir, stem, extra)
                    written += 1
                bar.update(len(items))
    seconds = time.perf_counter() - start
    print(f"arrcoc: wrote {written} of {len(work)} images to {out_dir}/ ({len(failed)} failed, "
          f"{written / max(seconds, 1e-9):.1f} images/s)")
    for path, reason in failed:
        print(f"arrcoc: failed: {os.fspath(path)}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _run_batch(pipe: Pipeline, loaded: list[tuple[Path, str, torch.Tensor]], query: Any, query_mask: Any,
               args: argparse.Namespace, compress: bool, failed: list[tuple[Path, str]]) -> list[tuple[ScoreOutput, list]]:
    """Run a batch; if it is rejected (say a budget above one image's capacity), run its images one by one."""
    if not loaded:
        return []
    images = [image for _, _, image in loaded]

    def run(batch: list[torch.Tensor]) -> ScoreOutput:
        if compress:
            return pipe(batch, query=query, query_mask=query_mask, budget=args.budget, profile=True)
        return pipe.score(batch, query=query, query_mask=query_mask, profile=True)

    try:
        return [(run(images), loaded)]
    except ArrcocError:
        if len(loaded) == 1:
            path, _, _ = loaded[0]
            failed.append((path, str(sys.exc_info()[1])))
            return []
    groups = []
    for item in loaded:
        groups.extend(_run_batch(pipe, [item], query, query_mask, args, compress, failed))
    return groups


def _demo(args: argparse.Namespace) -> int:
    from .overlay import render_overlay
    from .samples import demo_scene

    pipe = _pipeline(args)
    scene = demo_scene()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe(scene, budget=args.budget)  # warm-up: first use builds the bucket's encoder
    result = pipe(scene, budget=args.budget, profile=True)
    assert isinstance(result, CompressionOutput)
    scene.save(out_dir / "scene.png")
    render_overlay(scene, result).save(out_dir / "scene-overlay.png")
    (out_dir / "scene.json").write_text(json.dumps(result.image(0), indent=1))
    gh, gw = result.patch_grid[0].tolist()  # ok-sync: reporting, after the call
    rh, rw = result.region_grid[0].tolist()  # ok-sync: reporting
    top = torch.topk(result.allocation[0, :rh, :rw].flatten(), 3)
    regions = ", ".join(f"({int(i) // rw},{int(i) % rw}): {int(v)}" for v, i in zip(top.values, top.indices))
    total = sum(result.timings.values())
    print(f"arrcoc demo: {args.budget} tokens kept of {gh * gw} patches ({100 * args.budget / (gh * gw):.1f}%) "
          f"for a {scene.width}x{scene.height} scene in the {result.bucket[0]}px bucket, {total:.1f} ms on {pipe.device}")
    print(f"  most tokens: region (row,col): tokens -> {regions}")
    print("  stages (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    print(f"  wrote {out_dir}/scene.png, {out_dir}/scene-overlay.png, {out_dir}/scene.json")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrcoc", description="Relevance-driven visual token compression.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default=None, help="build a pipeline from a named preset (default, tiny) instead "
                                                      "of the pretrained one")
        p.add_argument("--pretrained", default=None, help="a folder saved by Pipeline.save_pretrained "
                                                          "(default: the embedded default)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")

    def files(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
        p.add_argument("--out", required=True, help="output folder")
        query = p.add_mutually_exclusive_group()
        query.add_argument("--query", default=None, help="a text query (needs a trained text encoder)")
        query.add_argument("--query-embedding", default=None, help="a .safetensors file with a tensor 'query' "
                                                                   "(D,) or (L, D) [and 'query_mask'], or a .pt tensor")
        p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
        p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        common(p)

    compress = sub.add_parser("compress", help="compress images to a token budget; writes a PNG and a JSON each",
                              description="Compress images to a token budget. Writes OUT/<name>.png (relevance heat map, "
                                          "region grid, tokens per region) and OUT/<name>.json (budget, allocation, maps, timings).")
    compress.add_argument("--budget", type=int, required=True, help="tokens per image")
    files(compress)
    score = sub.add_parser("score", help="relevance maps only; writes a PNG and a JSON each",
                           description="Relevance maps only: OUT/<name>.png (heat map and grid) and OUT/<name>.json.")
    files(score)
    demo = sub.add_parser("demo", help="offline demo on a drawn street scene",
                          description="Compress a drawn street scene with the embedded default; writes the overlay.")
    demo.add_argument("--out", default="demo", help="output folder (default demo/)")
    demo.add_argument("--budget", type=int, default=64, help="tokens (default 64)")
    common(demo)
    for name, (_, help_text) in MODULE_COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (arrcoc {name} --help)", add_help=False)
    return parser


#: Commands that live in their own module, imported only when used (each module has ``main(argv) -> int``
#: with its own argument parser): name -> (module, one-line help).
MODULE_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("arrcoc.bench", "time every stage, eager; with --graphs: CUDA graphs vs eager vs torch.compile"),
    "compress-dataset": ("arrcoc.compress_dataset", "compress a folder or list of images into sharded safetensors "
                                                    "(one process, or one per GPU under torchrun)"),
    "generate": ("arrcoc.hf", "answer a prompt about an image with a local Hugging Face VLM reading arrcoc tokens"),
    "eval": ("arrcoc.evaluation", "accuracy vs token budget, per method, on the generated VQA benchmark"),
}


def _run_module_command(name: str, argv: list[str]) -> int:
    import importlib

    if name == "bench" and "--graphs" in argv:
        from .bench_graphs import main as graphs_main

        return graphs_main([a for a in argv if a != "--graphs"])
    module = importlib.import_module(MODULE_COMMANDS[name][0])
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``arrcoc`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in MODULE_COMMANDS:
        return _run_module_command(argv[0], argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "compress" and args.budget < 1:
            raise InvalidInputError(f"--budget must be at least 1; got {args.budget}")
        if getattr(args, "batch_size", 1) < 1:
            raise InvalidInputError(f"--batch-size must be at least 1; got {args.batch_size}")
        return _run_files(args, compress=args.command == "compress")
    except ArrcocError as err:
        print(f"arrcoc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
