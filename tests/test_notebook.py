"""The quickstart notebook runs top to bottom on the CPU, offline, without a warning, and shows what it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_runs_and_shows_overlays_and_answers() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the timeout only stops a hung cell; speed is the benchmarks' business, not a test's
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the scene's and the photograph's overlays, and the photograph's kept patches
    errors = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert errors == "", errors  # no warnings in a plain run (tqdm's "IProgress not found" was one)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "kept 64 of 576 patches" in text
    assert text.count("tokens -> ") == 3  # full, compressed, and the uniform baseline each answered
