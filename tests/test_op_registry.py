"""How ops are put together: each registers itself by being defined, the op part of the spec schema
is generated from the classes, and remap.ops builds on neither remap.spec nor anything above it."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from remap.errors import RemapError
from remap.ops import OPS, Op, TensorType, base, build_op, invert_ops, op_class
from remap.ops import schema as op_schema_module
from remap.ops.schema import op_schema, param_schemas, render, updated
from remap.spec.load import SCHEMAS, parse_spec

PACKAGE = Path(__file__).resolve().parents[1] / "remap"
# The order ops register in (module import order, then definition order): the schema's enum and
# "unknown op" messages keep it.
ORDER = ["concat", "split", "split_heads", "merge_heads", "transpose", "rope_permute", "slice", "pad", "repeat",
         "cast", "dequant_fp8", "lossy", "quant_fp8", "quantize_mlx", "dequantize_mlx", "low_rank_fuse", "low_rank_split"]


@pytest.fixture
def registry():
    """The registry as it was, restored after a test that defines ops of its own."""
    saved = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


def test_ops_are_the_registered_classes_in_their_order():
    assert list(OPS) == ORDER
    assert all(cls.name == name and issubclass(cls, Op) for name, cls in OPS.items())
    with pytest.raises(TypeError):
        OPS["mine"] = Op  # a read-only view: classes register themselves
    with pytest.raises(RemapError, match="unknown op 'frobnicate'") as info:
        op_class("frobnicate")
    assert info.value.expected == " | ".join(ORDER)


def test_an_op_is_one_class(registry):
    @dataclass(frozen=True)
    class Double(Op):
        """Multiply by `factor` (a size expression)."""

        name = "double_test"
        int_params = ("factor",)
        factor: int = 2
        dtype: str | None = None

        def types(self, inputs: list[TensorType]) -> list[TensorType]:
            return inputs

        def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
            return self._replace(arrays, self._pick(arrays) * self.factor)

    assert OPS["double_test"] is Double and list(OPS)[-1] == "double_test"
    [out] = build_op({"op": "double_test", "factor": "heads - 1"}, {"heads": 4}).apply([np.ones(2)])
    assert out.tolist() == [3.0, 3.0]
    with pytest.raises(RemapError, match="has no inverse"):
        invert_ops([{"op": "double_test"}])
    assert param_schemas(Double) == {"input": {"$ref": "#/$defs/expr"}, "factor": {"$ref": "#/$defs/expr"},
                                     "dtype": {"type": "string", "minLength": 1}}
    assert op_schema()["properties"]["op"]["enum"][-1] == "double_test"


def test_an_op_name_is_taken_once(registry):
    with pytest.raises(TypeError, match="op 'concat' is defined twice"):
        @dataclass(frozen=True)
        class Another(Op):
            name = "concat"

    assert OPS["concat"].__module__ == "remap.ops.combine"

    @dataclass(frozen=True)
    class Base(Op):  # no name: a base for ops, not an op
        pass

    assert Base not in OPS.values()


def test_a_parameter_of_no_known_kind_needs_its_schema(registry):
    @dataclass(frozen=True)
    class Flagged(Op):
        name = "flagged_test"
        flag: bool = False

    with pytest.raises(TypeError, match="'flag' is neither an expression nor a word"):
        param_schemas(Flagged)

    @dataclass(frozen=True)
    class Described(Op):
        name = "described_test"
        param_schema = {"flag": {"type": "boolean"}, "missing": {}}
        flag: bool = False

    with pytest.raises(TypeError, match=r"describes \['missing'\]"):
        param_schemas(Described)


def test_the_generated_schema_checks_specs():
    head = "remap: 1\nname: t\nfrom: hf\nto: mlx\nrules:\n  - {to: a, from: b, ops: [%s]}\n"
    parse_spec(head % "{op: transpose, axes: [1, 0]}, {op: slice, stop: 1, claim: zero}")
    for bad, message in [("{op: transpose, axes: n}", "is not of type 'array'"),
                         ("{op: slice, claim: maybe}", "'maybe' is not one of"),
                         ("{op: cast, dtype: ''}", "should be non-empty"),
                         ("{op: split, sizes: [1], heads: 2}", "'heads' was unexpected")]:
        with pytest.raises(RemapError, match=message):
            parse_spec(head % bad)


# -- python -m remap.ops.schema -------------------------------------------------------------------


def test_schema_command_prints_writes_and_refuses_other_arguments(tmp_path, monkeypatch, capsys):
    assert op_schema_module.main([]) == 0
    assert json.loads(capsys.readouterr().out) == op_schema()
    committed = (SCHEMAS / "spec.schema.json").read_text()
    stale = tmp_path / "spec.schema.json"
    stale.write_text(updated(committed, {"type": "object"}))
    assert json.loads(stale.read_text())["$defs"]["op"] == {"type": "object"}
    monkeypatch.setattr(op_schema_module, "SCHEMA_PATH", stale)
    assert op_schema_module.main(["--write"]) == 0
    assert stale.read_text() == committed
    assert op_schema_module.main(["--check"]) == 2


def test_schema_file_laid_out_otherwise_is_refused():
    committed = (SCHEMAS / "spec.schema.json").read_text()
    with pytest.raises(ValueError, match="not laid out"):
        updated(committed.replace('\n      },\n      "allOf"', '\n    },\n      "allOf"', 1))
    with pytest.raises(ValueError, match="no \"op\" entry"):
        updated(json.dumps(json.loads(committed), indent=4))
    assert render({"a": [1]}, 4) == '{\n      "a": [\n        1\n      ]\n    }'


# -- layering -------------------------------------------------------------------------------------


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Every module `path` imports (and, for `from x import y`, x.y: y may be a module)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parent = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [parent, node.module]))
            found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return found


@pytest.mark.parametrize("path", [*sorted((PACKAGE / "ops").rglob("*.py")), PACKAGE / "expr.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_ops_and_expressions_do_not_import_the_spec_package(path):
    # remap.spec builds on remap.ops (ops in a spec, their inverses); the other way would be a cycle
    forbidden = ["remap.spec"] + (["remap.ops"] if path.name == "expr.py" else [])
    imported = sorted(m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not imported, f"{path.relative_to(PACKAGE.parent)} imports {imported}"


def test_the_import_check_sees_every_form():
    source = "import remap.spec.load\nfrom remap import spec\nfrom ..spec import pattern\nfrom . import base\n"
    found = _imports(PACKAGE / "ops" / "probe.py", source)
    assert {"remap.spec.load", "remap.spec", "remap.spec.pattern", "remap.ops.base"} <= found
    assert "remap.spec" in _imports(PACKAGE / "ops" / "__init__.py", "from ..spec import load\n")
