"""The notebooks are committed executed, so that they can be read on the web without running them.
This runs each one (as `jupyter nbconvert --to notebook --execute --inplace notebooks/0*.ipynb`
refreshes them) and compares its printed text with the committed outputs: a notebook whose stored
numbers no longer follow from the code fails here. Figures are compared by count, numbers to 1%
(decimals: or one unit of their last printed digit). Cells tagged `uses-shared-data` print real MSR-VTT
statistics from ../shared, which only the developers' machines have: they are compared where it is.
Cells tagged `uses-trained-models` print what models trained in the notebook do: a seed does not
fix the CPU's rounding, which training amplifies, so on another CPU their numbers and even their
verdicts differ; of those cells only the kinds of output are compared.
"""
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SHARED_DATA = ROOT.parent / "shared" / "data" / "msrvtt"
NUMBER = re.compile(r"[-+]?\d+(?:\.(\d+))?(?:e[-+]?\d+)?")


def printed(cell):
    """A code cell's outputs as [(kind, text)]: stdout, Markdown / plain results, figures, errors."""
    out = []
    for o in cell.get("outputs", []):
        data = o.get("data", {})
        if o["output_type"] == "stream" and o["name"] == "stdout":
            out.append(("text", o["text"]))
        elif o["output_type"] == "error":
            out.append(("error", f"{o['ename']}: {o['evalue']}"))
        elif "image/png" in data:
            out.append(("figure", ""))
        elif data:
            out.append(("text", data.get("text/markdown", data.get("text/plain", ""))))
    merged = []  # consecutive texts as one: a stream may arrive in pieces
    for kind, text in out:
        if merged and kind == merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


def same_text(stored, fresh):
    """Equal words; numbers equal to 1% (decimals: or one unit of their last printed digit)."""
    if NUMBER.sub("#", stored).split() != NUMBER.sub("#", fresh).split():
        return False
    for a, b in zip(NUMBER.finditer(stored), NUMBER.finditer(fresh)):
        x, y = float(a[0]), float(b[0])
        rounding = 1.01 * 10.0 ** -len(a[1]) if a[1] else 0  # 12.35 may print 12.3 or 12.4
        if abs(x - y) > max(0.01 * max(abs(x), abs(y)), rounding):
            return False
    return True


def test_same_text_allows_rounding_and_nothing_more():
    assert same_text("CIDEr 80.3, Meta-Sum 200.0 (3 seeds)", "CIDEr  80.4, Meta-Sum 201.9 (3 seeds)")
    assert not same_text("CIDEr 80.3", "CIDEr 83.3")
    assert not same_text("DAP is ahead of Base", "DAP is behind Base")
    assert not same_text("ahead in 2 of 3 seeds", "ahead in 1 of 3 seeds")


def stale_cells(stored, fresh):
    """Indices of the code cells whose fresh outputs differ from the stored ones (see the top)."""
    stale = []
    for i, (a, b) in enumerate(zip(stored.cells, fresh.cells)):
        tags = a.metadata.get("tags", [])
        if a.cell_type != "code" or "uses-shared-data" in tags and not SHARED_DATA.is_dir():
            continue
        old, new = printed(a), printed(b)
        compare_text = "uses-trained-models" not in tags
        if [k for k, _ in old] != [k for k, _ in new] or compare_text and not all(
                same_text(x, y) for (_, x), (_, y) in zip(old, new)):
            stale.append(i)
    return stale


def test_numbers_of_trained_models_are_not_compared_and_the_rest_is():
    def notebook(trained, plain, figures=1):
        cells = [nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
            "stream", name="stdout", text=text)]) for text in (trained, plain)]
        figure = nbformat.v4.new_output("display_data", data={"image/png": ""})
        cells[0].outputs += [figure] * figures
        cells[0].metadata["tags"] = ["uses-trained-models"]
        return nbformat.v4.new_notebook(cells=cells)
    stored = notebook("Meta-Sum 300.0: DAP is ahead", "K = 500")
    assert stale_cells(stored, notebook("Meta-Sum 290.0: DAP is behind", "K = 500")) == []
    assert stale_cells(stored, notebook("Meta-Sum 300.0: DAP is ahead", "K = 400")) == [1]
    assert stale_cells(stored, notebook("Meta-Sum 300.0: DAP is ahead", "K = 500", 2)) == [0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_in_order(path):
    """Every code cell has been run, top to bottom in one session, without an error."""
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}; refresh it with jupyter nbconvert --to notebook "
        "--execute --inplace (README, Notebooks)")
    errors = [kind for c in cells for kind, _ in printed(c) if kind == "error"]
    assert not errors, f"{path.name} is stored with an error in its outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_stored_outputs_are_current(path, tmp_path):
    from nbclient import NotebookClient
    stored = nbformat.read(path, as_version=4)
    fresh = nbformat.read(path, as_version=4)
    NotebookClient(fresh, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    stale = stale_cells(stored, fresh)
    assert not stale, (
        f"{path.name}: the stored outputs of cells {stale} differ from a fresh run: refresh with "
        f"jupyter nbconvert --to notebook --execute --inplace {path.relative_to(ROOT)}")
