"""The ``arrcoc`` command: compress or score image files, run the demo, run the benchmark."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arrcoc import __version__  # the package root, above every room

from .cli_help import HelpFormatter
from .datasets.atomic import remove_partial
from .datasets.atomic import write_atomic as _write_atomic  # a module global: tests patch it
from .datasets.sources import image_files, load_query
from .errors import ArrcocError, InvalidInputError

if TYPE_CHECKING:  # torch and the pipeline load when a command runs, so `arrcoc --help` answers at once
    import torch

    from .outputs import ScoreOutput
    from .pipeline import Pipeline

__all__ = ["main"]

logger = logging.getLogger(__name__)


EPILOG = """examples:
  arrcoc compress photos/ --budget 128 --out out/      # out/<name>.png heat map, out/<name>-tokens.png, out/<name>.json
  arrcoc demo --out demo/                              # offline demo on a drawn street scene
  arrcoc generate photo.jpg --prompt "What color is the circle?" --model weights/   # the shipped small VLM
"""


def _device(name: str | None) -> torch.device:
    """``--device`` as a torch device, checked: a usage error (not a traceback) when it cannot be used here."""
    import torch

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
    from .config import PipelineConfig
    from .pipeline import Pipeline

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


def _save(
    result: ScoreOutput, index: int, image: torch.Tensor, out_dir: Path, stem: str, extra: dict[str, Any]
) -> None:
    """Write ``<stem>.png`` (and for a compression ``<stem>-tokens.png``), then ``<stem>.json``, each atomically:
    the JSON's presence marks the set complete. The JSON lists the kept tokens' areas."""
    from .outputs import CompressionOutput
    from .tools.overlay import kept_tokens, render_kept_tokens, render_overlay

    picture = render_overlay(image, result, index)
    _write_atomic(out_dir / f"{stem}.png", lambda p: picture.save(p, format="PNG"))
    report = {"source": extra.pop("source"), **result.image(index), **extra}
    if isinstance(result, CompressionOutput):
        kept = render_kept_tokens(image, result, index)
        _write_atomic(out_dir / f"{stem}-tokens.png", lambda p: kept.save(p, format="PNG"))
        report["tokens"] = {
            "unit": "patches",
            "patch_pixels": result.patch_pixels(index),
            "fields": ["row", "col", "height", "width"],
            "positions": kept_tokens(result, index),
        }
    _write_atomic(out_dir / f"{stem}.json", lambda p: Path(p).write_text(json.dumps(report, indent=1)))


def _job_key(args: argparse.Namespace, compress: bool, query: Any) -> str:
    """A digest of everything that decides an image's outputs, so ``--resume`` never keeps a stale result."""
    import torch

    digest = hashlib.sha256(repr((compress, getattr(args, "budget", None), args.preset, args.pretrained)).encode())
    if isinstance(query, torch.Tensor):
        digest.update(query.detach().cpu().contiguous().numpy().tobytes())  # ok-sync: CLI set-up
    elif query is not None:
        digest.update(repr(query).encode())
    if getattr(args, "cap_budget", False):  # only when set: jobs without it keep their earlier keys
        digest.update(b"budget_policy=cap")
    return digest.hexdigest()[:16]


def _complete(out_dir: Path, stem: str, source: Path, key: str, compress: bool = False) -> bool:
    """All outputs of an image exist and are valid: the JSON parses and names this source and job; the PNGs decode."""
    from PIL import Image

    pictures = [out_dir / f"{stem}.png"] + ([out_dir / f"{stem}-tokens.png"] if compress else [])
    report = out_dir / f"{stem}.json"
    try:
        data = json.loads(report.read_text())
        if not isinstance(data, dict) or data.get("source") != os.fspath(source) or data.get("job") != key:
            return False
        for picture in pictures:
            with Image.open(picture) as image:
                image.verify()  # reads the whole file and checks its checksums
    except (OSError, ValueError, SyntaxError) as err:  # missing, truncated or corrupt
        logger.debug("%s: outputs incomplete (%s); recomputing", source, err)
        return False
    return True


def _reason(path: Path, err: BaseException) -> str:
    """Why ``path`` failed, without naming it again: the failure line names it once, in front."""
    if not isinstance(err, ArrcocError):
        return f"unexpected {type(err).__name__}: {err}"
    name = os.fspath(path)
    text = str(err).removeprefix(f"{name}: ")  # an ImageLoadError starts with the file's name
    return re.sub(rf"image \d+ \({re.escape(name)}\)", "this image", text)


class _Job:
    """Counts of a folder job: images written, skipped as complete, failed (with reasons), processed by the stages."""

    def __init__(self) -> None:
        self.written = self.skipped = self.processed = 0
        self.failed: list[tuple[Path, str]] = []

    def fail(self, path: Path, err: BaseException) -> None:
        if not isinstance(err, ArrcocError):
            logger.debug("unexpected failure on %s", path, exc_info=err)
        self.failed.append((path, _reason(path, err)))


def _report_skipped(skipped: list[Path], verbose: bool) -> None:
    """One line for the files of the folders given that are not images (by their suffix); names with --verbose."""
    if not skipped:
        return
    from .datasets.sources import IMAGE_SUFFIXES

    kinds = ", ".join(sorted(IMAGE_SUFFIXES))
    names = ": " + ", ".join(os.fspath(p) for p in skipped) if verbose else " (--verbose names them)"
    print(
        f"arrcoc: skipped {len(skipped)} file{'s' * (len(skipped) != 1)} in the folders given that are not "
        f"images by their name (images end in {kinds}){names}",
        file=sys.stderr,
    )


def _run_files(args: argparse.Namespace, compress: bool) -> int:
    from tqdm import tqdm

    query, query_mask = load_query(args)  # before the pipeline loads: an empty --query fails at once
    pipe = _pipeline(args)
    pipe.prepare_query(query, query_mask, 1)  # a bad query is a usage error, found before any work
    out_dir = _out_folder(args.out)
    skipped: list[Path] = []
    files = image_files(args.inputs, args.recursive, skipped=skipped)
    _report_skipped(skipped, args.verbose)
    if not files:
        raise InvalidInputError(f"no image files found in {args.inputs}")
    work = list(zip(files, _stems(files)))
    key = _job_key(args, compress, query)
    suffixes = ("png", "tokens.png", "json") if compress else ("png", "json")
    names = [
        f"{stem}.{suffix}" if suffix != "tokens.png" else f"{stem}-tokens.png"
        for _, stem in work
        for suffix in suffixes
    ]
    stale = remove_partial(out_dir, names)
    if stale:
        logger.warning("removed %d temporary files left by an interrupted run", stale)
    job = _Job()
    if args.resume:
        todo = [(path, stem) for path, stem in work if not _complete(out_dir, stem, path, key, compress)]
        job.skipped = len(work) - len(todo)
        work = todo
    start = time.perf_counter()
    with tqdm(total=len(work), unit="img", disable=args.quiet, file=sys.stderr) as bar:
        for chunk in _chunks(work, args.batch_size):
            loaded = _load_chunk(chunk, job)
            bar.update(len(chunk) - len(loaded))
            for result, items in _run_batch(pipe, loaded, query, query_mask, args, compress, job):
                for i, (path, stem, image) in enumerate(items):
                    extra = {
                        "source": os.fspath(path),
                        "job": key,
                        "timings_ms": result.timings,
                        "batch_size": len(items),
                    }
                    try:
                        _save(result, i, image, out_dir, stem, extra)
                    except OSError as err:  # a full disk or a lost mount: list it, keep going
                        job.fail(path, InvalidInputError(f"cannot write its outputs to {out_dir}/: {err}"))
                        continue
                    job.written += 1
            bar.update(len(loaded))
    seconds = time.perf_counter() - start
    total = len(work) + job.skipped
    print(
        f"arrcoc: wrote {job.written} of {total} images to {out_dir}/ ({job.skipped} already complete, "
        f"{len(job.failed)} failed; {job.processed} processed, {job.processed / max(seconds, 1e-9):.1f} images/s)"
    )
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


def _run_batch(
    pipe: Pipeline,
    loaded: list[tuple[Path, str, torch.Tensor]],
    query: Any,
    query_mask: Any,
    args: argparse.Namespace,
    compress: bool,
    job: _Job,
) -> list[tuple[ScoreOutput, list]]:
    """Run a batch, one pipeline call per bucket, each image named by its file; if a call is rejected (say a
    budget above one image's real patches), run its images one by one.

    A rejected call stops before the stages run, so ``job.processed`` counts each image the stages ran on once.
    """
    from dataclasses import replace

    if not loaded:
        return []
    try:
        groups = pipe.preprocessor([image for _, _, image in loaded], device=pipe.device)
    except Exception as err:  # noqa: BLE001 - isolate the image at fault, keep the others
        return _one_by_one(pipe, loaded, err, query, query_mask, args, compress, job)
    out = []
    for group in groups:
        items = [loaded[i] for i in group.indices]
        # a call of its own: its images count from 0, and messages name the file
        named = replace(group, indices=list(range(len(items))), names=[os.fspath(path) for path, _, _ in items])
        try:
            if compress:
                policy = "cap" if args.cap_budget else "exact"
                result = pipe(
                    named, query=query, query_mask=query_mask, budget=args.budget, budget_policy=policy, profile=True
                )
            else:
                result = pipe.score(named, query=query, query_mask=query_mask, profile=True)
        except Exception as err:  # noqa: BLE001 - isolate the image at fault, keep the others
            out += _one_by_one(pipe, items, err, query, query_mask, args, compress, job)
            continue
        job.processed += len(items)
        out.append((result, items))
    return out


def _one_by_one(
    pipe: Pipeline,
    items: list[tuple[Path, str, torch.Tensor]],
    err: BaseException,
    query: Any,
    query_mask: Any,
    args: argparse.Namespace,
    compress: bool,
    job: _Job,
) -> list[tuple[ScoreOutput, list]]:
    if len(items) == 1:
        job.fail(items[0][0], err)
        return []
    return [group for item in items for group in _run_batch(pipe, [item], query, query_mask, args, compress, job)]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .outputs import CompressionOutput
    from .tools.overlay import render_kept_tokens, render_overlay
    from .world.samples import demo_scene

    pipe = _pipeline(args)
    scene = demo_scene()
    out_dir = _out_folder(args.out)
    pipe(scene, budget=args.budget)  # warm-up: first use builds the bucket's encoder
    result = pipe(scene, budget=args.budget, profile=True)
    assert isinstance(result, CompressionOutput)
    scene.save(out_dir / "scene.png")
    render_overlay(scene, result).save(out_dir / "scene-overlay.png")
    render_kept_tokens(scene, result).save(out_dir / "scene-tokens.png")
    (out_dir / "scene.json").write_text(json.dumps(result.image(0), indent=1))
    gh, gw = result.patch_grid[0].tolist()  # ok-sync: reporting, after the call
    rh, rw = result.region_grid[0].tolist()  # ok-sync: reporting
    top = torch.topk(result.allocation[0, :rh, :rw].flatten(), 3)
    regions = ", ".join(f"({int(i) // rw},{int(i) % rw}): {int(v)}" for v, i in zip(top.values, top.indices))
    total = sum(result.timings.values())
    print(
        f"arrcoc demo: {args.budget} tokens kept of {gh * gw} patches ({100 * args.budget / (gh * gw):.1f}%) "
        f"for a {scene.width}x{scene.height} scene in the {result.bucket[0]}px bucket, {total:.1f} ms on {pipe.device}"
    )
    print(f"  most tokens: region (row,col): tokens -> {regions}")
    print("  stages (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    print(f"  wrote {out_dir}/scene.png, {out_dir}/scene-overlay.png, {out_dir}/scene-tokens.png, {out_dir}/scene.json")
    if args.question:
        _demo_question(out_dir, pipe.device, args.question_share)
    return 0


#: The demo's question: a generated 384-pixel scene (held out from training) and its "color" question.
DEMO_QUESTION_SEED = 600_000


def _demo_question(out_dir: Path, device: torch.device, share: float) -> None:
    """Ask the shipped VLM (``weights/``) a question about a generated scene, reading all of the visual tokens
    and then ``share`` of them as arrcoc keeps them; print both answers. Skipped, with the reason, when
    transformers or the trained VLM is missing."""
    import torch

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
    print(
        f"arrcoc demo question (the shipped VLM, {sample.image.width}px scene): {sample.question!r} "
        f"(expected {sample.answer!r})"
    )
    print(
        f"  all {patches} visual tokens: {full[0]!r}; arrcoc's {budget} tokens ({100 * budget / patches:.0f}%): "
        f"{few[0]!r}"
    )
    print(f"  wrote {out_dir}/question.png, {out_dir}/question-tokens.png (the tokens read)")


#: Side of the square picture the shipped small VLM reads (it was trained on 224- and 384-pixel scenes).
VLM_SIDE = 384


def _generate(args: argparse.Namespace, argv: list[str]) -> int:
    """``arrcoc generate``: the shipped small VLM when ``--model`` holds one (``vlm.json``), else a Hugging Face
    LLaVA folder through :func:`arrcoc.integrations.hf.main`."""
    folder = Path(args.model)
    expects = (
        "the shipped small VLM's folder (weights/, holding vlm.json, vlm.safetensors and encoder.safetensors) "
        "or a Hugging Face LLaVA folder (config.json with model_type 'llava', and its processor files)"
    )
    if not folder.is_dir():
        raise InvalidInputError(f"--model must be {expects}; {args.model!r} is not a folder")
    if (folder / "vlm.json").is_file():
        return _generate_project(args, folder)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "llava":
        raise InvalidInputError(f"--model must be {expects}; {args.model!r} holds neither")
    from .integrations.hf import main as hf_main

    try:
        return hf_main(argv)
    except OSError as err:  # transformers' message for a folder it cannot load
        raise InvalidInputError(f"--model {args.model!r} cannot be loaded as a LLaVA model: {err}") from err


def _generate_project(args: argparse.Namespace, folder: Path) -> int:
    """Answer with the project's small VLM, reading ``args.budget`` tokens that ``args.method`` keeps."""
    import torch
    from PIL import Image

    from .errors import ImageLoadError
    from .stages.text_query import TextQueryEncoder
    from .world.vlm import load_vlm
    from .world.vlm_adapter import pixel_values, project_adapter

    device = _device(args.device)
    try:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB").resize((VLM_SIDE, VLM_SIDE), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as err:
        raise ImageLoadError(f"{args.image}: cannot read the image: {err}") from err
    model, tokenizer = load_vlm(folder, device=device)
    try:
        text_encoder = TextQueryEncoder.from_pretrained(folder, device=device)
    except ArrcocError:  # a VLM saved without arrcoc's question reader: the adapter pulls the prompt back instead
        text_encoder = None
    adapter = project_adapter(model, tokenizer, args.method, text_encoder=text_encoder)
    pixels = pixel_values(model, [image], device)
    with torch.inference_mode():
        new = adapter.generate(
            pixels,
            [args.prompt],
            budget=args.budget,
            max_new_tokens=args.max_new_tokens,
            decode="graphed" if args.graphed else "hf",
            do_sample=False,
        )
    print(adapter.tokenizer.decode(new[0], skip_special_tokens=True).strip())
    return 0


def _generate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        formatter_class=HelpFormatter,
        help="answer a prompt about an image with the shipped small VLM or a local Hugging Face LLaVA reading arrcoc tokens",
        description="Answer a prompt about an image with a VLM that reads the visual tokens arrcoc keeps. --model is "
        f"the shipped small VLM's folder (weights/: the image is resized to {VLM_SIDE}x{VLM_SIDE}, the "
        "generated world it was trained on; it knows only that world's words) or a local Hugging Face "
        "LLaVA folder.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("--prompt", required=True, help="the question (put into the model's template) or a full prompt")
    p.add_argument(
        "--model",
        required=True,
        help="weights/ (the shipped small VLM) or a local LLaVA folder (LlavaForConditionalGeneration + processor)",
    )
    p.add_argument("--budget", type=int, default=64, help="visual tokens the model reads")
    p.add_argument("--method", default="arrcoc", help="reducer that keeps them (a registered name)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    p.add_argument("--device", default=None, help="cpu or cuda (None: cuda when present)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype for a LLaVA folder (auto: as saved); the shipped VLM runs in float32",
    )
    p.add_argument("--graphed", action="store_true", help="static KV cache and a CUDA-graphed decode step")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrcoc",
        description="Relevance-driven visual token compression.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"arrcoc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        model = p.add_mutually_exclusive_group()
        model.add_argument(
            "--preset",
            default=None,
            help="build a pipeline from a named preset (default, tiny) instead of the pretrained one",
        )
        model.add_argument(
            "--pretrained", default=None, help="a folder saved by Pipeline.save_pretrained (None: the shipped weights/)"
        )
        p.add_argument("--device", default=None, help="cpu or cuda (None: cuda when present)")

    def files(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
        p.add_argument("--out", required=True, help="output folder")
        query = p.add_mutually_exclusive_group()
        query.add_argument(
            "--query",
            default=None,
            help="a text query; the shipped text query encoder knows only "
            "the generated world's words (colours, shapes, sides, text)",
        )
        query.add_argument(
            "--query-embedding",
            default=None,
            help="a .safetensors file with a tensor 'query' (D,) or (L, D) [and 'query_mask'], or a .pt tensor",
        )
        p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
        p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--verbose", action="store_true", help="name each file of the folders skipped as not an image")
        p.add_argument(
            "--resume",
            action="store_true",
            help="skip images whose outputs are already complete and valid from an earlier run with the same options",
        )
        common(p)

    compress = sub.add_parser(
        "compress",
        help="compress images to a token budget; writes two PNGs and a JSON each",
        formatter_class=HelpFormatter,
        description="Compress images to a token budget. Writes OUT/<name>.png (relevance heat "
        "map with its colour bar, region grid, tokens per region), "
        "OUT/<name>-tokens.png (the kept patches themselves) and OUT/<name>.json "
        "(budget, allocation, maps, the kept tokens' positions, timings).",
    )
    compress.add_argument("--budget", type=int, required=True, help="tokens per image")
    compress.add_argument(
        "--cap-budget",
        action="store_true",
        help="cap a budget above an image's real patches at them (the JSON's budget says the budget used), instead of failing that image",
    )
    files(compress)
    score = sub.add_parser(
        "score",
        help="relevance maps only; writes a PNG and a JSON each",
        formatter_class=HelpFormatter,
        description="Relevance maps only: OUT/<name>.png (heat map and grid) and OUT/<name>.json.",
    )
    files(score)
    demo = sub.add_parser(
        "demo",
        help="offline demo on a drawn street scene",
        formatter_class=HelpFormatter,
        description="Compress a drawn street scene with the shipped pipeline; writes the overlay and the kept patches.",
    )
    demo.add_argument("--out", default="demo", help="output folder")
    demo.add_argument("--budget", type=int, default=64, help="tokens")
    demo.add_argument(
        "--no-question",
        dest="question",
        action="store_false",
        help="skip asking the shipped VLM a question (needs transformers)",
    )
    demo.add_argument(
        "--question-share", type=float, default=0.11, help="share of the visual tokens arrcoc keeps for the question"
    )
    common(demo)
    _generate_parser(sub)
    for name, (_, help_text) in MODULE_COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (arrcoc {name} --help)", add_help=False)
    return parser


#: Commands that live in their own module, imported only when used (each module has ``main(argv) -> int``
#: with its own argument parser): name -> (module, one-line help).
MODULE_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("arrcoc.tools.bench", "time every stage, eager; with --graphs: CUDA graphs vs eager vs torch.compile"),
    "compress-dataset": (
        "arrcoc.datasets.compress_dataset",
        "compress a folder or list of images into sharded safetensors (one process, or one per GPU under torchrun)",
    ),
    "eval": ("arrcoc.tools.evaluation", "accuracy vs token budget, per method, on the generated VQA benchmark"),
}


def _run_module_command(name: str, argv: list[str]) -> int:
    """Run a command that lives in its own module (imported only now), with that module's own parser."""
    import importlib

    try:
        return importlib.import_module(MODULE_COMMANDS[name][0]).main(argv)
    except SystemExit as done:  # argparse's --help and usage errors: an exit code, as the built-in commands return
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2


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
        if args.command == "generate":
            return _generate(args, argv[1:])
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
