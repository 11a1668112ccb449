"""The ``arrcoc`` command: compress or score image files, run the demo, run the benchmark."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import PipelineConfig
from .datasets.atomic import remove_partial
from .datasets.atomic import write_atomic as _write_atomic  # a module global: tests patch it
from .datasets.sources import image_files, load_query
from .errors import ArrcocError, InvalidInputError
from .outputs import CompressionOutput, ScoreOutput
from .pipeline import Pipeline

__all__ = ["main"]

logger = logging.getLogger(__name__)


EPILOG = """examples:
  arrcoc compress photos/ --budget 128 --out out/      # out/<name>.png heat map + allocation, out/<name>.json
  arrcoc demo --out demo/                              # offline demo on a drawn street scene
"""


def _device(name: str | None) -> torch.device:
    """``--device`` as a torch device, checked: a usage error (not a traceback) when it cannot be used here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InvalidInputError(f"--device must be a torch device such as cpu or cuda; got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"--device must be cpu or cuda; got {name!r}")
    return device


def _out_folder(name: str) -> Path:
    """``--out``, created if needed; a usage error when it cannot be."""
    folder = Path(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidInputError(f"--out {name!r} cannot be used as an output folder: {err}") from err
    return folder


def _pipeline(args: argparse.Namespace) -> Pipeline:
    device = _device(args.device)
    if args.preset:
        return Pipeline(PipelineConfig.from_name(args.preset), device=device)
    return Pipeline.from_pretrained(args.pretrained, device=device)




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
    """Write ``<stem>.png`` then ``<stem>.json``, each atomically: the JSON's presence marks the pair complete."""
    from .tools.overlay import render_overlay

    picture = render_overlay(image, result, index)
    _write_atomic(out_dir / f"{stem}.png", lambda p: picture.save(p, format="PNG"))
    report = {"source": extra.pop("source"), **result.image(index), **extra}
    _write_atomic(out_dir / f"{stem}.json", lambda p: Path(p).write_text(json.dumps(report, indent=1)))


def _job_key(args: argparse.Namespace, compress: bool, query: Any) -> str:
    """A digest of everything that decides an image's outputs, so ``--resume`` never keeps a stale result."""
    digest = hashlib.sha256(repr((compress, getattr(args, "budget", None), args.preset, args.pretrained)).encode())
    if isinstance(query, torch.Tensor):
        digest.update(query.detach().cpu().contiguous().numpy().tobytes())  # ok-sync: CLI set-up
    elif query is not None:
        digest.update(repr(query).encode())
    return digest.hexdigest()[:16]


def _complete(out_dir: Path, stem: str, source: Path, key: str) -> bool:
    """Both outputs of an image exist and are valid: the JSON parses and names this source and job; the PNG decodes."""
    from PIL import Image

    picture, report = out_dir / f"{stem}.png", out_dir / f"{stem}.json"
    try:
        data = json.loads(report.read_text())
        if not isinstance(data, dict) or data.get("source") != os.fspath(source) or data.get("job") != key:
            return False
        with Image.open(picture) as image:
            image.verify()  # reads the whole file and checks its checksums
    except (OSError, ValueError, SyntaxError) as err:  # missing, truncated or corrupt
        logger.debug("%s: outputs incomplete (%s); recomputing", source, err)
        return False
    return True


class _Job:
    """Counts of a folder job: images written, skipped as complete, failed (with reasons), processed by the stages."""

    def __init__(self) -> None:
        self.written = self.skipped = self.processed = 0
        self.failed: list[tuple[Path, str]] = []

    def fail(self, path: Path, err: BaseException) -> None:
        reason = str(err) if isinstance(err, ArrcocError) else f"unexpected {type(err).__name__}: {err}"
        if not isinstance(err, ArrcocError):
            logger.debug("unexpected failure on %s", path, exc_info=err)
        self.failed.append((path, reason))


def _run_files(args: argparse.Namespace, compress: bool) -> int:
    pipe = _pipeline(args)
    query, query_mask = load_query(args)
    pipe.prepare_query(query, query_mask, 1)  # a bad query is a usage error, found before any work
    out_dir = _out_folder(args.out)
    files = image_files(args.inputs, args.recursive)
    if not files:
        raise InvalidInputError(f"no image files found in {args.inputs}")
    work = list(zip(files, _stems(files)))
    key = _job_key(args, compress, query)
    stale = remove_partial(out_dir, [f"{stem}.{suffix}" for _, stem in work for suffix in ("png", "json")])
    if stale:
        logger.warning("removed %d temporary files left by an interrupted run", stale)
    job = _Job()
    if args.resume:
        todo = [(path, stem) for path, stem in work if not _complete(out_dir, stem, path, key)]
        job.skipped = len(work) - len(todo)
        work = todo
    start = time.perf_counter()
    with tqdm(total=len(work), unit="img", disable=args.quiet, file=sys.stderr) as bar:
        for chunk in _chunks(work, args.batch_size):
            loaded = _load_chunk(chunk, job)
            bar.update(len(chunk) - len(loaded))
            for result, items in _run_batch(pipe, loaded, query, query_mask, args, compress, job):
                for i, (path, stem, image) in enumerate(items):
                    extra = {"source": os.fspath(path), "job": key, "timings_ms": result.timings, "batch_size": len(items)}
                    try:
                        _save(result, i, image, out_dir, stem, extra)
                    except OSError as err:  # a full disk or a lost mount: list it, keep going
                        job.fail(path, InvalidInputError(f"cannot write its outputs to {out_dir}/: {err}"))
                        continue
                    job.written += 1
            bar.update(len(loaded))
    seconds = time.perf_counter() - start
    total = len(work) + job.skipped
    print(f"arrcoc: wrote {job.written} of {total} images to {out_dir}/ ({job.skipped} already complete, "
          f"{len(job.failed)} failed; {job.processed} processed, {job.processed / max(seconds, 1e-9):.1f} images/s)")
    for path, reason in job.failed:
        print(f"arrcoc: failed: {os.fspath(path)}: {reason}", file=sys.stderr)
    return 1 if job.failed else 0


def _load_chunk(chunk: list[tuple[Path, str]], job: _Job) -> list[tuple[Path, str, torch.Tensor]]:
    """Load each file of a chunk; a file that cannot be read is listed with its reason and the rest go on."""
    from .stages.preprocess import load_image

    loaded = []
    for path, stem in chunk:
        try:
            loaded.append((path, stem, load_image(path, name=os.fspath(path))))
        except Exception as err:  # noqa: BLE001 - one bad file must not end the job
            job.fail(path, err)
    return loaded


def _run_batch(pipe: Pipeline, loaded: list[tuple[Path, str, torch.Tensor]], query: Any, query_mask: Any,
               args: argparse.Namespace, compress: bool, job: _Job) -> list[tuple[ScoreOutput, list]]:
    """Run a batch; if it is rejected (say a budget above one image's capacity), run its images one by one.

    A rejected call stops before the stages run, so ``job.processed`` counts each image the stages ran on once.
    """
    if not loaded:
        return []
    images = [image for _, _, image in loaded]
    try:
        if compress:
            result = pipe(images, query=query, query_mask=query_mask, budget=args.budget, profile=True)
        else:
            result = pipe.score(images, query=query, query_mask=query_mask, profile=True)
    except Exception as err:  # noqa: BLE001 - isolate the image at fault, keep the others
        if len(loaded) == 1:
            job.fail(loaded[0][0], err)
            return []
        return [group for item in loaded for group in _run_batch(pipe, [item], query, query_mask, args, compress, job)]
    job.processed += len(images)
    return [(result, loaded)]


def _demo(args: argparse.Namespace) -> int:
    from .tools.overlay import render_overlay
    from .world.samples import demo_scene

    pipe = _pipeline(args)
    scene = demo_scene()
    out_dir = _out_folder(args.out)
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
    if args.question:
        _demo_question(out_dir, pipe.device, args.question_share)
    return 0


#: The demo's question: a generated 384-pixel scene (held out from training) and its "color" question.
DEMO_QUESTION_SEED = 600_000


def _demo_question(out_dir: Path, device: torch.device, share: float) -> None:
    """Ask the shipped VLM (``weights/``) a question about a generated scene, reading all of the visual tokens
    and then ``share`` of them as arrcoc keeps them; print both answers. Skipped, with the reason, when
    transformers or the trained VLM is missing."""
    try:
        from .stages.text_query import TextQueryEncoder
        from .tools.overlay import render_token_boxes
        from .world.data import make_sample
        from .world.vlm import DEFAULT_VLM_DIR, load_vlm
        from .world.vlm_adapter import ask, pixel_values, project_adapter

        model, tokenizer = load_vlm(device=device)
        text_encoder = TextQueryEncoder.from_pretrained(DEFAULT_VLM_DIR)
    except ImportError as err:
        print(f"  question skipped: it needs transformers ({err.name}): pip install 'arrcoc[hf]'")
        return
    except ArrcocError as err:
        print(f"  question skipped: {err}")
        return
    sample = make_sample(DEMO_QUESTION_SEED, 384, "color")
    adapter = project_adapter(model, tokenizer, "arrcoc", text_encoder=text_encoder)
    pixels = pixel_values(model, [sample.image], device)
    patches = (384 // 16) ** 2
    budget = max(1, round(share * patches))
    with torch.inference_mode():
        full, _ = ask(adapter, pixels, [sample.question], patches)
        few, positions = ask(adapter, pixels, [sample.question], budget)
    assert full is not None and few is not None
    sample.image.save(out_dir / "question.png")
    kept = positions[0].cpu()  # ok-sync: reporting; (K, 4) row, col, height, width in patches
    boxes = [tuple(int(v) * 16 for v in (c, r, c + w, r + h)) for r, c, h, w in kept.tolist()]
    render_token_boxes(sample.image, boxes).save(out_dir / "question-tokens.png")
    print(f"arrcoc demo question (the shipped VLM, {sample.image.width}px scene): {sample.question!r} "
          f"(expected {sample.answer!r})")
    print(f"  all {patches} visual tokens: {full[0]!r}; arrcoc's {budget} tokens ({100 * budget / patches:.0f}%): "
          f"{few[0]!r}")
    print(f"  wrote {out_dir}/question.png, {out_dir}/question-tokens.png (the tokens read)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrcoc", description="Relevance-driven visual token compression.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        model = p.add_mutually_exclusive_group()
        model.add_argument("--preset", default=None, help="build a pipeline from a named preset (default, tiny) "
                                                          "instead of the pretrained one")
        model.add_argument("--pretrained", default=None, help="a folder saved by Pipeline.save_pretrained "
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
        p.add_argument("--resume", action="store_true", help="skip images whose outputs are already complete and "
                                                             "valid from an earlier run with the same options")
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
    demo.add_argument("--no-question", dest="question", action="store_false",
                      help="skip asking the shipped VLM a question (needs transformers)")
    demo.add_argument("--question-share", type=float, default=0.11,
                      help="share of the visual tokens arrcoc keeps for the question (default 0.11)")
    common(demo)
    for name, (_, help_text) in MODULE_COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (arrcoc {name} --help)", add_help=False)
    return parser


#: Commands that live in their own module, imported only when used (each module has ``main(argv) -> int``
#: with its own argument parser): name -> (module, one-line help).
MODULE_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("arrcoc.tools.bench", "time every stage, eager; with --graphs: CUDA graphs vs eager vs torch.compile"),
    "compress-dataset": ("arrcoc.datasets.compress_dataset", "compress a folder or list of images into sharded safetensors "
                                                    "(one process, or one per GPU under torchrun)"),
    "generate": ("arrcoc.integrations.hf", "answer a prompt about an image with a local Hugging Face VLM reading arrcoc tokens"),
    "eval": ("arrcoc.tools.evaluation", "accuracy vs token budget, per method, on the generated VQA benchmark"),
}


def _run_module_command(name: str, argv: list[str]) -> int:
    import importlib

    if name == "bench" and "--graphs" in argv:
        from .tools.bench_graphs import main as graphs_main

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
