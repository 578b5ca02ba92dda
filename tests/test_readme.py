"""README.md's Python snippets run exactly as printed, and what they claim holds.

The ```python blocks run in order in one namespace, as a reader following the README would run
them (a block may use what an earlier block defined), in a temporary folder. A comment line
``#   == EXPR`` under ``name = ...`` claims that ``name`` equals ``EXPR``: it is evaluated and
compared. The budget is a minute on a 2-core CPU; heavy work does not belong in a snippet.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"

#: Seconds all snippets may take together (generous: the target is 60 s on a 2-core CPU).
BUDGET_S = 120


def python_blocks(text: str):
    """``[(first line number, code), ...]`` of the ```python blocks of ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S)]


def claims(code: str):
    """``[(name, expression), ...]``: each ``#   == EXPR`` comment and the name assigned on the
    code line above it."""
    out = []
    lines = code.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*==\s*(.+)$", line)
        if m and i > 0:
            lhs = re.match(r"\s*([A-Za-z_]\w*)\s*=[^=]", lines[i - 1])
            assert lhs, f"a '#   == …' claim must follow an assignment: {lines[i - 1]!r}"
            out.append((lhs.group(1), m.group(1).strip()))
    return out


def test_the_readme_has_python_snippets():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    assert any(claims(code) for _, code in blocks), "the Captum snippet states its equality with Captum"


def test_every_python_snippet_runs_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__readme__"}
    t0 = time.perf_counter()
    checked = 0
    for line, code in python_blocks(README.read_text(encoding="utf-8")):
        exec(compile(code, f"README.md, the snippet at line {line}", "exec"), ns)
        for name, expr in claims(code):
            if "captum." in expr:
                ns.setdefault("captum", pytest.importorskip("captum"))
                import captum.attr  # noqa: F401  (the claim names captum.attr)
            want = eval(expr, ns)
            got = ns[name]
            assert isinstance(got, torch.Tensor) and got.shape == want.shape, (name, expr)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            assert got.abs().sum() > 0, f"README line {line}: {name} is zero, so the equality shows nothing"
            checked += 1
    assert checked >= 1
    assert time.perf_counter() - t0 < BUDGET_S
    assert (tmp_path / "li.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_viz_line_labels_the_layer_it_draws():
    """The heat map saved in the first snippet is captioned with the layer its image comes from."""
    text = README.read_text(encoding="utf-8")
    code = python_blocks(text)[0][1]
    L_layer = re.search(r'^L = nns_cuda\.filter_images\(model, x, "([^"]+)"\)', code, flags=re.M).group(1)
    caption = re.search(r'viz\.learned_image_figure\(x\[0\], \{"([^"]+)": L\[0\]', code).group(1)
    assert caption == L_layer


def test_the_memory_default_is_stated_as_the_engine_has_it(monkeypatch):
    """The engine's default budget (2 GiB on the CPU, 8 GiB for one sample, 25 % of the RAM if
    less; 60 % of free GPU memory) is what the README and ``--max-memory --help`` say."""
    import argparse

    from nns_cuda.app._common import engine_options
    from nns_cuda.engine import memory

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (1 << 40) // 4096}      # 1 TiB of RAM: the caps apply
    monkeypatch.setattr(memory.os, "sysconf", lambda k: pages[k])
    assert memory.default_budget(torch.device("cpu")) == 2 << 30
    assert memory.default_budget(torch.device("cpu"), fit=True) == 8 << 30
    pages["SC_PHYS_PAGES"] = (4 << 30) // 4096                               # 4 GiB of RAM: a quarter of it
    assert memory.default_budget(torch.device("cpu")) == memory.default_budget(torch.device("cpu"), fit=True) == 1 << 30
    p = argparse.ArgumentParser()
    engine_options(p)
    help_text = " ".join(next(a.help for a in p._actions if "--max-memory" in a.option_strings).split())
    readme = " ".join(README.read_text(encoding="utf-8").split())
    for text in (help_text.replace("%%", "%"), readme):
        for fact in (r"CPU 2 GiB,? \(?or 25 ?% of the RAM", r"8 GiB", r"CUDA 60 ?% of the free GPU memory"):
            assert re.search(fact, text), (fact, text[:300])
