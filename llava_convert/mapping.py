"""Declarative key-mapping tables (`mappings/*.toml`) and the strict planner that applies them.

A table is data: ordered rules (full-match regex with named groups -> target template), explicit drops,
synthesized targets, named transforms and `when` conditions on checkpoint facts. The planner maps every
source key, then checks the result against the target model's own parameters (built on the meta device)
and reports every problem at once, naming the table and rule.

How rules compose (among the rules whose `when` holds for the checkpoint):

* a drop wins: a key that matches a `drop = true` rule is dropped, whatever target rules it also matches,
  so a drop carves an exception out of a general rule (`...embeddings.position_ids` out of `vision_model.*`);
  when several drops match, the first in table order is the one recorded (and whose `warn` is shown);
* otherwise exactly one target rule must match: none is an unmapped key, two or more is an error;
* after mapping, every parameter of the target model must be produced exactly once (`check_targets`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tomllib

from .errors import LlavaConvertError, MappingError
from .plan import PlanEntry, TensorSource


def mappings_dir() -> Path:
    """`mappings/` ships inside the wheel as `llava_convert/mappings`; in a source checkout it is top level."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "mappings", here.parent / "mappings"):
        if candidate.is_dir():
            return candidate
    raise LlavaConvertError(f"mapping tables not found next to {here}")


@dataclass(frozen=True)
class Rule:
    table: str
    index: int
    source: re.Pattern | None
    target: str | None
    transform: str | None = None
    drop: bool = False
    warn: str | None = None
    when: tuple[tuple[str, Any], ...] = ()

    @property
    def where(self) -> str:
        kind = "synthesize" if self.source is None else "rule"
        return f"mappings/{self.table} {kind} #{self.index + 1}"

    def applies(self, facts: dict[str, Any]) -> bool:
        return all(facts.get(k) == v for k, v in self.when)


@dataclass(frozen=True)
class Table:
    name: str
    meta: dict[str, Any]
    rules: tuple[Rule, ...]
    synthesize: tuple[Rule, ...]


_RULE_KEYS = {"source", "target", "transform", "drop", "warn", "when"}


@cache
def load_table(name: str) -> Table:
    """A table from `mappings/` by file name, parsed and checked once per process."""
    path = mappings_dir() / name
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LlavaConvertError(f"{path}: mapping table not found") from None
    return parse_table(name, text, path)


def parse_table(name: str, text: str, path: Path | str | None = None) -> Table:
    path = path or name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LlavaConvertError(f"{path}: invalid TOML ({e})") from None

    def build(i: int, raw: dict[str, Any], synth: bool) -> Rule:
        where = f"{path} {'synthesize' if synth else 'rule'} #{i + 1}"
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise LlavaConvertError(f"{where}: unknown field(s) {sorted(unknown)}")
        if synth:
            if "target" not in raw or "transform" not in raw:
                raise LlavaConvertError(f"{where}: a synthesized entry needs target and transform")
            pattern = None
        else:
            if "source" not in raw or not (raw.get("drop") or "target" in raw):
                raise LlavaConvertError(f"{where}: a rule needs source and either target or drop = true")
            try:
                pattern = re.compile(raw["source"])
            except re.error as e:
                raise LlavaConvertError(f"{where}: bad regex {raw['source']!r} ({e})") from None
        return Rule(
            table=name,
            index=i,
            source=pattern,
            target=raw.get("target"),
            transform=raw.get("transform"),
            drop=bool(raw.get("drop", False)),
            warn=raw.get("warn"),
            when=tuple(sorted(raw.get("when", {}).items())),
        )

    rules = tuple(build(i, r, False) for i, r in enumerate(data.get("rule", [])))
    synth = tuple(build(i, r, True) for i, r in enumerate(data.get("synthesize", [])))
    return Table(name, data.get("meta", {}), rules, synth)


@dataclass
class MapResult:
    entries: list[PlanEntry]
    dropped: list[tuple[str, str]]  # (source key, rule)
    warnings: list[str]


def map_tensors(
    tensors: dict[str, TensorSource], table: Table, facts: dict[str, Any], problems: list[str]
) -> MapResult:
    """Map each source tensor through the table's rules (a matching drop wins; otherwise exactly one target
    rule must match). Problems are appended, not raised."""
    entries: list[PlanEntry] = []
    dropped: list[tuple[str, str]] = []
    warned: dict[str, list[str]] = {}
    rules = [r for r in table.rules if r.applies(facts)]
    for name in sorted(tensors):
        hits = [(r, m) for r in rules if (m := r.source.fullmatch(name))]
        if not hits:
            problems.append(f"{name}: no rule in mappings/{table.name} matches this key")
            continue
        drops = [r for r, _ in hits if r.drop]
        if drops:
            rule = drops[0]
            dropped.append((name, rule.where))
            if rule.warn:
                warned.setdefault(rule.warn, []).append(name)
            continue
        if len(hits) > 1:
            problems.append(f"{name}: matches several target rules ({', '.join(r.where for r, _ in hits)})")
            continue
        rule, m = hits[0]
        target = rule.target.format(**m.groupdict())
        entries.append(PlanEntry(target, (tensors[name],), rule.transform, rule.where))
    for rule in table.synthesize:
        if rule.applies(facts):
            entries.append(PlanEntry(rule.target, (), rule.transform, rule.where))
    warnings = [f"{msg} ({len(keys)} key(s), e.g. {keys[0]})" for msg, keys in warned.items()]
    return MapResult(entries, dropped, warnings)


def check_targets(entries: list[PlanEntry], expected: dict[str, tuple[int, ...]], model_name: str) -> list[str]:
    """Every expected parameter produced exactly once, nothing else produced, shapes equal."""
    problems: list[str] = []
    seen: dict[str, PlanEntry] = {}
    for e in entries:
        src = e.sources[0].name if e.sources else "(synthesized)"
        if e.target in seen:
            other = seen[e.target]
            osrc = other.sources[0].name if other.sources else "(synthesized)"
            problems.append(f"{e.target}: produced twice, from {osrc} ({other.rule}) and {src} ({e.rule})")
            continue
        seen[e.target] = e
        if e.target not in expected:
            problems.append(f"{e.target}: from {src} ({e.rule}) is not a parameter of {model_name}")
        elif e.shape is not None and tuple(e.shape) != tuple(expected[e.target]):
            problems.append(
                f"{e.target}: from {src} ({e.rule}) has shape {tuple(e.shape)} but {model_name} "
                f"expects {tuple(expected[e.target])} (do the weights match config.json?)"
            )
    for name in sorted(set(expected) - set(seen)):
        problems.append(f"{name}: expected by {model_name} but no source key maps to it")
    return problems


def raise_if(problems: list[str]) -> None:
    if problems:
        raise MappingError(problems)
