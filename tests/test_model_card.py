"""Every output directory gets a model card (README.md): its source, the recipe, remap's version,
each claim with its measured size, the parity result once `remap parity SRC DST` ran, and the
lines that load it; listed in the manifest, so `remap verify` checks it like every other file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from remap import __version__, api
from remap.destination import CARD, MANIFEST
from remap.model_card import record_parity
from remap.render.card import PARITY_END, PARITY_START, render_card

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def _convert(src, dst, spec, *, check=None, **options):
    plan, ckpt = api.plan(src, spec, **options)
    report = api.report(plan, ckpt, check=check)
    api.convert(plan, ckpt, dst, report=report.to_dict())
    return report


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_an_mlx_card_carries_mlx_lm_converts_metadata_the_recipe_and_how_to_load_it(tmp_path):
    dst = tmp_path / "tiny-mlx"
    _convert(FIXTURES / "hf-bf16", dst, "hf-to-mlx", quantize=4)
    other = tmp_path / "elsewhere"
    _convert(FIXTURES / "hf-bf16", other, "hf-to-mlx", quantize=4)
    card = (dst / CARD).read_text()
    # the hub metadata mlx_lm.convert writes (fixtures/mlx is mlx_lm.convert's own output)
    assert _front_matter(card) == _front_matter((FIXTURES / "mlx" / "README.md").read_text())
    assert f"remap {__version__} from `{FIXTURES / 'hf-bf16'}`" in card
    assert f"remap convert {FIXTURES / 'hf-bf16'} DST --spec hf-to-mlx -q --q-bits 4 --q-group-size 64" in card
    assert 'model, tokenizer = load("DST")' in card
    assert f"Not run yet: `remap parity {FIXTURES / 'hf-bf16'} DST`" in card
    assert (other / CARD).read_text() == card  # the same conversion, the same bytes, wherever it is written
    manifest = json.loads((dst / MANIFEST).read_text())
    assert CARD in manifest["files"]
    assert api.verify(dst).ok


def test_each_claim_is_listed_with_its_measured_size(tmp_path):
    dst = tmp_path / "hf"
    report = _convert(FIXTURES / "scratch-compatible", dst, "scratch-to-hf-exact", check=True)
    card = (dst / CARD).read_text()
    assert _front_matter(card) == {"library_name": "transformers", "pipeline_tag": "text-generation"}
    assert 'AutoModelForCausalLM.from_pretrained("DST")' in card
    assert report.losses and report.ok
    for loss in report.losses:
        row = next(line for line in card.splitlines() if line.startswith(f"| {loss.stage}: {loss.rule} |"))
        cells = [cell.strip() for cell in row.split(" | ")]
        assert cells[1:4] == [loss.claim, loss.what, str(loss.count)]
        assert cells[4] == ("not measured" if loss.magnitude is None else  # | escaped in a Markdown cell
                            f"max \\|x\\| {loss.magnitude:.3g}" + (", holds" if loss.holds else ""))
    assert any(loss.magnitude is not None for loss in report.losses)
    assert report.verdict in card


def test_a_hub_source_is_named_as_the_base_model():
    manifest = {"remap_version": "9", "spec": "hf-to-mlx", "target": {"layout": "mlx", "variant": "embed_q"},
                "recipe": {"source": "deepseek-ai/DeepSeek-V3", "spec": "hf-to-mlx", "revision": "abc123"}}
    card = render_card(manifest, None, metadata={"library_name": "mlx"}, usage=None)
    assert _front_matter(card) == {"base_model": "deepseek-ai/DeepSeek-V3", "library_name": "mlx"}
    assert "from the hub repo `deepseek-ai/DeepSeek-V3` at revision `abc123`" in card
    assert "--revision abc123" in card


SOURCE_CARD = """---
license: mit
language: [en, zh]
tags: [deepseek, mlx]
base_model: deepseek-ai/DeepSeek-V3-Base
library_name: transformers
datasets: [some/corpus]
---
# A fine-tune
"""


def _with_card(tmp_path: Path, fixture: str, card: str | None) -> Path:
    src = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, src)
    if card is not None:
        (src / CARD).write_text(card)
    return src


def test_the_source_card_s_metadata_is_carried_as_mlx_lm_convert_carries_it(tmp_path):
    """license, language, datasets and the authors' tags go on; the library is the one that loads
    DST; a local directory's base_model is its own parent, not this conversion's."""
    src = _with_card(tmp_path, "hf-bf16", SOURCE_CARD)
    _convert(src, tmp_path / "mlx", "hf-to-mlx")
    assert _front_matter((tmp_path / "mlx" / CARD).read_text()) == {
        "license": "mit", "language": ["en", "zh"], "datasets": ["some/corpus"], "library_name": "mlx",
        "pipeline_tag": "text-generation", "tags": ["deepseek", "mlx"]}
    # back to hf: the mlx tooling's own keys stay behind, the authors' stay on
    _convert(tmp_path / "mlx", tmp_path / "hf", "hf-to-mlx", inverse=True)
    assert _front_matter((tmp_path / "hf" / CARD).read_text()) == {
        "license": "mit", "language": ["en", "zh"], "datasets": ["some/corpus"], "library_name": "transformers",
        "pipeline_tag": "text-generation", "tags": ["deepseek"]}
    assert api.verify(tmp_path / "hf").ok


def test_a_hub_source_card_is_carried_under_its_hub_id():
    front = render_card({"recipe": {"source": "org/model"}, "target": {"layout": "mlx"}}, None,
                        metadata={"library_name": "mlx", "tags": ["mlx"]}, usage=None,
                        source_card={"license": "other", "base_model": "org/base", "tags": ["mlx", "moe"]},
                        source_metadata={"library_name": "transformers"})
    assert _front_matter(front) == {"license": "other", "base_model": "org/model", "library_name": "mlx",
                                    "tags": ["mlx", "moe"]}


def test_a_source_card_that_cannot_be_read_is_named_and_the_conversion_goes_on(tmp_path):
    cases = (("---\nlicense: [mit\n---\n", "does not parse"), ("---\n- a list\n---\n", "not a YAML mapping"),
             ("---\na: &x [1]\nb: *x\n---\n", "alias"), (None, "not a regular file"))
    for n, (card, why) in enumerate(cases):
        src = _with_card(tmp_path / str(n), "hf-bf16", card)
        if card is None:
            os.mkfifo(src / CARD)  # a FIFO nobody writes: read, it would block forever
        _convert(src, tmp_path / str(n) / "out", "hf-to-mlx")
        written = (tmp_path / str(n) / "out" / CARD).read_text()
        assert _front_matter(written) == _front_matter((FIXTURES / "mlx" / CARD).read_text())
        line = next(line for line in written.splitlines() if line.startswith("The source's model card metadata"))
        assert f"{src / CARD}: " in line and why in line, line


def test_parity_replaces_its_section_and_verify_still_passes(tmp_path):
    dst = tmp_path / "mlx"
    _convert(FIXTURES / "hf-bf16", dst, "hf-to-mlx")
    before = (dst / CARD).read_text()
    assert "parity result is recorded" in record_parity(dst, "## remap parity: PASS\n\nfirst run\n")
    assert "parity result is recorded" in record_parity(dst, "## remap parity: FAIL\n\nsecond run\n")
    after = (dst / CARD).read_text()
    assert "### remap parity: FAIL\n\nsecond run" in after and "first run" not in after
    record_parity(dst, f"## remap parity: FAIL\n\n`{PARITY_END}` a tensor name from a file\n")
    assert record_parity(dst, "## remap parity: PASS\n\nthird run\n") and "a tensor name" not in (dst / CARD).read_text()
    outside = lambda text: text.split(PARITY_START)[0] + text.split(PARITY_END)[1]
    assert outside(after) == outside(before)
    assert api.verify(dst).ok


def test_parity_leaves_an_edited_card_and_a_foreign_directory_alone(tmp_path):
    dst = tmp_path / "mlx"
    _convert(FIXTURES / "hf-bf16", dst, "hf-to-mlx")
    (dst / CARD).write_text((dst / CARD).read_text() + "my notes\n")
    assert "changed since remap wrote it" in record_parity(dst, "## remap parity: PASS\n")
    assert (dst / CARD).read_text().endswith("my notes\n")
    assert record_parity(FIXTURES / "mlx", "## remap parity: PASS\n") is None  # mlx_lm.convert's output


def test_remap_parity_on_a_dst_records_its_result_in_the_card(tmp_path):
    dst = tmp_path / "mlx"
    _convert(FIXTURES / "hf-bf16", dst, "hf-to-mlx")
    run = subprocess.run([sys.executable, "-m", "remap.cli", "parity", FIXTURES / "hf-bf16", dst, "--tokens", "4",
                          "--batch", "1", "--json", "-"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"]  # stdout holds the JSON alone; the note goes to stderr
    assert f"{dst / CARD}: the parity result is recorded" in run.stderr
    card = (dst / CARD).read_text()
    assert "### remap parity: PASS" in card and "PASS: all" in card
    assert api.verify(dst).ok
