"""DeepSeek's model-parallel files read back: model{r}-mp{N}.safetensors as the single-rank
tensors they were cut from, by every command (inspect, report, convert back to hf, verify); the
report refuses what convert refuses; files that do not put together are refused, naming where."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from remap import api
from remap.errors import RemapError
from remap.io.checkpoint import open_checkpoint
from remap.io.hashing import sha256_file
from remap.ops import TensorType
from tests.helpers import layout_tensors, random_tensors, save_checkpoint
from tests.test_convert import remap
from tests.test_fixture_conversions import FIXTURES
from tests.test_values import WIDE

HF = FIXTURES / "hf-bf16"


def _convert(src, dst, spec="hf-to-deepseek", **options):
    plan, ckpt = api.plan(src, spec, **options)
    report = api.report(plan, ckpt)
    assert report.ok, report.problems
    api.convert(plan, ckpt, dst, report=report.to_dict())
    return dst


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """fixtures/hf-bf16 through hf-to-deepseek at mp 1, 2 and 4: {mp: directory}."""
    root = tmp_path_factory.mktemp("deepseek")
    return {mp: _convert(HF, root / f"mp{mp}", params={"mp": mp}) for mp in (1, 2, 4)}


def _bytes(checkpoint, name, how):
    return bytes(checkpoint.read_bytes(name)) if how == "read_bytes" else getattr(checkpoint, how)(name).tobytes()


@pytest.mark.parametrize("mp", [2, 4])
def test_model_parallel_files_read_as_the_single_rank_file(deepseek, mp):
    single, ranks = api.open_source(deepseek[1]), api.open_source(deepseek[mp])
    assert ranks.ranks == mp and len(ranks.files) == mp
    assert {n: (t.shape, t.dtype) for n, t in ranks.tensors.items()} == {
        n: (t.shape, t.dtype) for n, t in single.tensors.items()}
    for name in single.tensors:
        for how in ("read", "load", "read_bytes"):
            assert _bytes(ranks, name, how) == _bytes(single, name, how), (name, how)
    # a routed expert is one rank's span, so it still moves as raw bytes
    assert ranks.tensors["layers.1.ffn.experts.3.w1.weight"].start is not None


def test_inspect_verify_and_parity_read_the_ranks(deepseek):
    summary = json.loads(remap("inspect", deepseek[2], "--json").stdout)
    assert (summary["layout"], summary["variant"], summary["mp"]) == ("deepseek", "bf16", 2)
    assert summary["tensors"] == len(api.open_source(deepseek[1]).tensors)
    assert "layout: deepseek (bf16), mp=2" in remap("inspect", deepseek[2]).stdout
    verified = " ".join(remap("verify", deepseek[2]).stdout.split())
    assert verified.startswith("OK: 7 files") and "replayed on" in verified  # every rank's tensors checked (and the card)
    # parity reads the ranks too, and says what it cannot do: run DeepSeek's own code
    parity = remap("parity", deepseek[2], "--spec", "hf-to-deepseek", "--inverse", check=False)
    assert parity.returncode == 2 and "no runtime runs the 'deepseek' layout" in parity.stderr


def test_back_to_hf_from_any_mp_is_the_same_file(deepseek, tmp_path):
    """The inverse reads the ranks as one: mp 1, 2 and 4 give the same hf file, the source's byte
    for byte, and a second round trip gives it back again."""
    for mp, path in deepseek.items():
        remap("convert", path, tmp_path / f"back{mp}", "--spec", "hf-to-deepseek", "--inverse", "--quiet")
    back = tmp_path / "back2/model.safetensors"
    assert sha256_file(back) == sha256_file(tmp_path / "back1/model.safetensors") == sha256_file(
        tmp_path / "back4/model.safetensors")
    assert sha256_file(back) == sha256_file(HF / "model.safetensors")
    _convert(tmp_path / "back2", tmp_path / "again", params={"mp": 2})
    _convert(tmp_path / "again", tmp_path / "back-again", inverse=True)
    assert sha256_file(tmp_path / "back-again/model.safetensors") == sha256_file(back)
    verified = remap("verify", tmp_path / "back2").stdout
    assert "OK" in verified and f"replayed on {deepseek[2]}" in " ".join(verified.split())


def test_an_official_style_checkpoint_with_16_experts_comes_back_byte_for_byte(tmp_path):
    """A float32 router bias (as DeepSeek's releases store it) and 16 experts: at mp=16 the files
    sort as text model0, model1, model10, ..., model2; hf -> deepseek -> hf is the identity."""
    types = {n: TensorType(t.shape, "F32") if n.endswith("e_score_correction_bias") else t
             for n, t in layout_tensors("hf", WIDE, "bf16").items()}
    tensors = random_tensors(types)
    save_checkpoint(tmp_path / "hf", WIDE, tensors)
    for mp in (4, 16):
        _convert(tmp_path / "hf", tmp_path / f"mp{mp}", params={"mp": mp})
        _convert(tmp_path / f"mp{mp}", tmp_path / f"back{mp}", inverse=True)
        assert sha256_file(tmp_path / f"back{mp}/model.safetensors") == sha256_file(tmp_path / "hf/model.safetensors")
    assert remap("verify", tmp_path / "back16").returncode == 0
    assert api.identify(api.open_source(tmp_path / "mp16")).variant == "bf16"


@pytest.mark.parametrize("config, mp, message", [
    (None, 3, "--param mp=3 does not divide 4 routed experts"),
    ({**WIDE, "vocab_size": 72}, 16, "dim 0 of [72, 32] does not split over 16 ranks"),
])
def test_report_refuses_the_mp_convert_refuses(tmp_path, config, mp, message):
    src = HF
    if config is not None:
        src = tmp_path / "hf"
        save_checkpoint(src, config, random_tensors(layout_tensors("hf", config, "bf16")))
    report = remap("report", src, "--spec", "hf-to-deepseek", "--param", f"mp={mp}", check=False)
    convert = remap("convert", src, tmp_path / "out", "--spec", "hf-to-deepseek", "--param", f"mp={mp}", check=False)
    assert report.returncode == convert.returncode == 2
    assert message in report.stderr and report.stderr == convert.stderr
    assert not (tmp_path / "out").exists()


def _rewrite(path, change):
    """Rewrite one rank's file with `change(tensors)` applied."""
    with open_checkpoint(path) as rank:
        tensors = {name: np.array(rank.read(name)) for name in rank.tensors}
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_replicated_tensor_that_differs_between_ranks_is_refused(deepseek, tmp_path):
    (tmp_path / "mp2").mkdir()
    for file in deepseek[2].iterdir():
        (tmp_path / "mp2" / file.name).write_bytes(file.read_bytes())
    _rewrite(tmp_path / "mp2/model1-mp2.safetensors", lambda t: t["norm.weight"].__setitem__(0, 7))
    with pytest.raises(RemapError, match="its copy in model1-mp2.safetensors differs") as caught:
        api.open_source(tmp_path / "mp2").read("norm.weight")
    assert caught.value.tensor == "norm.weight"
    run = remap("convert", tmp_path / "mp2", tmp_path / "back", "--spec", "hf-to-deepseek", "--inverse", check=False)
    assert run.returncode == 2 and "norm.weight" in run.stderr and not (tmp_path / "back").exists()


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("layers.0.attn.wo.weight"), "model1-mp2.safetensors does not hold it"),
    (lambda t: t.__setitem__("layers.0.attn.wo.weight", np.ascontiguousarray(t["layers.0.attn.wo.weight"][:, :4])), "holds BF16 [64, 4]"),
    (lambda t: t.__setitem__("layers.1.ffn.experts.0.w2.weight", t["layers.1.ffn.experts.2.w2.weight"]),
     "model1-mp2.safetensors holds BF16 [64, 32]; the ranks' tensors, cut again, put nothing there"),
])
def test_ranks_that_do_not_put_together_are_refused(deepseek, tmp_path, change, message):
    (tmp_path / "mp2").mkdir()
    for file in deepseek[2].iterdir():
        (tmp_path / "mp2" / file.name).write_bytes(file.read_bytes())
    _rewrite(tmp_path / "mp2/model1-mp2.safetensors", change)
    run = remap("inspect", tmp_path / "mp2", check=False)
    assert run.returncode == 2 and message in run.stderr and str(tmp_path / "mp2") in run.stderr
    assert "per-rank" not in run.stderr
