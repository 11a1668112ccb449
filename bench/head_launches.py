"""How many device launches each step of the relevance head issues, counted on the CPU (issue 22 item 4: in plain
CUDA graphs the head's time is about 2 µs per launch, so the count is its cost).

    python bench/head_launches.py [--out bench/results] [--label after]

The shipped pipeline and one on ``vit_base_patch16_224``, 224 px, batch 64, budget a quarter of the patches, a
4-token question (as ``bench_graphs`` times the chain). A dispatch mode counts the aten ops that make new memory or
write in place (not views) in each head step; each Triton kernel a CUDA run launches (the scorers', the region means,
the per-image normalisation, the pick's set-up, border search and greedy loop, the opponent processing, the
allocation, the packing) counts as its launches, its torch form on the CPU uncounted. Appends a section to
``head-launches-cpu.md``, headed by the commit. Run it from another checkout's folder (``PYTHONPATH=<dir>``) to count
an older head: kernels that tree lacks are counted in their torch form.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import subprocess
import sys
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from arrcoc import Pipeline
from arrcoc.config import PipelineConfig
from arrcoc.tools.bench_graphs import _case

#: aten ops that make no new memory (views, aliases): no launch.
VIEWS = {
    "view", "_unsafe_view", "expand", "permute", "slice", "select", "unsqueeze", "squeeze", "t", "transpose",
    "as_strided", "alias", "detach", "unbind", "split", "diagonal", "view_as", "lift_fresh", "_reshape_alias",
}  # fmt: skip


def _aliases(out: Any, args: Any) -> bool:
    """Whether an op's outputs are views of its inputs (``flatten`` or ``reshape`` of a contiguous tensor)."""
    inputs = {t.untyped_storage().data_ptr() for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)}
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return bool(outputs) and all(t.untyped_storage().data_ptr() in inputs for t in outputs)


class Launches(TorchDispatchMode):
    """Counts the launching aten ops, and the Triton kernels reported by :meth:`kernel`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.quiet = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.quiet and name.rstrip("_") not in VIEWS and (name.endswith("_") or not _aliases(out, args)):
            self.ops[name] += 1
        return out

    @contextlib.contextmanager
    def kernel(self, name: str, launches: int = 1) -> Iterator[None]:
        """The body runs a kernel's torch form on the CPU: count its ``launches`` instead of its ops (and instead of
        the kernels its torch form calls: a nested kernel counts nothing)."""
        self.quiet += 1
        try:
            yield
        finally:
            self.quiet -= 1
            if not self.quiet:
                self.ops[f"triton:{name}"] += launches


MODE: Launches | None = None
#: The shipped weights of this checkout (an older tree's package, run from its own folder, has none beside it).
WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def _as_kernel(module: Any, attr: str, name: str) -> None:
    """Wrap ``module.attr`` so that a call counts as one launch."""
    fn = getattr(module, attr)

    def counted(*args: Any, **kwargs: Any) -> Any:
        if MODE is None:
            return fn(*args, **kwargs)
        with MODE.kernel(name):
            return fn(*args, **kwargs)

    setattr(module, attr, counted)


def _launch_as_torch_form(
    kernel: str, switch: tuple[Any, str], check: tuple[Any, str], torch_form: Any, label: str
) -> None:
    """Make ``arrcoc.stages.<kernel>.launch`` run ``torch_form`` with the kernel's switch off, counted as one launch,
    and the check that picks the kernel answer by the switch (on the CPU too)."""
    _kernels_as_torch_forms(kernel, switch, check, {"launch": (torch_form, label, 1)})


def _kernels_as_torch_forms(
    kernel: str, switch: tuple[Any, str], check: tuple[Any, str], forms: dict[str, tuple[Any, str, int]]
) -> None:
    """Make each ``arrcoc.stages.<kernel>.<name>`` of ``forms`` (name -> torch form, label, launches) run its torch
    form with the kernel's switch off, counted as its launches, and the check that picks the kernel answer by the
    switch (on the CPU too)."""
    module, flag = switch

    def counted(torch_form: Any, label: str, launches: int) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            setattr(module, flag, False)
            try:
                if MODE is None:
                    return torch_form(*args, **kwargs)
                with MODE.kernel(label, launches):
                    return torch_form(*args, **kwargs)
            finally:
                setattr(module, flag, True)

        return call

    stand_in = sys.modules.get(f"arrcoc.stages.{kernel}")  # two switches may share a kernel module
    if not isinstance(stand_in, types.SimpleNamespace):
        stand_in = sys.modules[f"arrcoc.stages.{kernel}"] = types.SimpleNamespace()
    for name, form in forms.items():
        setattr(stand_in, name, counted(*form))
    setattr(check[0], check[1], lambda *args, **kwargs: getattr(module, flag))


def _method_as_kernel(cls: Any, method: str, label: str) -> None:
    """Count ``cls.method`` (its torch form) as one launch."""
    torch_form = getattr(cls, method)

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if MODE is None:
            return torch_form(self, *args, **kwargs)
        with MODE.kernel(label):
            return torch_form(self, *args, **kwargs)

    setattr(cls, method, counted)


def _balance_outputs(scores, query_mask, patch_valid, side, budget, similarity, covered, knobs, log_t):  # type: ignore[no-untyped-def]
    """What ``_balance_triton.launch`` returns, as zeros of its shapes: ``Balance.forward`` runs its real torch
    preamble and wrapping around it; the counts depend on shapes only, so the later steps count the same."""
    b, _, r = scores.shape
    return torch.zeros(b, r), torch.zeros(b, 3), torch.zeros(b, 5), torch.zeros(b, r)


def _frame_as_launched(frame: Any) -> Any:
    """``frame_patches`` called as its kernel's launch is: with the colour and the chroma bound, or (a tree before
    the kernel read the colour) a colourless mask in place of the colour."""

    def call(flat, patch_valid, colour, solid, touched, chroma=None):  # type: ignore[no-untyped-def]
        if chroma is not None:
            return frame(flat, patch_valid, colour, solid, touched, chroma)
        colourless, colour = colour, None
        if colourless is not None:  # a chroma of 0 where colourless, 1 elsewhere
            colour = torch.zeros(*flat.shape, 3)
            colour[..., 1] = (~colourless).float()
        return frame(flat, patch_valid, colour, solid, touched)

    return call


def _patch_kernels() -> list[str]:
    """Count the head's Triton kernels as CUDA would launch them; returns those this tree has."""
    found = ["greedy_maxmin"]
    balance = importlib.import_module("arrcoc.stages.balance")
    _as_kernel(balance, "greedy_maxmin", "greedy_maxmin")
    regions = importlib.import_module("arrcoc.stages.regions")
    if hasattr(regions, "_uses_kernel"):
        torch_form = regions.normalize_per_image
        _launch_as_torch_form(
            "_normalize_triton", (regions, "USE_KERNEL"), (regions, "_uses_kernel"),
            lambda flat, mask, block=None: torch_form(flat, mask), "normalize_per_image",
        )  # fmt: skip
        found.append("normalize_per_image")
    if hasattr(balance, "_frame_kernel"):
        _launch_as_torch_form(
            "_frame_triton", (balance, "FRAME_KERNEL"), (balance, "_frame_kernel"),
            _frame_as_launched(balance.frame_patches), "frame_patches",
        )  # fmt: skip
        found.append("frame_patches")
    if hasattr(balance, "_balance_kernel"):
        _launch_as_torch_form(
            "_balance_triton", (balance, "BALANCE_KERNEL"), (balance, "_balance_kernel"), _balance_outputs, "balance"
        )
        found.append("balance")
    scorers = importlib.import_module("arrcoc.stages.scorers")
    if hasattr(scorers, "_uses_kernel"):

        def propositional(texture, features, patch_valid, side, term_weights, block=None):  # type: ignore[no-untyped-def]
            scorer = scorers.PropositionalScorer(side)
            scorer.term_weights = term_weights
            return scorer(features, texture, patch_valid, None, None)

        _kernels_as_torch_forms(
            "_region_stats_triton", (scorers, "USE_KERNEL"), (scorers, "_uses_kernel"),
            {"propositional": (propositional, "propositional", 2)},
        )  # fmt: skip
        found.append("propositional (2)")

        def perspectival(texture, features, patch_valid, side, surround, term_weights, **blocks):  # type: ignore[no-untyped-def]
            scorer = scorers.PerspectivalScorer(side, surround)
            scorer.term_weights = term_weights
            return scorer(features, texture, patch_valid, None, None)

        _kernels_as_torch_forms(
            "_perspectival_triton", (scorers, "USE_KERNEL"), (scorers, "_uses_kernel"),
            {"launch": (perspectival, "perspectival", 3)},
        )  # fmt: skip
        found.append("perspectival (3)")
    if hasattr(scorers, "_couples_in_kernel"):

        def coupling(unit, query, query_mask, *blocks):  # type: ignore[no-untyped-def]
            return scorers.query_coupling(unit[:, :, None], query, query_mask, unit).flatten(1)

        def peak(coupling, patch_valid, query_mask, side, *blocks):  # type: ignore[no-untyped-def]
            return scorers.ParticipatoryScorer(side).from_coupling(coupling, patch_valid, query_mask)

        _kernels_as_torch_forms(
            "_participatory_triton", (scorers, "USE_KERNEL"), (scorers, "_couples_in_kernel"),
            {"coupling": (coupling, "coupling", 1), "peak": (peak, "participatory_peak", 1)},
        )  # fmt: skip
        found.append("coupling, participatory_peak")
    if hasattr(balance, "_similarity_kernel"):
        units = balance.region_units
        _kernels_as_torch_forms(
            "_region_stats_triton", (balance, "SIMILARITY_KERNEL"), (balance, "_similarity_kernel"),
            {"region_units": (lambda features, valid, side, block=None: units(features, valid, side), "region_units", 1)},
        )  # fmt: skip
        found.append("region_units")
    if hasattr(balance, "_pick_setup_kernel"):
        maxmin_inputs = balance._maxmin_inputs
        # with tiers (the shipped pick keeps a border last), a tree with extent_kernel launches it first
        setup = importlib.util.find_spec("arrcoc.stages._pick_setup_triton")  # not imported: a stand-in replaces it
        launches = 2 if setup and setup.origin and "def extent_kernel" in Path(setup.origin).read_text() else 1
        _kernels_as_torch_forms(
            "_pick_setup_triton", (balance, "PICK_SETUP_KERNEL"), (balance, "_pick_setup_kernel"),
            {"launch": (lambda gram, valid, lab, share, weight, priority, frame, blocks=None: maxmin_inputs(
                gram, valid, lab, share, None, weight, priority, frame), "pick_setup", launches)},
        )  # fmt: skip
        found.append(f"pick_setup ({launches})")
    allocation = importlib.import_module("arrcoc.stages.allocation")
    if hasattr(allocation, "_uses_kernel"):
        allocation._uses_kernel = lambda relevance: False
        _method_as_kernel(allocation.Allocator, "forward", "allocate")
        found.append("allocate")
    compression = importlib.import_module("arrcoc.stages.compression")
    if hasattr(compression, "_uses_kernel"):
        compress = compression.compress
        _launch_as_torch_form(
            "_compress_triton", (compression, "USE_KERNEL"), (compression, "_uses_kernel"), compress, "compress"
        )
        found.append("compress")
    return found


def count(encoder: str | None) -> dict[str, Counter[str]]:
    """Launches per head step for the shipped pipeline (``encoder=None``) or the default preset on ``encoder``."""
    global MODE
    torch.manual_seed(0)
    pipe = (
        Pipeline(PipelineConfig.from_name("default", encoder=encoder), device="cpu")
        if encoder
        else Pipeline.from_pretrained(WEIGHTS, device="cpu")
    )
    stages, inputs, _ = _case(pipe, 224, 64)
    state, out = dict(inputs), {}
    with torch.inference_mode():
        for name, fn in stages:
            if name != "encode":
                MODE = Launches()
                with MODE:
                    state.update(fn(state))
                out[name] = MODE.ops
                MODE = None
            else:
                state.update(fn(state))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--label", default="", help="the section's name (default: the commit)")
    args = parser.parse_args()
    kernels = _patch_kernels()
    here = Path(importlib.import_module("arrcoc").__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines = [f"## {args.label or commit} (torch {torch.__version__}; Triton kernels counted: {', '.join(kernels)})", ""]
    lines += [
        "| encoder | score | balance | allocate | compress | head | most frequent |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, encoder in (("shipped", None), ("vit_base_patch16_224", "vit_base_patch16_224")):
        steps = count(encoder)
        total = sum((c for c in steps.values()), Counter())
        top = ", ".join(f"{k} {v}" for k, v in total.most_common(6))
        cells = " | ".join(str(sum(steps[s].values())) for s in ("score", "balance", "allocate", "compress"))
        lines.append(f"| {label} | {cells} | {sum(total.values())} | {top} |")
    out = Path(args.out) / "head-launches-cpu.md"
    head = (
        ""
        if out.exists()
        else (
            "# The relevance head's device launches at 224 px, batch 64 (CPU count)\n\n"
            "`python bench/head_launches.py`: see its docstring. Counts, the same in every run.\n\n"
        )
    )
    with out.open("a") as f:
        f.write(head + "\n".join(lines) + "\n\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
