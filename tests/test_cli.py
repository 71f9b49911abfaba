"""The command line as its users expect it, run as they run it (`python -m remap.cli`, stdout a
pipe, not a terminal): mlx_lm.convert's flags mean what they mean there, every flag is checked
before any work, `--json [PATH|-]` is the same on every command, piped output never wraps, and
`remap specs` / `--help` read well."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from remap.flags import quantization
from remap.render.listing import first_sentence
from remap.render.table import print_table
from remap.spec.load import bundled_specs, load_spec
from tests.helpers import CLI_ENV as ENV, remap

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "hf-bf16"



def help_text(*command: str) -> str:
    """`--help`, wide enough that no help line wraps inside typer's boxes."""
    run = subprocess.run([sys.executable, "-m", "remap.cli", *command, "--help"], capture_output=True, text=True,
                         cwd=ROOT, env={**ENV, "COLUMNS": "250"})
    assert run.returncode == 0, run.stderr
    return run.stdout


def _weights(path: Path) -> dict[str, bytes]:
    """What a runtime loads: every safetensors file and config.json, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors" or p.name == "config.json"}


# -- 1. mlx_lm.convert's flags ------------------------------------------------------------------


def test_mlx_lm_flags_make_the_model_quantize_makes(tmp_path):
    """`-q --q-bits 4` (mlx-lm's spelling) is `--quantize 4`; `-q` alone is mlx-lm's default, 4
    bits in groups of 64; `--quant-predicate mixed_4_6` is `--quantize mixed_4_6`."""
    runs = {"quantize 4": ["--quantize", "4"], "-q --q-bits 4": ["-q", "--q-bits", "4"], "-q": ["-q"],
            "--quantize alone": ["--quiet", "--quantize"], "bits 4 g64": ["--q-bits", "4", "--q-group-size", "64"],
            "quantize mixed": ["--quantize", "mixed_4_6"], "-q predicate": ["-q", "--quant-predicate", "mixed_4_6"]}
    runs["as mlx_lm.convert: no spec"] = ["-q", "--q-bits", "4"]  # quantizing names mlx, so remap picks hf-to-mlx
    for name, flags in runs.items():
        spec = [] if "no spec" in name else ["--spec", "hf-to-mlx"]
        run = remap("convert", FIXTURE, tmp_path / name, *spec, *flags)
        assert run.returncode == 0, (name, run.stderr)
        recipe = json.loads((tmp_path / name / "remap-manifest.json").read_text())["recipe"]
        assert (recipe["quantize"], recipe["group_size"]) == ("mixed_4_6" if "mixed" in name or "predicate" in name else 4, 64)
    four = _weights(tmp_path / "quantize 4")
    assert json.loads(four["config.json"])["quantization"]["bits"] == 4
    for name in ("-q --q-bits 4", "-q", "--quantize alone", "bits 4 g64", "as mlx_lm.convert: no spec"):
        assert _weights(tmp_path / name) == four, name
    assert _weights(tmp_path / "-q predicate") == _weights(tmp_path / "quantize mixed") != four


def test_quiet_has_only_its_long_form_and_q_quantizes(tmp_path):
    quiet = remap("convert", FIXTURE, tmp_path / "quiet", "--spec", "hf-to-mlx", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout.startswith("wrote ")  # the report left out
    assert "quantization" not in json.loads((tmp_path / "quiet" / "config.json").read_text())
    shown = help_text("convert")
    assert "--quiet" in shown and not any("--quiet" in line and "-q " in line.split("--quiet")[0] for line in shown.splitlines())


def test_report_and_parity_take_the_same_quantize_flags():
    report = json.loads(remap("report", FIXTURE, "--spec", "hf-to-mlx", "-q", "--q-group-size", "32", "--json", "-").stdout)
    assert report["spec"] == "hf-to-mlx+4bit" and report["ok"]
    mixed = json.loads(remap("report", FIXTURE, "--spec", "hf-to-mlx", "--quant-predicate", "mixed_3_6", "--json").stdout)
    assert mixed["spec"] == "hf-to-mlx+mixed_3_6"
    plain = json.loads(remap("report", FIXTURE, "--spec", "hf-to-mlx", "--json", "-").stdout)
    assert plain["spec"] == "hf-to-mlx"
    for command in (["report", FIXTURE], ["parity", FIXTURE], ["convert", FIXTURE, "unused-dst"]):
        refused = remap(*command, "--spec", "hf-to-mlx", "-q", "--q-bits", "7")
        assert refused.returncode == 2 and refused.stderr.startswith("error: --q-bits 7 "), (command, refused.stderr)


def test_dtype_takes_mlx_lm_names():
    for spelling in ("float16", "f16", "FP16"):
        report = json.loads(remap("report", FIXTURE, "--spec", "hf-to-mlx", "--dtype", spelling, "--json", "-").stdout)
        assert {row["dtype"] for row in report["rows"]} == {"F16"}, spelling


def test_parity_quantized_json_on_stdout_alone():
    """`remap parity SRC --spec S -q --json -`: the 4-bit conversion, run, its result alone on stdout."""
    run = remap("parity", FIXTURE, "--spec", "hf-to-mlx", "-q", "--q-group-size", "32", "--dtype", "f32", "--json", "-")
    assert run.returncode in (0, 1), run.stderr
    result = json.loads(run.stdout)
    assert result["target"]["weights"] == "quantized" and result["spec"] == "hf-to-mlx+4bit"
    assert result["dtype"] == "float32"


# -- 2. every flag checked before any work -------------------------------------------------------


def test_the_bits_accepted_are_those_mlx_quantizes_to():
    mx = pytest.importorskip("mlx.core")
    from remap.ops.quant import MLX_BITS, MLX_GROUP_SIZES

    def takes(bits: int, group: int) -> bool:
        try:
            mx.quantize(mx.zeros((2, 512)), group, bits)
            return True
        except ValueError:
            return False

    assert tuple(b for b in range(0, 17) if takes(b, 64)) == MLX_BITS == (1, 2, 3, 4, 5, 6, 8)
    assert tuple(g for g in (8, 16, 32, 64, 128, 256, 512) if takes(4, g)) == MLX_GROUP_SIZES
    shown = help_text("convert")
    assert "1, 2, 3, 4, 5, 6 or 8" in shown and "32, 64 or 128" in shown
    assert quantization(False, None, 1, None, None) == (1, 64)  # 1 bit: mlx has it
    one_bit = remap("report", FIXTURE, "--spec", "hf-to-mlx", "--q-bits", "1", "--json", "-")
    assert one_bit.returncode == 0 and json.loads(one_bit.stdout)["spec"] == "hf-to-mlx+1bit"


BAD_FLAGS = [  # (flags, spec, the start of the error line)
    (["--q-bits", "7"], "hf-to-mlx", "error: --q-bits 7 (expected bits mlx quantizes to: 1, 2, 3, 4, 5, 6 or 8)"),
    (["--q-bits", "0"], "hf-to-mlx", "error: --q-bits 0 "),
    (["--quantize", "7"], "hf-to-mlx", "error: --quantize '7' (expected bits 1, 2, 3, 4, 5, 6 or 8, or a mixed recipe"),
    (["--quantize", "9"], "hf-to-mlx", "error: --quantize '9' "),
    (["-q", "--q-group-size", "16"], "hf-to-mlx", "error: --q-group-size 16 (expected a group size mlx quantizes with: 32, 64 or 128)"),
    (["--quant-predicate", "mixed_5_6"], "hf-to-mlx", "error: --quant-predicate 'mixed_5_6' (expected a mixed recipe"),
    (["--quantize", "4", "--q-bits", "8"], "hf-to-mlx", "error: --q-bits 8 and --quantize 4 disagree"),
    (["--quant-predicate", "mixed_4_6", "--q-bits", "3"], "hf-to-mlx", "error: --q-bits 3 and --quant-predicate mixed_4_6 disagree"),
    (["--dtype", "int8"], "hf-to-mlx", "error: --dtype 'int8' (expected bfloat16, float16 or float32"),
    (["--max-shard-size", "12XB"], "hf-to-mlx", "error: --max-shard-size '12XB' (expected a positive number of bytes"),
    (["--max-shard-size", "0"], "hf-to-deepseek", "error: --max-shard-size '0' "),  # a target that cuts no shards
]


@pytest.mark.parametrize("flags, spec, says", BAD_FLAGS, ids=[" ".join(f) for f, _, _ in BAD_FLAGS])
def test_a_bad_flag_is_refused_before_any_work(tmp_path, flags, spec, says):
    run = remap("convert", tmp_path / "no-source-needed", tmp_path / "out", "--spec", spec, *flags)
    assert run.returncode == 2 and run.stdout == "", run.stdout + run.stderr  # no report printed
    assert run.stderr.startswith(says) and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "out").exists()


def test_good_flags_with_a_bad_one_after_them_still_quote_the_flag(tmp_path):
    run = remap("convert", FIXTURE, tmp_path / "out", "--spec", "hf-to-mlx", "--max-shard-size", "1.5GB", "--dtype", "bf16",
                "--quantize", "mixed_5_6")
    assert run.returncode == 2 and run.stderr.startswith("error: --quantize 'mixed_5_6'")


def test_an_existing_dst_is_refused_before_the_report_and_by_a_dry_run(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("a user's file")
    for extra in ([], ["--dry-run"]):
        run = remap("convert", FIXTURE, dst, "--spec", "hf-to-mlx", *extra)
        assert run.returncode == 2 and run.stdout == "", run.stdout
        assert "output already exists" in run.stderr and run.stderr.count("\n") == 1
    assert "convert would refuse it (--dry-run wrote nothing)" in run.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["mine.txt"]
    assert remap("convert", FIXTURE, tmp_path / "new", "--spec", "hf-to-mlx", "--dry-run").returncode == 0
    assert not (tmp_path / "new").exists()


# -- 3. --json [PATH|-] on every command ----------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mlx"
    assert remap("convert", FIXTURE, out, "--spec", "hf-to-mlx", "--quiet").returncode == 0
    return out


def test_json_dash_is_stdout_and_nothing_else_on_every_command(converted, tmp_path):
    commands = {"inspect": ["inspect", FIXTURE], "report": ["report", FIXTURE, "--spec", "hf-to-mlx"],
                "verify": ["verify", converted]}
    for name, command in commands.items():
        piped, bare = remap(*command, "--json", "-"), remap(*command, "--json")
        assert piped.returncode == 0 and bare.returncode == 0, (name, piped.stderr)
        data = json.loads(piped.stdout)  # the whole of stdout is one JSON document
        assert json.loads(bare.stdout) == data or name == "report"  # (a report records its own run)
        to_file = remap(*command, "--json", tmp_path / f"{name}.json")
        assert to_file.returncode == 0 and to_file.stdout.strip(), name  # the text for a reader, as without --json
        on_disk = json.loads((tmp_path / f"{name}.json").read_text())
        assert on_disk.keys() == data.keys(), name
        assert not Path(ROOT / "-").exists()
    assert json.loads(remap("verify", converted, "--json", "-").stdout)["ok"] is True


def test_json_dash_twice_and_bad_paths_are_refused(tmp_path):
    both = remap("report", FIXTURE, "--spec", "hf-to-mlx", "--json", "-", "--markdown", "-")
    assert both.returncode == 2 and "--json and --markdown both to stdout" in both.stderr
    missing = remap("report", FIXTURE, "--spec", "hf-to-mlx", "--json", tmp_path / "no" / "r.json")
    assert missing.returncode == 2 and missing.stdout == "" and "No such file or directory" in missing.stderr
    folder = remap("inspect", FIXTURE, "--json", tmp_path)
    assert folder.returncode == 2 and "is a directory" in folder.stderr
    weights = FIXTURE / "model.safetensors"
    kept = weights.read_bytes()
    clobber = remap("report", FIXTURE, "--spec", "hf-to-mlx", "--json", weights)
    assert clobber.returncode == 2 and "is a file this command reads" in clobber.stderr  # its own source file
    assert weights.read_bytes() == kept


# -- 4. output that fits its medium ---------------------------------------------------------------


def test_piped_output_keeps_every_tensor_name_whole_on_one_line():
    """Not a terminal (a pipe, as in CI): plain aligned lines however long, never rich's 80-column
    wrap, so every tensor name is on a line of its own, whole."""
    listed = [t["name"] for t in json.loads(remap("inspect", FIXTURE, "--json").stdout)["tensor_list"]]
    for command in (["inspect", FIXTURE], ["report", FIXTURE, "--spec", "hf-to-mlx"],
                    ["report", FIXTURE, "--spec", "hf-to-mlx", "-q"]):
        names = listed if command[0] == "inspect" else [r["name"] for r in json.loads(remap(*command, "--json").stdout)["rows"]]
        run = remap(*command, "--full")
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert any(len(line) > 100 for line in lines)  # longer than the 80 columns rich assumes
        assert not any(ch in run.stdout for ch in "│┃━─")  # no box drawing in a log
        words = {word for line in lines for word in line.split()}
        missing = [n for n in names if n not in words]
        assert len(names) > 40 and missing == [], (command, missing[:3])
    report = remap("report", FIXTURE, "--spec", "hf-to-mlx", "--full").stdout.splitlines()
    header = next(line for line in report if line.split()[:2] == ["target", "tensor"])
    rows = [line for line in report if line.startswith("  model.") or line.startswith("  lm_head")]
    column = header.index("shape")
    assert rows and all(row[column - 2:column] == "  " and row[column] == "[" for row in rows)  # aligned


def test_a_terminal_gets_a_rich_table_and_a_pipe_plain_lines():
    rows = [("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "[40, 64]", "[green]ok[/]"),
            ("lm_head.weight", "[320, 64]", "[red]missing\nsecond line[/]")]
    terminal = io.StringIO()
    print_table(Console(file=terminal, force_terminal=True, width=40), ("tensor", "shape", "status"), rows)
    assert "┃" in terminal.getvalue()
    piped = io.StringIO()
    print_table(Console(file=piped, width=40), ("tensor", "shape", "status"), rows, title="t")
    assert piped.getvalue().splitlines() == [
        "t",
        "  tensor                                              shape      status",
        "  model.layers.0.self_attn.kv_a_proj_with_mqa.weight  [40, 64]   ok",
        "  lm_head.weight                                      [320, 64]  missing",
        "                                                                 second line",
    ]


def test_a_pipe_gets_text_unhighlighted_a_terminal_highlighted(monkeypatch):
    """Off a terminal the console skips rich's highlighter (its styles would be dropped, and its
    regexes cost ~15 ms to compile after convert's last byte); the text is the same."""
    from rich.highlighter import ReprHighlighter

    from remap.render.table import FittingConsole

    line = "wrote out: 7 files, 1541.9 MiB in 1.0s (30 tensors; 121 used (100.0%))"
    calls = []
    real = ReprHighlighter.highlight
    monkeypatch.setattr(ReprHighlighter, "highlight", lambda self, text: calls.append(text) or real(self, text))
    piped = io.StringIO()
    FittingConsole(file=piped, width=40).print(line)
    assert piped.getvalue() == line + "\n" and calls == []
    terminal = io.StringIO()
    FittingConsole(file=terminal, force_terminal=True, width=200).print(line)
    assert "\x1b[" in terminal.getvalue() and len(calls) == 1


# -- 5. remap specs and --help --------------------------------------------------------------------


def test_specs_is_one_line_each_with_the_first_sentence_and_full_has_all():
    specs = [load_spec(p) for p in bundled_specs()]
    run = remap("specs")
    assert run.returncode == 0
    lines = run.stdout.splitlines()
    for spec in specs:
        [line] = [line for line in lines if line.split()[:1] == [spec.name]]
        summary = first_sentence(spec.description)
        assert f"{spec.source_layout} -> {spec.target_layout}" in line and line.endswith(summary)
        assert summary.endswith(".") and len(summary) < len(" ".join(spec.description.split()))
    assert first_sentence("Dequantize (e.g. FP8. Or not.) to bf16, as mlx_lm.convert does. Then more.") == \
        "Dequantize (e.g. FP8. Or not.) to bf16, as mlx_lm.convert does."
    full = remap("specs", "--full").stdout
    assert all(" ".join(spec.description.split()) in full for spec in specs)


@pytest.mark.parametrize("command", [[], ["inspect"], ["report"], ["convert"], ["parity"], ["verify"], ["specs"], ["invert"]])
def test_help_shows_no_type_after_a_flag(command):
    shown = help_text(*command)
    assert "--help" in shown and "<bool>" not in shown, shown
    if command in (["report"], ["convert"], ["parity"]):
        assert " -q " in shown and "--q-bits" in shown and "--quant-predicate" in shown and "[BITS|RECIPE]" in shown
    if command and command[0] in ("inspect", "report", "parity", "verify"):
        assert "--json" in shown and "[PATH|-]" in shown
