"""Prose that cannot drift from the outputs: the helpers every notebook uses for the numbers its text quotes.

- `FAST`: True when the suite runs the notebook (NB_FAST=1, small experiments); the committed notebooks hold
  the outputs of a full run (FAST False).
- `quote(name, value, fmt)`: prints "[quote] name = <value formatted>". The markdown writes every number an
  experiment produced in bold, exactly as quoted (**19.9**); tests/test_notebooks.py checks, on the committed
  full-run outputs, that every bold number of the prose is a quoted value and every quoted value is in the prose.
- `claim(text, condition)`: a sentence of the prose that must hold in fast and full runs alike ("the spread
  falls with E"); raises AssertionError naming it otherwise.
- `consistency(text, a, b)`: a labelled consistency check (the same quantity computed twice by two routes
  of OUR code), kept apart from the checks against autograd, closed forms or the official rule.
"""
import os

import numpy as np

FAST = os.environ.get("NB_FAST") == "1"


def quote(name, value, fmt="{:.3g}"):
    if " = " in name:  # the test reads "[quote] name = value" up to the first " = "
        raise ValueError(f"a quote name cannot contain ' = ': {name!r}")
    text = fmt.format(value)
    print(f"[quote] {name} = {text}")
    return text


def claim(text, condition):
    if not bool(condition):
        raise AssertionError(f"the prose says: {text!r}, and this run contradicts it")
    print(f"[claim holds] {text}")


def consistency(text, a, b, rtol=1e-6, atol=1e-9):
    ok = np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=atol)
    if not ok:
        raise AssertionError(f"consistency check failed: {text}")
    print(f"[consistency check, not a proof] {text}")
