"""Every notebook runs top to bottom on CPU in its fast mode, and its prose agrees with its committed outputs.

The notebooks are committed executed with their full settings (NB_FAST unset). Each number an experiment
produced is printed by nbcheck.quote ("[quote] name = 19.9") and written in bold in the markdown (**19.9**):
the static test below fails if the prose quotes a bold number that no executed cell printed, or leaves a
quoted value out, so a sentence cannot drift from the outputs it describes."""
import json
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BOLD_NUMBER = re.compile(r"\*\*([-+]?[0-9][0-9.,]*(?:e[-+]?[0-9]+)?)( ?%| ?x| ?s| ?MiB| ?GiB| ?M)?\*\*")
QUOTE = re.compile(r"^\[quote\] (.+?) = (.+)$", re.M)
NUMBER = re.compile(r"[-+]?[0-9][0-9.,]*(?:e[-+]?[0-9]+)?")


def prose_and_quotes(path):
    nb = json.loads(path.read_text())
    prose = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    outputs = "\n".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                        for o in c.get("outputs", []) if o.get("output_type") == "stream")
    return prose, outputs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_prose_numbers_are_the_committed_outputs(path):
    prose, outputs = prose_and_quotes(path)
    quoted = {NUMBER.match(value.strip()).group(0) for _, value in QUOTE.findall(outputs) if NUMBER.match(value.strip())}
    bold = {m.group(1) for m in BOLD_NUMBER.finditer(prose)}
    assert quoted, "the notebook quotes no number of its outputs (nbcheck.quote)"
    assert bold <= quoted, f"bold numbers in the prose that no cell quoted: {sorted(bold - quoted)}"
    assert quoted <= bold, f"quoted values the prose does not state: {sorted(quoted - bold)}"
    nb = json.loads(path.read_text())
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, "the committed notebook has an error output"
    assert all(c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()), \
        "the committed notebook is not fully executed"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_in_fast_mode(path, monkeypatch):
    """NB_FAST=1 shrinks the experiments; the claims (nbcheck.claim) and checks still run."""
    import nbclient
    import nbformat

    monkeypatch.setenv("NB_FAST", "1")
    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    print(f"{path.name}: {time.time() - t0:.0f} s in fast mode")
