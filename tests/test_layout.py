"""The layering of the project's files, read from their imports (ast, nothing is imported): which
file may import which. The library is one way up, with no cycle and no function-local import to hide
one:

    common.py   <- model.py <- engine.py          (common and model import no project file)
    common.py   <- tokenizer.py <- data.py -> verifier.py   (verifier imports no project file)
    checkpoint.py imports common, model, tokenizer
    stages (pretrain, midtrain, rl, evaluate, interop) import the library; of each other only
    midtrain -> pretrain (its training loop), rl -> evaluate (its held-out evaluation), rl / evaluate ->
    vllm_sampler (the optional vLLM backend) -> interop (its Hugging Face export)
    tools (bench.py, runs/*.py) import anything; nothing imports a tool

A new file must be placed in this table.

Run: python -m pytest -q tests/test_layout.py   (well under a second)
"""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LIBRARY = {
    'common': set(),
    'model': set(),
    'engine': {'common', 'model'},
    'tokenizer': {'common'},
    'verifier': set(),
    'data': {'common', 'tokenizer', 'verifier'},
    'checkpoint': {'common', 'model', 'tokenizer'},
}
STAGES = {
    'interop': set(),
    'pretrain': set(),
    'midtrain': {'pretrain'},
    'evaluate': {'vllm_sampler'},
    'rl': {'evaluate', 'vllm_sampler'},
    'vllm_sampler': {'interop'},   # the optional vLLM backend: hands the model over by interop's HF export
}
TOOLS = {'bench', 'runs/plan', 'runs/gpu_check'}


def project_files():
    """{name: path} of every Python file of the project but the tests and the presets (config/*.py
    are preset files, executed by the configurator, not imported)."""
    paths = glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'runs', '*.py'))
    return {os.path.relpath(p, ROOT)[:-3].replace(os.sep, '/'): p for p in paths}


def project_imports(path, modules):
    """[(module imported, line, at module level?)] for the project modules `path` imports, anywhere."""
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split('.')[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split('.')[0]]
        else:
            continue
        out += [(n, node.lineno, id(node) in top) for n in names if n in modules]
    return out


@pytest.mark.fast
def test_every_file_imports_only_what_its_layer_allows():
    files = project_files()
    names = {name.split('/')[-1] for name in files}
    unplaced = sorted(set(files) - set(LIBRARY) - set(STAGES) - TOOLS)
    assert not unplaced, f"{unplaced}: place each new file in tests/test_layout.py's table"
    wrong = []
    for name, path in sorted(files.items()):
        for mod, line, at_top in project_imports(path, names):
            if name in LIBRARY:
                ok = mod in LIBRARY[name] and at_top   # the library imports at the top: no hidden cycle
            elif name in STAGES:
                ok = mod in LIBRARY or mod in STAGES[name]
            else:
                ok = mod in LIBRARY or mod in STAGES   # a tool: anything but another tool
            if not ok:
                wrong.append(f"{name}.py:{line} imports {mod}" + ('' if at_top else ' (inside a function)'))
    assert not wrong, 'layering broken: ' + '; '.join(wrong)


@pytest.mark.fast
def test_the_library_has_no_import_cycle():
    """Follows from the table, checked on it: a depth-first walk finds no way back to where it began."""
    graph = {**LIBRARY, **STAGES}

    def reach(start, node, seen):
        for nxt in graph.get(node, ()):
            assert nxt != start, f"import cycle through {start}"
            if nxt not in seen:
                seen.add(nxt)
                reach(start, nxt, seen)
    for name in graph:
        reach(name, name, set())
