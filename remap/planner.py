"""Spec x source headers x config -> Plan: which rule makes which output tensor, from headers alone.

Rules are tried once per name shape (names alike but for their layer / expert numbers), their
ops built once per distinct value of the variables they read, so the 92k tensors of DeepSeek-V3
plan in seconds. A composed spec plans stage by stage: a later stage's sources are the earlier
stage's outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import ChainMap
from itertools import chain, compress, groupby, repeat, starmap
from operator import add, attrgetter, itemgetter
from typing import Any, Mapping

from remap import dtypes
from remap.errors import RemapError
from remap.expr import evaluate, evaluate_int, names_in
from remap.layouts import Layout, get_layout
from remap.name_shapes import narrowed, shaped
from remap.names import natural_key
from remap.namespace import namespace, translate_config
from remap.op_types import OpTypes
from remap.ops import Loss, TensorType
from remap.plan import Dropped, Output, Plan, Stage, Step
from remap.records import built, one_value
from remap.spec.load import Rule, Spec
from remap.spec.pattern import Pattern, ShapeMatch


def build_plan(
    spec: Spec,
    tensors: Mapping[str, TensorType],
    raw_config: Mapping[str, Any] | None,
    *,
    params: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    variant: str | None = None,
    source_variant: str | None = None,
    allow_nonfinite: bool = False,
) -> Plan:
    """The plan of `spec` (a composed spec: one stage per part) on tensors (name -> shape, dtype)
    and the source's config.json. `allow_nonfinite` lets quantizing ops take NaN and Inf."""
    if spec.parts:
        return _compose(spec, tensors, raw_config, params or {}, dtype, variant, source_variant, allow_nonfinite)
    return Plan((_stage(spec, tensors, raw_config, params, dtype, variant, source_variant, allow_nonfinite)[0],), spec.name)


def _stage(spec: Spec, tensors: Mapping[str, TensorType], raw_config: Mapping[str, Any] | None,
           params: Mapping[str, Any] | None, dtype: str | None, variant: str | None, source_variant: str | None,
           allow_nonfinite: bool = False, shapes: dict | None = None) -> tuple[Stage, "_Planner"]:
    """One plain spec (no parts) applied to the tensors (`shapes`: their name shapes, where
    known): a Stage, and the planner that made it (its outputs' types are a next stage's sources)."""
    raw = dict(raw_config or {})
    source, target = get_layout(spec.source_layout), get_layout(spec.target_layout)
    variants = {
        "source_variant": source_variant or spec.source_variant or source.variants[0],
        "target_variant": variant or spec.variant or target.variants[0],
    }
    for layout, key in ((source, "source_variant"), (target, "target_variant")):
        if variants[key] not in layout.variants:
            raise RemapError(f"layout '{layout.name}' has no variant '{variants[key]}'", expected=" | ".join(layout.variants))
    # raw keys too: a spec may stash a value in config.json for its inverse to read back
    names = namespace(spec, {**raw, **source.read_config(raw), **variants}, params)
    target_config = target.write_config(translate_config(spec.config, raw, names))
    if spec.scope == "target":
        names = namespace(spec, {**target_config, **target.read_config(target_config), **variants}, params)
    tensors = dict(tensors)
    planner = _Planner(tensors, names, dtypes.canonical(dtype) if dtype else None, target, allow_nonfinite, shapes)
    for rule in spec.rules:
        try:
            planner.add(rule)
        except RemapError as exc:
            raise exc.within(file=spec.where(rule), rule=rule.id) from None
    planner.finish()
    target.record(target_config, planner.steps)
    return Stage(spec, tensors, raw, target_config, names, steps=tuple(planner.steps),
                 dropped=tuple(planner.dropped), unmatched=tuple(planner.unmatched),
                 reused={name: tuple(rules) for name, rules in planner.reused.items()}, makers=planner.written,
                 variant_pinned=bool(variant or spec.variant)), planner


def _compose(spec, tensors, raw_config, params, dtype, variant, source_variant, allow_nonfinite) -> Plan:
    declared = {key for part in spec.parts for key in part.params}
    if set(params) - declared:
        raise RemapError(f"unknown parameter '{sorted(set(params) - declared)[0]}'", file=spec.path,
                         expected=", ".join(sorted(declared)) or "no parameters")
    stages: list[Stage] = []
    last, shapes = len(spec.parts) - 1, None
    for k, part in enumerate(spec.parts):
        stage, planner = _stage(
            part, tensors, raw_config,
            {key: v for key, v in params.items() if key in part.params},
            dtype if k == last else None,
            # the chosen target variant applies to every stage that writes the final layout
            (variant or spec.variant) if part.target_layout == spec.target_layout else None,
            (source_variant or spec.source_variant) if k == 0 else None,
            allow_nonfinite, shapes,
        )
        stages.append(stage)
        raw_config, tensors = stage.target_config, planner.output_types
        # outputs under names the stage read (an FP8 stage dequantizes in place): their shapes are known
        shapes = narrowed(planner.shapes, tensors) if k < last and tensors.keys() <= planner.tensors.keys() else None
    stages[-1] = dataclasses.replace(stages[-1], variant_pinned=stages[-1].variant_pinned or bool(spec.variant))
    return Plan(tuple(stages), spec.name)


class _Planner:
    """Applies a spec's rules, one at a time, to the source tensors: collects the stage's steps,
    drops and re-reads, and checks that no source is used twice and no output written twice."""

    def __init__(self, tensors: Mapping[str, TensorType], namespace: Mapping[str, Any], dtype: str | None,
                 target: Layout, allow_nonfinite: bool = False, shapes: dict | None = None):
        self.tensors, self.namespace, self.dtype, self.target = tensors, namespace, dtype, target
        self.steps: list[Step] = []
        self.dropped: list[Dropped] = []
        self.reused: dict[str, list[str]] = {}  # tensor -> rules re-reading it
        self.unmatched: list[str] = []
        self.used: dict[str, str] = {}  # source tensor -> the rule that consumed it
        self.written: dict[str, int] = {}  # output tensor -> index in `steps` of the step writing it
        self.output_types: dict[str, TensorType] = {}  # output -> its type (shared by alike outputs): a next stage's sources
        self.op_types = OpTypes(namespace, dtype, target, allow_nonfinite)
        # name shape (numbers as #) -> its names in natural order, their numbers
        self.shapes = shapes if shapes is not None else shaped(tensors)
        # the last pattern _matches answered, its answer, and what _kept read of those matches:
        # (id of one, dtype | shape) -> its names' values (the next rule of this pattern asks again)
        self.matched: tuple[str | None, list, dict[tuple[int, str], list]] = (None, [], {})

    @functools.cached_property
    def names(self) -> list[str]:
        """Every source name in natural order (only a pattern with literal digits needs them all)."""
        return sorted(self.tensors, key=natural_key)

    # -- rules ---------------------------------------------------------------------------
    def add(self, rule: Rule) -> None:
        {"map": self._map, "drop": self._drop, "fill": self._fill}[rule.kind](rule)

    def _matches(self, pattern: Pattern) -> list[ShapeMatch]:
        """Every source name `pattern` matches, shape by shape. Names alike but for their layer /
        expert numbers share a shape (`model.layers.#.mlp.experts.#.w1`); a `shapewise` pattern
        matches all of a shape or none of it, so one try per shape (~100 for the 92k tensors of
        DeepSeek-V3) rules out most names, and the rest bind by their numbers."""
        if not pattern.shapewise:
            return [ShapeMatch.one(n, b) for n in self.names if (b := pattern.match(n)) is not None]
        text, found, _ = self.matched
        if pattern.text != text:  # consecutive rules often share a pattern (FP8 weights, by two scale forms)
            found = [m for alike in self.shapes.values() if (m := pattern.match_alike(alike.names, alike.numbers))]
            self.matched = (pattern.text, found, {})
        return found

    def _bindings(self, pattern: Pattern, rule: Rule) -> list[tuple[str, dict]]:
        """(name, binding) of the source names matching `pattern` whose variables (and `dtype`
        and `shape`, the matched tensor's) pass the rule's `when`."""
        return [pair for match, keep in self._kept(pattern, rule) for pair in match.bindings(keep)]

    def _kept(self, pattern: Pattern, rule: Rule) -> list[tuple[ShapeMatch, list[int] | None]]:
        """The matches of `pattern`, each with the positions of the names the rule's `when`
        keeps (None: all of them)."""
        found = self._matches(pattern)
        if rule.when is None:
            return [(match, None) for match in found]
        # `when` reads a few variables; decide once per distinct value of those (61 layers x 256
        # experts ask the same `i < num_hidden_layers` 61 times, not 15,616), from the values'
        # columns, and bind only the names it keeps (a drop of `model.layers.{i}.{rest*}` past the
        # last layer reads all 92k names of DeepSeek-V3 and keeps none)
        read = names_in(rule.when)
        variables = list(dict.fromkeys(v for v in pattern.variables if v in read))
        tensors, decided, kept = self.tensors, {}, []
        fields = self.matched[2] if found is self.matched[1] else {}  # (kept only while its matches are)
        for match in found:
            columns = [match.column(v) for v in variables]
            for field in ("dtype", "shape"):
                if field in read:
                    if (id(match), field) not in fields:
                        fields[id(match), field] = list(map(attrgetter(field), map(tensors.__getitem__, match.names)))
                    columns.append(fields[id(match), field])
            # names differ only in the columns not of one value throughout (a shape's dtype often is):
            # those alone key them, one column as itself (an int's or str's hash is cheap; a tuple's is not)
            moving = [not one_value(column) for column in columns]
            varying = list(compress(columns, moving))
            keys = varying[0] if len(varying) == 1 else list(zip(*varying)) if varying else [()] * len(match.names)
            answers = {}
            for key in dict.fromkeys(keys):  # (in name order: an expression that fails, fails on the first name)
                parts = iter((key,) if len(varying) == 1 else key)
                values = tuple(next(parts) if moves else column[0] for column, moves in zip(columns, moving))
                if values not in decided:
                    scope = dict(zip(variables, values))
                    scope.update(zip([k for k in ("dtype", "shape") if k in read], values[len(variables):]))
                    decided[values] = bool(evaluate(rule.when, ChainMap(scope, self.namespace)))
                answers[key] = decided[values]
            passed = list(map(answers.__getitem__, keys))
            if all(passed):
                kept.append((match, None))
            elif any(passed):
                kept.append((match, list(compress(range(len(keys)), passed))))
        return kept

    def _map(self, rule: Rule) -> None:
        first, *others = rule.sources
        if rule.stack:
            return self._map_stacked(rule)
        for match, keep in self._kept(first, rule):
            if not self._steps_alike(rule, match, keep):
                for name, binding in match.bindings(keep):
                    self._step(rule, binding, [[name] + [p.fill(binding) for p in others]])

    def _map_stacked(self, rule: Rule) -> None:
        """A step per value of the variables other than the stacked one (every binding of one
        pattern has the same ones), its groups the stacked elements in index order."""
        first, *others = rule.sources
        rest = sorted(v for v in first.variables if v != rule.stack)
        stacks: dict[tuple, list[tuple]] = {}
        for match, keep in self._kept(first, rule):
            # the other sources' names from templates over each name's numbers (None: a pattern
            # reads a variable the first does not bind, which fill() reports)
            templates = [match.template(p) for p in others]
            for pattern in others if None in templates else ():
                pattern.fill(match.binding)  # raises: which variable is not bound
            columns = [match.column(v) for v in (*rest, rule.stack)]
            groups = zip(match.names, *[starmap(template.format, match.numbers) for template in templates])
            rows = zip(zip(*columns[:-1]), zip(columns[-1], groups))  # (key, (index, group)): 45k experts in C
            # names in order of their numbers: a key's rows mostly in one run, each run taken in C
            for key, run in groupby(rows if keep is None else map(list(rows).__getitem__, keep), itemgetter(0)):
                stacks.setdefault(key, []).extend(map(itemgetter(1), run))
        for key_values, members in stacks.items():
            members.sort(key=itemgetter(0))
            indices = list(map(itemgetter(0), members))
            if indices != list(range(len(indices))):
                missing = sorted(set(range(max(indices) + 1)) - set(indices))
                raise RemapError(f"cannot stack {{{rule.stack}}}: index {missing[0]} is missing",
                                 tensor=members[0][1][0], expected=f"{rule.stack} = 0..{max(indices)} all present")
            self._step(rule, dict(zip(rest, key_values)), list(map(itemgetter(1), members)))

    def _steps_alike(self, rule: Rule, match: ShapeMatch, keep: list[int] | None) -> bool:
        """The steps of one shape's names (those at `keep`) at once, where their ops are the same:
        names filled from templates over their numbers, types worked out once per distinct input
        types, clashes looked for with sets. False, with nothing recorded, where anything is out of
        the ordinary (a missing source, a clash, an op refusing its types): the caller then steps
        name by name, which raises the error where it always has."""
        reads = self.op_types.reads(rule)
        varying = [v for v, *_ in (*match.on_number, *match.over_numbers)]
        if len(match.names) < 2 or rule.unstack or rule.reuse or any(v in reads for v in varying):
            return False
        templates = [match.template(p) for p in (*rule.sources[1:], *rule.to)]
        if None in templates:
            return False
        names, numbers = match.names, match.numbers
        if keep is not None:
            names, numbers = [names[k] for k in keep], [numbers[k] for k in keep]
        number_columns = list(zip(*numbers))  # (a shape of several names has numbers: none is empty)
        own = match.template(rule.sources[0])  # a template giving back the names (an FP8 stage's `to`) reuses them
        filled = [names if template == own else _suffixed(names, template, own) or list(map(template.format, *number_columns))
                  for template in templates]
        sources, outputs = [names, *filled[:len(rule.sources) - 1]], filled[len(rule.sources) - 1:]
        try:
            types = [list(map(self.tensors.__getitem__, column)) for column in sources]
        except KeyError:
            return False
        # each name's row of source types, told apart by identity (equal types are one object); one
        # row for all where each source column is of one type (an FP8 shape's weights and scales)
        if not self.dtype and all(map(one_value, types)):
            rows, firsts = None, {(): 0}
        else:
            rows = list(zip(*[map(id, column) for column in types]))
            if self.dtype:  # whether --dtype casts an output depends on its name
                rows = list(zip(rows, [tuple(map(self.target.keeps_dtype, made)) for made in zip(*outputs)]))
            firsts = dict(zip(reversed(rows), range(len(rows) - 1, -1, -1)))  # each row's first name
        answers = {}
        try:
            ops = self.op_types.ops(rule, match.binding)
            for row, k in firsts.items():
                losses: list[Loss] = []
                answers[row] = (*self.op_types.types(ops, [c[k] for c in types], losses, [c[k] for c in outputs]), tuple(losses))
        except RemapError:
            return False
        made, read = list(chain.from_iterable(zip(*outputs))), list(chain.from_iterable(zip(*sources)))
        # (an empty dict is disjoint from anything: isdisjoint would look up each of a list's names in it)
        if (any(len(out) != len(rule.to) for out, _, _ in answers.values()) or len(set(made)) < len(made)
                or self.written and not self.written.keys().isdisjoint(made)
                or self.used and not self.used.keys().isdisjoint(read) and any(self.used[n] != rule.id for n in self.used.keys() & set(read))):
            return False
        indices = range(len(self.steps), len(self.steps) + len(names))  # each step's index, once per output
        self.written.update(zip(made, indices if len(rule.to) == 1 else chain.from_iterable(map(repeat, indices, repeat(len(rule.to))))))
        self.used.update(zip(read, repeat(rule.id)))  # (zip's pairs: no 92k-entry dict made on the way)
        per_name = [answers[()]] * len(names) if rows is None else list(map(answers.__getitem__, rows))  # (output types, ops, losses) of each
        made_types = list(chain.from_iterable(map(itemgetter(0), per_name)))
        self.output_types.update(zip(made, made_types))
        outs = built(Output, len(made), name=made, shape=map(attrgetter("shape"), made_types),
                     dtype=map(attrgetter("dtype"), made_types))
        self.steps += built(Step, len(per_name), rule=repeat(rule.id), outputs=zip(*[iter(outs)] * len(rule.to)),
                            groups=zip(zip(*sources)), ops=map(itemgetter(1), per_name), stacked=repeat(False),
                            take=repeat(None), fill=repeat(None), losses=map(itemgetter(2), per_name))
        return True

    def _step(self, rule: Rule, binding: dict[str, int], groups: list[list[str]]) -> None:
        tensors = self.tensors
        try:
            types = list(map(tensors.__getitem__, groups[0]))
            # every stacked element must look like the first: all at once, in C (a step of 256 experts)
            alike = len(groups) == 1 or (set(map(len, groups)) == {len(types)} and
                                         list(map(tensors.__getitem__, chain.from_iterable(groups[1:]))) == types * (len(groups) - 1))
        except KeyError:
            name, group = next((n, g) for g in groups for n in g if n not in tensors)
            raise RemapError(f"source tensor '{name}' is missing (needed together with '{group[0]}')",
                             expected="every `from` pattern to exist for each match of the first") from None
        ops = self.op_types.ops(rule, binding)
        if rule.unstack:
            return self._unstack(rule, binding, groups[0], ops, types)
        losses: list[Loss] = []
        for group in groups[1:] if not alike else ():  # (the first that does not, for the error)
            other = list(map(tensors.__getitem__, group))
            if other != types:
                raise RemapError(f"cannot stack '{group[0]}' {list(other[0].shape)} with '{groups[0][0]}' {list(types[0].shape)}")
        names = [p.fill(binding) for p in rule.to]
        types, ops = self.op_types.types(ops, types, losses, names)
        if len(types) != len(rule.to):
            raise RemapError(f"ops leave {len(types)} tensors for {len(rule.to)} `to` patterns",
                             expected=f"{len(rule.to)} tensors after the last op")
        if rule.stack:
            types = [t.with_shape((len(groups),) + t.shape) for t in types]
        outputs = tuple([Output(name, t.shape, t.dtype) for name, t in zip(names, types)])
        self._record(rule, groups, outputs)
        self.output_types.update(zip(names, types))
        self.steps.append(Step(rule=rule.id, outputs=outputs, groups=tuple(map(tuple, groups)), ops=ops, stacked=bool(rule.stack),
                               losses=tuple(losses)))

    def _unstack(self, rule: Rule, binding: dict, group: list[str], ops: tuple, types: list[TensorType]) -> None:
        counts = {t.shape[0] for t in types}
        if len(counts) != 1 or any(len(t.shape) < 2 for t in types):
            raise RemapError(f"cannot unstack {group}: leading axes {[list(t.shape) for t in types]} differ")
        sliced = [t.with_shape(t.shape[1:]) for t in types]
        losses: list[Loss] = []
        out_types, ops = self.op_types.types(ops, sliced, losses, [p.fill({**binding, rule.unstack: 0}) for p in rule.to])
        if len(out_types) != len(rule.to):
            raise RemapError(f"ops leave {len(out_types)} tensors for {len(rule.to)} `to` patterns")
        for index in range(counts.pop()):
            names = {**binding, rule.unstack: index}
            outputs = tuple(Output(p.fill(names), t.shape, t.dtype) for p, t in zip(rule.to, out_types))
            self._record(rule, [group] if index == 0 else [], outputs)
            self.output_types.update((o.name, t) for o, t in zip(outputs, out_types))
            self.steps.append(Step(rule=rule.id, outputs=outputs, groups=(tuple(group),), ops=ops, take=index, losses=tuple(losses)))

    def _record(self, rule: Rule, groups: list[list[str]], outputs: tuple[Output, ...]) -> None:
        written, used, rule_id = self.written, self.used, rule.id
        for output in outputs:
            if output.name in written:
                k = written[output.name]  # (not yet a step: written twice by the step being recorded)
                raise RemapError(f"output '{output.name}' is written by two rules: {self.steps[k].rule if k < len(self.steps) else rule_id} and this one",
                                 expected="each output tensor written by one rule")
            written[output.name] = len(self.steps)  # (the step recorded is appended next)
        names = list(chain.from_iterable(groups))
        if rule.reuse:
            for name in names:
                self.reused.setdefault(name, []).append(rule_id)
            return
        if not used.keys().isdisjoint(names):  # (checked in C: a stacked step reads 256 experts)
            name = next((n for n in names if used.get(n, rule_id) != rule_id), None)
            if name is not None:
                raise RemapError(f"source tensor '{name}' is matched by two rules: {used[name]} and this one",
                                 tensor=name, expected="each source tensor used once (mark tied weights `reuse: true`)")
        used.update(zip(names, repeat(rule_id)))

    def _drop(self, rule: Rule) -> None:
        for pattern in rule.sources:
            for name, binding in self._bindings(pattern, rule):
                if name in self.used:
                    raise RemapError(f"source tensor '{name}' is both dropped and used by {self.used[name]}", tensor=name)
                same_as = rule.same_as.fill(binding) if rule.same_as else None
                if same_as is not None and same_as not in self.tensors:
                    raise RemapError(f"`same_as` names '{same_as}', which the source does not have", tensor=name)
                self.used[name] = rule.id
                self.dropped.append(Dropped(name, rule.id, rule.claim, rule.reason, same_as, rule.equals))

    def _fill(self, rule: Rule) -> None:
        if rule.like:
            bindings = [b for _, b in self._bindings(rule.like, rule)]
        else:
            bindings = [{}] if rule.when is None or evaluate(rule.when, self.namespace) else []
        if rule.unstack:  # one tensor per element of the `like` tensor's axis 0 (each expert of a stack)
            bindings = [{**b, rule.unstack: k} for b in bindings for k in range(self.tensors[rule.like.fill(b)].shape[0])]
        for binding in bindings:
            shape = tuple(evaluate_int(s, {**self.namespace, **binding}) for s in rule.shape)
            like = rule.like.fill(binding) if rule.like else None
            dtype = dtypes.canonical(rule.dtype) if rule.dtype else (
                self.tensors[like].dtype if like else "F32")
            name = rule.to[0].fill(binding)
            outputs = (Output(name, shape, self.dtype if self.dtype and self.op_types.casts(dtype, name) else dtype),)
            self._record(rule, [], outputs)
            self.output_types[name] = TensorType(outputs[0].shape, outputs[0].dtype)
            self.steps.append(Step(rule=rule.id, outputs=outputs, fill=rule.fill))

    def finish(self) -> None:
        if not self.reused and len(self.used) == len(self.tensors):  # all used (used names are source names)
            self.unmatched = []
            return
        # sorting what is left gives the order of the sorted names, filtered (a stable sort)
        left = self.tensors.keys() - self.used.keys() - self.reused.keys()
        self.unmatched = sorted((n for n in self.tensors if n in left), key=natural_key) if left else []


def _suffixed(names: list[str], template: str, own: str) -> list[str] | None:
    """The names `template` gives, where it is `own` (the template giving back `names`) and a
    literal tail (an FP8 weight's `weight_scale_inv`): each name and the tail joined, in C, no
    format per name. None for any other template."""
    if own is None or not template.startswith(own):
        return None
    tail = template[len(own):]
    return None if "{" in tail or "}" in tail else list(map(add, names, repeat(tail)))
