"""The import contract (docs/architecture.md), checked on the source: every import, at module level or
inside a function, counts.

- cli may import runtime and quantize; quantize may import runtime; runtime imports neither.
- a backend never imports another backend; nothing but the backend registry and the loader names a
  backend module (the rest asks through the Backend protocol).
- no module imports itself back through a chain of other modules (no cycles).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPS = {"cli": "edgevlm.cli", "runtime": "edgevlm.runtime", "quantize": "edgevlm.quantize"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in TOPS.items():
        for p in (ROOT / folder).rglob("*.py"):
            parts = list(p.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg] + parts)] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The edgevlm modules ``name`` imports (``from pkg import mod`` counts as importing pkg.mod)."""
    is_pkg = path.name == "__init__.py"
    pkg = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES)
    # registry tables naming modules as strings ("edgevlm.runtime.backends.gguf:GGUFBackend")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            mod = node.value.split(":")[0]
            if mod in MODULES:
                out.add(mod)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_layers():
    bad = []
    for mod, deps in GRAPH.items():
        for dep in deps:
            if mod.startswith("edgevlm.runtime") and dep.startswith(("edgevlm.cli", "edgevlm.quantize")):
                bad.append(f"{mod} -> {dep}")
            if mod.startswith("edgevlm.quantize") and dep.startswith("edgevlm.cli"):
                bad.append(f"{mod} -> {dep}")
    assert not bad, "layering broken:\n" + "\n".join(sorted(bad))


def test_backends_stand_alone():
    from edgevlm.runtime.backends import BACKENDS

    backends = {target.split(":")[0] for target in BACKENDS.values()}   # helper modules are not backends
    assert backends <= set(MODULES)
    allowed_callers = {"edgevlm.runtime.backends"}     # the registry table
    bad = []
    for mod, deps in GRAPH.items():
        for dep in deps & backends:
            if mod in backends and mod != dep:
                bad.append(f"backend {mod} imports backend {dep}")
            elif mod not in backends and mod not in allowed_callers:
                bad.append(f"{mod} imports backend module {dep} (use the Backend protocol)")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            # a package's __init__ importing its own submodules is not a cycle worth naming
            if d.startswith(m + ".") or m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_cli_rooms():
    """A command module imports cli/common and no other command; cli/common imports no command."""
    common, bad = "edgevlm.cli.common", []
    commands = {m for m in MODULES if m.startswith("edgevlm.cli.") and not m.startswith(common)
                and m != "edgevlm.cli.main"}
    for mod, deps in GRAPH.items():
        if mod in commands or mod.startswith(common):
            bad += [f"{mod} -> {d}" for d in deps & commands]
    assert not bad, "cli rooms broken:\n" + "\n".join(sorted(bad))


def test_serving_rooms():
    """The API families call the answer path and the context; they import neither each other nor are
    imported by anything but the app."""
    families = {"edgevlm.runtime.serving.openai_api", "edgevlm.runtime.serving.ollama_api"}
    assert families <= set(MODULES)
    bad = [f"{mod} -> {d}" for mod, deps in GRAPH.items() for d in deps & families
           if mod != "edgevlm.runtime.serving.app"]
    assert not bad, "serving rooms broken:\n" + "\n".join(sorted(bad))


def test_modules_stay_small():
    """No module over ~500 lines unless docs/architecture.md says why (listed there by path)."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    big = []
    for mod, path in MODULES.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        rel = str(path.relative_to(ROOT))
        if n > 520 and f"`{rel}`" not in doc:
            big.append(f"{rel}: {n} lines")
    assert not big, "modules over ~500 lines with no reason in docs/architecture.md:\n" + "\n".join(big)


def test_environment_variables_are_one_table():
    """Every variable the code reads is in runtime/env.py's table, and the README documents each."""
    import re

    from edgevlm.runtime.env import ENV

    read = set()
    for path in MODULES.values():
        read |= set(re.findall(r"""environ(?:\.get)?\(\s*["']([A-Z][A-Z0-9_]+)["']""", path.read_text(encoding="utf-8")))
        read |= set(re.findall(r"""getenv\(\s*["']([A-Z][A-Z0-9_]+)["']""", path.read_text(encoding="utf-8")))
        read |= set(re.findall(r"""flag\(\s*["']([A-Z][A-Z0-9_]+)["']""", path.read_text(encoding="utf-8")))
    ours = {v for v in read if v.startswith(("VLM_", "HF_"))}
    assert ours <= set(ENV), f"read but not in runtime/env.py: {sorted(ours - set(ENV))}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [v for v in ENV if f"`{v}" not in readme]
    assert not missing, f"not in the README's table: {missing}"


# Floors of runtime/: a room imports only rooms on its own floor or below (docs/architecture.md).
FLOORS = {"errors": 0, "env": 0, "config": 0, "protocol": 0, "digest": 0, "": 0,
          "formats": 1, "device": 1,
          "models": 2, "inputs": 2, "generation": 2,
          "backends": 3,
          "loader": 4,
          "reports": 5, "serving": 5, "captioner": 5}
# The probe reads the engine build (llama_system_info) through the backends' import helper, a leaf that
# imports only errors and env.
FLOOR_EXCEPTIONS = {("edgevlm.runtime.device.hardware", "edgevlm.runtime.backends.llamacpp")}


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[2] if len(parts) > 2 else ""


def test_floors():
    bad, unknown = [], set()
    for mod, deps in GRAPH.items():
        if not mod.startswith("edgevlm.runtime"):
            continue
        here = _room(mod)
        for dep in deps:
            there = _room(dep)
            if not dep.startswith("edgevlm.runtime") or there == here or (mod, dep) in FLOOR_EXCEPTIONS:
                continue
            if here not in FLOORS or there not in FLOORS:
                unknown.update(r for r in (here, there) if r not in FLOORS)
            elif FLOORS[there] > FLOORS[here]:
                bad.append(f"{mod} (floor {FLOORS[here]}) -> {dep} (floor {FLOORS[there]})")
    assert not unknown, f"rooms with no floor in tests/test_architecture.py: {sorted(unknown)}"
    assert not bad, "imports that run up a floor:\n" + "\n".join(sorted(bad))


def test_backend_helpers_are_leaves():
    """backends/llamacpp.py is imported by the probe (device/hardware.py): it may import only errors and env."""
    deps = {d for d in GRAPH["edgevlm.runtime.backends.llamacpp"]}
    assert deps <= {"edgevlm.runtime.errors", "edgevlm.runtime.env"}, deps
