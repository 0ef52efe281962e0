"""The package's layer order (CONTRIBUTING.md, "Layers"), read from the import statements of every module
(ast, so imports inside functions count too): a module imports only modules of a lower layer, or of its
own layer's package."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dctkd_ext"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = [
    # 0: leaves (torch and the standard library only)
    {"dctkd_ext._dtypes", "dctkd_ext._shapes", "dctkd_ext._bases", "dctkd_ext.presets",
     "dctkd_ext._build_info", "dctkd_ext._C"},
    # 1: the Triton kernels (loaded by the registry; they take their bases from _bases)
    {"dctkd_ext.triton"},
    # 2: the compiled library's loader and the float64 reference
    {"dctkd_ext._extension", "dctkd_ext.reference"},
    # 3: the backend registry
    {"dctkd_ext._backend"},
    # 4: the ops' Python faces
    {"dctkd_ext.ops"},
    # 5: modules and helpers built on the ops
    {"dctkd_ext.nn", "dctkd_ext.features", "dctkd_ext.amp"},
    # 6: integrations with other libraries, and the package itself
    {"dctkd_ext.integrations", "dctkd_ext"},
]


def layer_of(module: str):
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (rank, name)
    return best


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path):
    """(line, module) of every dctkd_ext module the file imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import x` names submodules; `from .m import f` names m
            targets = [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
        else:
            continue
        for t in targets:
            if t == "dctkd_ext" or t.startswith("dctkd_ext."):
                yield node.lineno, t


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    assert MODULES
    assert [module_name(p) for p in MODULES if layer_of(module_name(p)) is None] == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_follow_the_layer_order(path):
    me = module_name(path)
    rank, home = layer_of(me)
    bad = []
    for line, target in imported_modules(path):
        found = layer_of(target)
        assert found is not None, f"{path}:{line}: {target} has no layer in tests/test_layers.py"
        t_rank, t_home = found
        if t_rank < rank or t_home == home:
            continue
        bad.append(f"{path.name}:{line} imports {target} (layer {t_rank}, {t_home}) from layer {rank} ({home})")
    assert not bad, "\n".join(bad)


def test_triton_imports_neither_ops_nor_reference():
    """Stated on its own: the Triton kernels take their bases from dctkd_ext._bases, and their autograd
    is registered by dctkd_ext._backend from the ops layer."""
    for path in (ROOT / "triton").rglob("*.py"):
        for line, target in imported_modules(path):
            for forbidden in ("dctkd_ext.ops", "dctkd_ext.reference", "dctkd_ext._backend", "dctkd_ext.nn"):
                assert not (target == forbidden or target.startswith(forbidden + ".")), f"{path}:{line}: {target}"
