"""The FP8 forms an `hf` checkpoint may take, read from config.json's `quantization_config`.

Every form stores a quantized linear `{module}` as an e4m3 `{module}.weight` and a scale beside it;
dequantizing multiplies the two (`dequant_fp8`). They differ in the scale's name, granularity and
dtype, and in which modules they quantize:

- `fp8` (transformers' fine-grained FP8; DeepSeek-V3 / R1 / V3.1 / V3.2 and Kimi-K2 as released):
  `weight_scale_inv`, float32, one per `weight_block_size` block (default 128 x 128; `null`: one
  per tensor, shape [], as transformers' FP8Linear holds it). The official set of linears.
- `fp8` with `scale_fmt: ue8m0` (DeepSeek-V3.1, V3.2): the same blocks, powers of two. DeepSeek's
  files hold them as float32 (V3.1's o_proj scales are not all powers of two); transformers'
  quantizer writes E8M0 bytes (F8_E8M0; a U8 scale is read as E8M0, as transformers reads it).
  mlx-lm and DeepSeek multiply by the float32 values as for V3. The official set.
- `compressed-tensors`, format `float-quantized` (llm-compressor's FP8 and FP8_DYNAMIC schemes):
  `weight_scale` in the model's dtype, [1] per tensor (strategy tensor) or [out, 1] per output
  channel (strategy channel); static activations add an `input_scale` [1]. Every nn.Linear not in
  `ignore`, lm_head included. compressed-tensors dequantizes w * s in the scale's dtype (bf16: the
  same bits as float32 rounded once); mlx-lm's loader refuses the format.
- `fbgemm_fp8`: `weight_scale`, float32, [out, 1] per output channel. The official set.
  transformers runs it on a GPU only (fbgemm's row-wise GEMM); nothing dequantizes it on the CPU.

The official set is what DeepSeek's release quantizes: every linear of attention and MLP, not
the router, embeddings, lm_head, V3.2's `indexer.weights_proj` or MTP's `eh_proj` (transformers'
quantizers skip lm_head and the modules kept in float32 by default, and build no MTP layer).
`modules_to_not_convert` (fp8, fbgemm_fp8) and `ignore` (compressed-tensors) take modules out as
their libraries match them; they are regular expressions, so only short ones without nested
repetition are read (config.json is untrusted input: a pattern must not run for hours).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from remap.errors import RemapError
from remap.layouts.base import F32, FLOAT

DEFAULT_FP8_BLOCK = (128, 128)
METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8")
SCALE_FORMATS = ("float", "ue8m0")  # transformers' FineGrainedFP8Config.scale_fmt
_EXPECTED = ('null, or an object: {"quant_method": "fp8", "weight_block_size": [rows, cols]}, '
             'compressed-tensors float-quantized or fbgemm_fp8')


def _error(message: str, key: str, expected: str) -> RemapError:
    return RemapError(message, rule=f"config.json {key}", expected=expected)


@dataclass(frozen=True)
class Fp8Scheme:
    """How one FP8 form stores a quantized linear: e4m3 `weight` plus `scale` (and `activation`,
    a static activation scale, where activations are quantized with a fixed scale)."""

    method: str
    scale: str = "weight_scale_inv"
    block: tuple[int, int] | None = DEFAULT_FP8_BLOCK  # None: one scale per tensor or output channel
    per_channel: bool = False
    tensor_shape: tuple[int, ...] = ()  # a per-tensor scale's shape
    scale_dtype: str = F32
    activation: str | None = None
    official: bool = True  # only the linears DeepSeek's release quantizes (else every nn.Linear)
    skip: tuple[re.Pattern, ...] = field(default=(), compare=False)
    ignore: frozenset[str] = frozenset()  # exact module names left unquantized

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.block is not None:  # partial blocks at the edges included
            return (-(-rows // self.block[0]), -(-cols // self.block[1]))
        return (rows, 1) if self.per_channel else self.tensor_shape

    def quantizes(self, module: str, official: bool) -> bool:
        """Whether `module` (a Linear; `official`: DeepSeek's release quantizes it) is FP8 here."""
        if self.official and not official:
            return False
        return module not in self.ignore and not any(p.match(module) for p in self.skip)


def fp8_scheme(quantization_config: Mapping[str, Any] | None) -> Fp8Scheme:
    """The form of a quantization_config read by `read_quantization_config` (None: the official)."""
    q = quantization_config or {}
    method = q.get("quant_method", "fp8")
    if method == "compressed-tensors":
        group = next(iter(q["config_groups"].values()))
        channel = group["weights"]["strategy"] == "channel"
        static = (group.get("input_activations") or {}).get("dynamic") is False
        return Fp8Scheme(method, "weight_scale", None, channel, (1,), FLOAT, "input_scale" if static else None,
                         official=False, skip=_patterns(q.get("ignore"), "ignore", _compressed_tensors_pattern),
                         ignore=frozenset(k for k in q.get("ignore") or () if not k.startswith("re:")))
    skip = _patterns(q.get("modules_to_not_convert"), "modules_to_not_convert", _transformers_pattern)
    if method == "fbgemm_fp8":
        return Fp8Scheme(method, "weight_scale", None, per_channel=True, skip=skip)
    block = q.get("weight_block_size", DEFAULT_FP8_BLOCK)
    static = q.get("activation_scheme") == "static"
    return Fp8Scheme(method, block=None if block is None else (int(block[0]), int(block[1])), skip=skip,
                     activation="activation_scale" if static else None)


def read_quantization_config(value: Any) -> dict[str, Any] | None:
    """config.json's quantization_config, checked, with transformers' defaults filled in for
    quant_method fp8 (weight_block_size 128 x 128, scale_fmt float); null stays None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _error(f"quantization_config is {value!r}", "quantization_config", _EXPECTED)
    method = value.get("quant_method", "fp8")  # mlx-lm's own block has none: read as before
    if method not in METHODS:
        raise _error(f"quant_method is {method!r}", "quantization_config quant_method",
                     " or ".join(METHODS) + " (FP8 forms; other quantizations are not described)")
    if method == "compressed-tensors":
        _check_compressed_tensors(value)
    elif method == "fp8":
        value = _read_fine_grained(value)
    fp8_scheme(value)  # the module patterns compile
    return value


def _read_fine_grained(value: dict[str, Any]) -> dict[str, Any]:
    block = value.get("weight_block_size", list(DEFAULT_FP8_BLOCK))
    if block is not None and not (isinstance(block, (list, tuple)) and len(block) == 2
                                  and all(_positive(b) for b in block)):
        raise _error(f"quantization_config is {value!r}", "quantization_config",
                     'null, or an object with "weight_block_size": [rows, cols] (or null: one scale per tensor)')
    scale_fmt = value.get("scale_fmt", "float")
    if scale_fmt not in SCALE_FORMATS:
        raise _error(f"scale_fmt is {scale_fmt!r}", "quantization_config scale_fmt", " or ".join(SCALE_FORMATS))
    return {**value, "weight_block_size": None if block is None else list(block), "scale_fmt": scale_fmt}


def _check_compressed_tensors(value: Mapping[str, Any]) -> None:
    """llm-compressor's FP8 schemes: float-quantized e4m3, per tensor or per output channel, one
    form for every Linear (config groups that differ would need per-module forms)."""
    key = "quantization_config"
    if value.get("format") != "float-quantized":
        raise _error(f"compressed-tensors format is {value.get('format')!r}", f"{key} format",
                     "float-quantized (FP8); packed integer formats are not an FP8 form")
    groups = value.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _error(f"config_groups is {groups!r}", f"{key} config_groups", "one group or more")
    forms = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict) or group.get("targets") != ["Linear"] or weights.get("num_bits") != 8 \
                or weights.get("type") != "float" or weights.get("strategy") not in ("tensor", "channel") \
                or weights.get("symmetric") is False:
            raise _error(f"config group {name} is {group!r}", f"{key} config_groups",
                         'targets ["Linear"], weights of 8-bit symmetric floats per tensor or per channel')
        activations = group.get("input_activations")
        forms.add((weights["strategy"], isinstance(activations, dict) and activations.get("dynamic") is False))
    if len(forms) > 1:
        raise _error(f"config groups of {len(forms)} forms", f"{key} config_groups", "one form for every Linear")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# A pattern from config.json is matched against every linear's name: only short ones, without a
# repeated group and with at most two unbounded repeats ({n,m} counts as one), run in bounded time.
_REPEATED_GROUP = re.compile(r"\)[*+?{]")
_UNBOUNDED = re.compile(r"(?<!\\)[*+]|\{\d*,\d*\}")


def _patterns(entries: Any, key: str, translate) -> tuple[re.Pattern, ...]:
    """The regexes of a module list; `translate(entry)` gives (the entry's own regex, the pattern
    to match names with), or None for an entry that is not a regex."""
    if entries is None:
        return ()
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise _error(f"{key} is {entries!r}", f"quantization_config {key}", "a list of module names")
    out = []
    for entry in entries:
        if (translated := translate(entry)) is None:
            continue
        regex, pattern = translated
        if len(regex) > 200 or _REPEATED_GROUP.search(regex) or len(_UNBOUNDED.findall(regex)) > 2:
            raise _error(f"{key} entry {entry!r}", f"quantization_config {key}",
                         "a module name, or a short pattern without nested repetition")
        try:
            out.append(re.compile(pattern))
        except re.error as exc:
            raise _error(f"{key} entry {entry!r}: {exc}", f"quantization_config {key}", "a valid pattern") from None
    return tuple(out)


def _transformers_pattern(key: str) -> tuple[str, str]:
    """transformers' should_convert_module: the key as a regex from the start, ending at a module
    boundary ("layer.1" is not "layer.11"), or the key as a literal suffix of the name."""
    return key, rf"(?:{key})(?:(?<=\.)|(?=\.|$))|.*{re.escape(key)}$"


def _compressed_tensors_pattern(entry: str) -> tuple[str, str] | None:
    """compressed-tensors' ignore: "re:" entries are regexes matched from the start; the others
    exact names (Fp8Scheme.ignore)."""
    return (entry[3:], entry[3:]) if entry.startswith("re:") else None
