"""`remap inspect`, `remap verify` and `remap specs` printed for a reader (their JSON is plain data,
made in remap/cli.py)."""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Mapping, Sequence

from rich.console import Console

from remap.names import collapse_sorted, natural_key
from remap.render import escape
from remap.render.table import print_table

# The config keys `remap inspect` shows (the JSON has them all).
CONFIG_SUMMARY = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                  "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "vocab_size")


def render_inspect(summary: Mapping[str, Any], tensors: Sequence[Any], detection: Any, console: Console, *,
                   full: bool = False) -> None:
    """The tensors (alike but for layer indices collapsed into one row unless `full`), the config
    keys that say which model it is, and the detected layout."""
    groups = ([(t.name, [t]) for t in sorted(tensors, key=lambda t: natural_key(t.name))] if full
              else collapse_sorted(tensors, attrgetter("name"), attrgetter("shape", "dtype")))  # (shapes are tuples)
    # a group's members share shape and dtype (the collapse key): their bytes are one's times their count
    rows = [(escape(name), str(list(members[0].shape)), members[0].dtype, f"{len(members) * members[0].nbytes / 2**20:.2f}")
            for name, members in groups]
    title = f"{escape(summary['source'])}: {summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB"
    print_table(console, ("tensor", "shape", "dtype", "MiB"), rows, title=title)
    shown = ", ".join(f"{k}={v}" for k, v in summary["config"].items() if k in CONFIG_SUMMARY)
    console.print(f"config: {escape(shown) or '(no config.json)'}")
    if detection.inferred:
        assumed = ", ".join(f"{k}={detection.raw_config[k]}" for k in summary["assumed"])
        console.print("config read off the tensors' shapes (no config.json)"
                      + (f"; assumed {escape(assumed)}: override with --set KEY=VALUE" if assumed else ""), soft_wrap=True)
    mp = f", mp={summary['mp']} (model-parallel files, read as whole tensors)" if summary["mp"] > 1 else ""
    described = escape(summary["detail"])
    console.print(f"layout: [bold]{described}[/]{mp}" if detection.layout else f"[red]layout: {described}[/]")


def render_verify(result: Any, console: Console) -> None:
    for problem in result.problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
    status = ("[green]OK[/]" if result.hashed else "[yellow]OK, headers only[/]") if result.ok else "[red]NOT OK[/]"
    evidence = f" ({'; '.join(result.evidence)})" if result.evidence else ""
    console.print(f"{status}: {result.checked_files} files, {result.checked_tensors} tensors checked{escape(evidence)}")


def render_specs(specs: Sequence[Any], console: Console, *, full: bool = False) -> None:
    """One row per spec: its name, from -> to, and the first sentence of its description (`full`:
    all of it)."""
    rows = [(escape(s.name), f"{s.source_layout} -> {s.target_layout}",
             escape(" ".join(s.description.split()) if full else first_sentence(s.description))) for s in specs]
    print_table(console, ("spec", "from -> to", "what it does"), rows, no_wrap=("spec", "from -> to"))
    if not full:
        console.print("(the first sentence of each; `remap specs --full` for the whole description)")


def first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence: followed by a space or the end, outside
    brackets, not the one in "e.g." or "i.e." (a spec's description names files like mlx_lm.convert)."""
    text = " ".join(text.split())
    depth = 0
    for k, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if (char == "." and depth <= 0 and text[k + 1:k + 2] in ("", " ")
                and not text[:k + 1].endswith(("e.g.", "i.e."))):
            return text[:k + 1]
    return text
