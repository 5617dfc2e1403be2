"""The package's shape: imports point down without circles, one command layer, small files, true docs.

Everything here reads source text with `ast` (imports inside functions included); nothing is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lmforge"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 90
# Modules allowed to import the top-level `lmforge` package (the facade's users).
TOP = ("lmforge", "lmforge.__main__", "lmforge.cli")

# Floors from the bottom up (README's map): a module may import its own floor or lower ones only. A module
# sits on the floor of the longest name listed that contains it.
FLOORS: list[tuple[str, ...]] = [
    ("lmforge.errors", "lmforge.io", "lmforge.version", "lmforge.kernels", "lmforge.precision"),
    ("lmforge.config", "lmforge.presets"),
    ("lmforge.data", "lmforge.tokenizers"),
    ("lmforge.models", "lmforge.quant.ternary"),  # ternary layers are a model option (Config.bitlinear)
    ("lmforge.infer", "lmforge.adapt", "lmforge.quant", "lmforge.interop"),
    ("lmforge.loading", "lmforge.llm"),
    ("lmforge.train", "lmforge.align", "lmforge.compress", "lmforge.evaluate", "lmforge.serve", "lmforge.env",
     "lmforge.inspect"),
    ("lmforge.commands", "lmforge.cli", "lmforge.__main__", "lmforge"),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module that `name` (a module or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported lmforge module, line) for every import statement in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(_owner(a.name), node.lineno) for a in node.names if a.name.split(".")[0] == "lmforge"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "lmforge":
                continue
            for alias in node.names:  # `from lmforge.x import y`: the submodule y if there is one, else x
                full = f"{base}.{alias.name}"
                found.append((full if full in MODULES else _owner(base), node.lineno))
    return [(m, line) for m, line in found if m and m != module]


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in MODULES:
        if start in index:
            continue
        work = [(start, iter(sorted({t for t, _ in GRAPH[start]})))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted({t for t, _ in GRAPH[w]}))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _floor(module: str) -> int:
    matches = [(len(name), i) for i, names in enumerate(FLOORS) for name in names
               if module == name or module.startswith(name + ".") and name != "lmforge"]
    assert matches, f"{module} is on no floor: add it to FLOORS (and to README's map)"
    return max(matches)[1]


def test_no_import_circles():
    assert _cycles() == [], "import circles (imports inside functions count)"


def test_imports_point_down_and_only_commands_use_the_facade():
    problems = []
    for module, imports in GRAPH.items():
        in_commands = module.startswith("lmforge.commands")
        for target, line in imports:
            where = f"{MODULES[module].relative_to(ROOT)}:{line}"
            if target == "lmforge" and not (in_commands or module in TOP):
                problems.append(f"{where} imports the top-level package")
            if target.startswith("lmforge.commands") and not (in_commands or module in TOP):
                problems.append(f"{where} imports the command layer")
            if _floor(target) > _floor(module):
                problems.append(f"{where}: {module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})")
    assert problems == []


def test_library_names_no_command_module_even_as_a_string():
    pattern = re.compile(r"lmforge\.commands\b|lmforge\.\w+\.commands\b")
    bad = [f"{p.relative_to(ROOT)}" for m, p in MODULES.items()
           if not (m.startswith("lmforge.commands") or m in TOP) and pattern.search(p.read_text(encoding="utf-8"))]
    assert bad == []


def test_commands_table_targets_live_in_the_command_layer():
    tree = ast.parse((PKG / "cli.py").read_text(encoding="utf-8"))
    table = next(n.value for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)
                 and getattr(n.target, "id", "") == "COMMANDS")
    targets = [t.elts[0].value for t in table.values]
    assert len(targets) >= 19
    for target in targets:
        module, _, func = target.partition(":")
        assert module.startswith("lmforge.commands."), target
        source = MODULES[module].read_text(encoding="utf-8")
        assert re.search(rf"^def {re.escape(func)}\(", source, re.M), target


def test_no_file_or_function_too_long():
    files = sorted(((len(p.read_text(encoding="utf-8").splitlines()), str(p.relative_to(ROOT)))
                    for p in MODULES.values()), reverse=True)
    functions = sorted(((n.end_lineno - n.lineno + 1, f"{p.relative_to(ROOT)}:{n.name}")
                        for p in MODULES.values() for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), reverse=True)
    print(f"longest file {files[0]}, longest function {functions[0]}")
    assert [f for f in files if f[0] > MAX_FILE_LINES] == []
    assert [f for f in functions if f[0] > MAX_FUNCTION_LINES] == []


# ---- docs ------------------------------------------------------------------------------------------

DOCS = sorted((ROOT / "docs").glob("*.md"))
TEXTS = [ROOT / "README.md", *DOCS]


def _exists_in_code(dotted: str) -> bool:
    """`lmforge.a.b` names a module, or a def/class/assignment at the top of one (`lmforge.a.b.name`)."""
    owner = _owner(dotted)
    if owner is None:
        return False
    rest = dotted[len(owner) + 1:].split(".")[0] if dotted != owner else ""
    if not rest:
        return True
    if rest in ("json", "yaml", "md", "txt", "npy"):  # a file name such as `lmforge.json`
        return True
    source = MODULES[owner].read_text(encoding="utf-8")
    defined = (rf"^(?:class|def|async def) {rest}\b|^{rest}\b.*=|^    def {rest}\b"  # defined here
               rf"|^from \S+ import .*\b{rest}\b|^\s+{rest},?$")  # or imported here (the package's names)
    return bool(re.search(defined, source, re.M))


def test_readme_fits_a_screen_and_links_every_doc():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 100
    assert readme.splitlines()[2].split("#")[0].strip() == "make demo"
    assert readme.splitlines()[3].split("#")[0].strip() == "make test"
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    assert {f"docs/{d.name}" for d in DOCS} <= linked
    assert "docs/architecture.md" in linked


def test_docs_name_only_files_and_modules_that_exist():
    missing = []
    for text in TEXTS:
        body = text.read_text(encoding="utf-8")
        for link in re.findall(r"\]\(([^)#:]+?)(?:#[^)]*)?\)", body):
            if not (text.parent / link).exists():
                missing.append(f"{text.name}: link {link}")
        for path in set(re.findall(r"`((?:lmforge|tests|bench|recipes)/[\w/.-]+\.(?:py|yaml|md))", body)):
            if not (ROOT / path).exists():
                missing.append(f"{text.name}: file {path}")
        for dotted in set(re.findall(r"`(lmforge(?:\.\w+)+)", body)):
            if not _exists_in_code(dotted):
                missing.append(f"{text.name}: {dotted}")
    assert missing == []


def test_architecture_howtos_name_real_files():
    body = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for howto in ("a token mixer", "a data kind", "an objective", "a command"):
        assert re.search(rf"^## Add {howto}", body, re.M | re.I), howto
    files = re.findall(r"`(lmforge/[\w/.]+\.py)`", body)
    assert len(files) >= 8 and all((ROOT / f).exists() for f in files)


def test_no_script_folder_shadows_the_standard_library():
    """A script run as `python bench/x.py` puts bench/ first on sys.path: a bench/inspect.py would then replace
    the standard library's `inspect` for torch itself, and every other script there would fail to start."""
    import sys

    clashes = [str(p.relative_to(ROOT)) for folder in ("bench", "tests", "tests/helpers")
               for p in (ROOT / folder).glob("*.py") if p.stem in sys.stdlib_module_names]
    assert clashes == []
