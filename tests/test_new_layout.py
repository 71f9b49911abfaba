"""A layout defined here, outside remap/, registered through the one public function, works in
every command: inspect detects it, report plans into it, convert writes it (its own file scheme
and format tag), verify replays it, and parity refuses it with the reason its layout gives.
Nothing under remap/ names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from remap import api
from remap.cli import app
from remap.errors import RemapError
from remap.io import ShardPlan, TensorEntry
from remap.layouts import LAYOUTS, register_layout
from remap.layouts.base import Expected, FilePlan, Layout, Placement
from remap.parity import run_parity


class ToyLayout(Layout):
    """A toy model: an embedding, `layers` square blocks, a final norm. `blocks` variant holds
    each block as written; `transposed` holds it transposed. One file per layer, tagged "toy"."""

    name = "toy"
    variants = ("blocks", "transposed")
    format = "toy"
    no_runtime = "the toy model has no runtime"

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        if raw.get("model_type") != "toy":
            raise RemapError(f"model_type is {raw.get('model_type')!r}", expected="'toy'")
        return {key: int(raw[key]) for key in ("vocab", "width", "layers")}

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        kind = self.variant(variant)
        width = config["width"]
        block = "w" if kind == "blocks" else "wt"
        names = [("embed", (config["vocab"], width)), ("norm", (width,))]
        names += [(f"layer.{i}.{block}", (width, width)) for i in range(config["layers"])]
        return {name: Expected(name, shape) for name, shape in names}

    def files(self, outputs, max_shard_size, names) -> FilePlan:
        """Each layer in a file of its own, the rest in `toy.safetensors`."""
        by_file: dict[str, list] = {}
        for output in outputs:
            file = f"{output.name.split('.')[0]}-{output.name.split('.')[1]}.safetensors" if "." in output.name else "toy.safetensors"
            by_file.setdefault(file, []).append(TensorEntry(output.name, output.dtype, output.shape))
        shards = [ShardPlan(file, tuple(entries)) for file, entries in by_file.items()]
        return FilePlan(shards, {e.name: [Placement(s.file)] for s in shards for e in s.entries})


SPEC = """\
remap: 1
name: toy-transpose
from: toy
to: toy
variant: transposed
rules:
  - to: embed
    from: embed
  - to: norm
    from: norm
  - to: layer.{i}.wt
    from: layer.{i}.w
    ops: [{op: transpose, axes: [1, 0]}]
"""


@pytest.fixture
def toy(tmp_path):
    """The toy layout registered (and removed after), a checkpoint of it, and a spec into it."""
    register_layout(ToyLayout())
    source = tmp_path / "toy"
    source.mkdir()
    rng = np.random.default_rng(0)
    save_file({"embed": rng.standard_normal((10, 4), dtype=np.float32), "norm": np.ones(4, np.float32),
               **{f"layer.{i}.w": rng.standard_normal((4, 4), dtype=np.float32) for i in range(3)}},
              str(source / "model.safetensors"))
    (source / "config.json").write_text(json.dumps({"model_type": "toy", "vocab": 10, "width": 4, "layers": 3}))
    spec = tmp_path / "toy-transpose.yaml"
    spec.write_text(SPEC)
    yield source, spec
    LAYOUTS.pop("toy")


def cli(*args) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_a_layout_registered_from_outside_runs_in_every_command(toy, tmp_path):
    source, spec = toy
    shown = cli("inspect", source, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["layout"] == "toy"

    assert cli("report", source, "--spec", spec).exit_code == 0
    out = tmp_path / "out"
    assert cli("convert", source, out, "--spec", spec, "--quiet").exit_code == 0
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["layer-0.safetensors", "layer-1.safetensors", "layer-2.safetensors", "toy.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()  # the toy scheme writes no index
    with open(out / "layer-1.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "toy"}
    with api.open_source(source) as before, api.open_source(out) as after:
        np.testing.assert_array_equal(after.read("layer.1.wt"), before.read("layer.1.w").T)
        assert api.identify(after).variant == "transposed"

    verified = cli("verify", out)
    assert verified.exit_code == 0 and "replayed on" in verified.stdout
    (out / "layer-2.safetensors").unlink()  # a file gone: verify names it
    assert cli("verify", out).exit_code == 1

    with pytest.raises(RemapError, match="no runtime runs the 'toy' layout: the toy model has no runtime"):
        run_parity(source, spec=spec)


def test_registering_is_checked(toy):
    with pytest.raises(RemapError, match="registered already"):
        register_layout(ToyLayout())
    with pytest.raises(RemapError, match="cannot register"):
        register_layout(object())
