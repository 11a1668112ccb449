"""greedy_maxmin: the Triton kernel against the torch loop, bit for bit.

On CPU the kernel runs in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton
is imported); the cases are small because the interpreter runs each reduction in Python. The ``cuda`` tests run
the compiled kernel, inside a CUDA graph and under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from arrcoc.stages import greedy_pick
from arrcoc.stages.balance import pick_patches
from arrcoc.stages.greedy_pick import greedy_maxmin, greedy_maxmin_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_OP = hasattr(torch.library, "custom_op")

#: name -> (images, patches, steps, kind, chunk): each case's inputs come from :func:`_inputs`.
CASES: dict[str, tuple[int, int, int, str, int | None]] = {
    "ties-padding": (3, 37, 30, "ties", None),
    "budgets-0-1-N": (4, 21, 21, "budgets", None),
    "one-image": (1, 50, 12, "ties", None),
    "all-equal": (2, 19, 19, "equal", None),
    "cosine": (2, 49, 20, "cosine", None),
    "grid-196": (1, 196, 8, "cosine", None),
    "one-patch": (2, 1, 3, "budgets", None),
    "live-gaps": (3, 23, 16, "gaps", None),
    "repeat-picks": (2, 13, 10, "diagonal", None),
    "nan": (3, 17, 10, "nan", None),
    "chunked": (2, 37, 24, "ties", 16),
    "chunked-exact": (2, 32, 32, "budgets", 16),
    "chunked-nan": (3, 17, 10, "nan", 8),
}


def _inputs(images: int, n: int, steps: int, kind: str, seed: int = 0, device: str = "cpu") -> tuple:
    """``(weighted, score, live)`` as ``pick_patches`` builds them: ``-inf`` on padding and on the diagonal."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(images, n, generator=g) > 0.25  # (B, N)
    valid[:, 0] = True
    if kind == "cosine":
        unit = torch.nn.functional.normalize(torch.randn(images, n, 8, generator=g), dim=-1)
        distance = 1 - unit @ unit.transpose(1, 2)  # (B, N, N)
        score = distance.masked_fill(~valid[:, None, :], torch.inf).amin(-1)  # (B, N) no tie in general
    elif kind == "equal":
        distance = torch.ones(images, n, n)
        score = torch.ones(images, n)
    else:  # coarse values: many ties
        distance = (torch.rand(images, n, n, generator=g) * 4).round() / 4
        score = (torch.rand(images, n, generator=g) * 4).round() / 4
    others = valid[:, None, :] & ~torch.eye(n, dtype=torch.bool)  # [b, p, q]: q not p
    if kind == "diagonal":  # a kept patch stays pickable: the loop counts it twice
        others = valid[:, None, :].expand(-1, n, -1)
    weighted = distance.masked_fill(~others, -torch.inf)  # (B, N, N)
    score = torch.where(valid, score, -torch.inf)  # (B, N)
    if kind == "nan":
        weighted[0, :, n // 2] = torch.nan  # the first pick's row brings a NaN: later steps keep nothing
        score[1, n // 3] = torch.nan  # a NaN score: nothing is kept
        weighted[2, 3, 5] = torch.nan  # maybe read
    budget = torch.randint(0, steps + 1, (images,), generator=g)
    if kind == "budgets":
        budget = torch.tensor([0, 1, steps, steps // 2])[:images]
    live = budget[:, None] > torch.arange(steps)  # (B, steps)
    if kind == "gaps":
        live = torch.rand(images, steps, generator=g) > 0.4  # steps need not be a prefix
    return weighted.to(device), score.to(device), live.to(device)


def _interpret_all() -> dict[str, dict]:
    """Every case through the interpreted kernel; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _greedy_pick_triton

    out = {}
    for name, (images, n, steps, kind, chunk) in CASES.items():
        weighted, score, live = _inputs(images, n, steps, kind)
        got = _greedy_pick_triton.launch(weighted, score, live, chunk=chunk)
        want = greedy_maxmin_reference(weighted, score, live)
        out[name] = {"equal": torch.equal(got, want), "kept": want.sum().item(), "got": got.sum().item()}
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_equals_the_loop(interpreted: dict[str, dict], name: str) -> None:
    assert interpreted[name]["equal"], interpreted[name]


def test_the_cases_keep_what_they_should() -> None:
    """The inputs exercise what they are named for: budgets 0 / 1 / N, repeats, NaN stopping the picks."""
    w, s, live = _inputs(4, 21, 21, "budgets")
    kept = greedy_maxmin_reference(w, s, live).sum(-1)
    valid = (s > -torch.inf).sum(-1)
    assert kept.tolist() == [0, 1, valid[2].item(), min(10, valid[3].item())]
    w, s, live = _inputs(2, 13, 10, "diagonal")
    assert greedy_maxmin_reference(w, s, live).max() > 1
    w, s, live = _inputs(3, 17, 10, "nan")
    assert greedy_maxmin_reference(w, s, live)[1].sum() == 0


def test_cpu_uses_the_loop() -> None:
    w, s, live = _inputs(3, 37, 40, "ties")
    assert torch.equal(greedy_maxmin(w, s, live), greedy_maxmin_reference(w, s, live))


@pytest.mark.skipif(not HAS_OP, reason="torch.library.custom_op needs torch >= 2.4")
def test_the_op_is_registered_and_consistent() -> None:
    w, s, live = _inputs(2, 13, 8, "ties")
    assert torch.equal(torch.ops.arrcoc.greedy_maxmin(w, s, live), greedy_maxmin_reference(w, s, live))
    torch.library.opcheck(torch.ops.arrcoc.greedy_maxmin.default, (w, s, live))


def _graph_of(fn, *args) -> list[str]:
    """The targets of the one FX graph ``torch.compile(fn, fullgraph=True)`` makes of ``fn(*args)``."""
    targets: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return targets


@pytest.mark.skipif(not HAS_OP, reason="torch.library.custom_op needs torch >= 2.4")
def test_the_op_is_one_call_under_compile() -> None:
    w, s, live = _inputs(2, 13, 8, "ties")
    targets = _graph_of(torch.ops.arrcoc.greedy_maxmin, w, s, live)
    assert [t.removesuffix(".default") for t in targets] == ["arrcoc.greedy_maxmin"], targets


# --- the GPU -----------------------------------------------------------------------------------------------------


def _cuda_inputs(images: int, n: int, steps: int, kind: str, seed: int = 0) -> tuple:
    return _inputs(images, n, steps, kind, seed=seed, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "images, n, steps, kind",
    [(64, 196, 64, "cosine"), (8, 576, 144, "cosine"), (4, 1024, 256, "ties"), (3, 37, 40, "ties")]
    + [(2, 4096, 64, "cosine"), (1, 8200, 32, "cosine")]  # the widest block; the chunked path
    + [(name_args[0], name_args[1], name_args[2], name_args[3]) for name_args in CASES.values()],
)
def test_kernel_equals_the_loop_on_cuda(images: int, n: int, steps: int, kind: str) -> None:
    w, s, live = _cuda_inputs(images, n, steps, kind)
    assert torch.equal(greedy_maxmin(w, s, live), greedy_maxmin_reference(w, s, live))


@pytest.mark.cuda
def test_kernel_output_needs_no_gradient() -> None:
    w, s, live = _cuda_inputs(2, 37, 10, "cosine")
    w.requires_grad_(True)
    out = greedy_maxmin(w * 2, s, live)
    assert not out.requires_grad and out.grad_fn is None
    assert not greedy_maxmin_reference(w * 2, s, live).requires_grad


@pytest.mark.cuda
@pytest.mark.parametrize("chunk", [64, 256])
def test_chunked_kernel_equals_the_loop_on_cuda(chunk: int) -> None:
    from arrcoc.stages import _greedy_pick_triton

    w, s, live = _cuda_inputs(4, 576, 100, "cosine")
    got = _greedy_pick_triton.launch(w, s, live, chunk=chunk)
    assert torch.equal(got, greedy_maxmin_reference(w, s, live))


@pytest.mark.cuda
def test_pick_patches_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(16, 14, 14, 32, generator=g).cuda()
    valid = torch.ones(16, 14, 14, device="cuda")
    valid[:4, :, 10:] = 0  # letterboxed images
    colour = torch.rand(16, 14, 14, 3, generator=g).cuda()
    budget = torch.randint(0, 64, (16,), generator=g).cuda()
    kw = dict(colour=colour, colour_share=0.5)
    with_kernel = pick_patches("maxmin", features, valid, budget, 64, **kw)
    monkeypatch.setattr(greedy_pick, "USE_KERNEL", False)
    assert torch.equal(with_kernel, pick_patches("maxmin", features, valid, budget, 64, **kw))


@pytest.mark.cuda
def test_kernel_replays_in_a_cuda_graph() -> None:
    w, s, live = _cuda_inputs(8, 196, 64, "cosine", seed=2)
    static = [t.clone() for t in (w, s, live)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        greedy_maxmin(*static)  # Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = greedy_maxmin(*static)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in (3, 4):
        new = _cuda_inputs(8, 196, 64, "cosine" if seed == 3 else "ties", seed=seed)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, greedy_maxmin_reference(*new))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_OP, reason="torch.library.custom_op needs torch >= 2.4")
def test_kernel_is_one_op_under_compile_on_cuda() -> None:
    w, s, live = _cuda_inputs(8, 196, 64, "cosine")
    torch.library.opcheck(torch.ops.arrcoc.greedy_maxmin.default, (w, s, live))
    targets = _graph_of(greedy_maxmin, w, s, live)
    # greedy_maxmin detaches its inputs (the picks carry no gradient): views that launch no kernel
    kernels = [
        t.removesuffix(".default") for t in targets if t.removesuffix(".default") not in ("detach", "aten.detach")
    ]
    assert kernels == ["arrcoc.greedy_maxmin"], targets
    torch._dynamo.reset()
    for mode in ("default", "reduce-overhead"):
        compiled = torch.compile(greedy_maxmin, fullgraph=True, mode=mode)
        for seed in (5, 6, 7):
            args = _cuda_inputs(8, 196, 64, "cosine", seed=seed)
            assert torch.equal(compiled(*args), greedy_maxmin_reference(*args))


if __name__ == "__main__":  # the interpreter run behind `interpreted`: prints one JSON line
    print(json.dumps(_interpret_all()))
