"""The ``qexport build`` options of earlier versions, kept as hidden aliases: each sets one recipe
key (``--w-bits 4`` is ``--set bits.weights=4``). A table, turned into click options and into
``--set`` assignments; nothing else knows about them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click


def _switch(key: str, off: object) -> Callable[[Any], list[str]]:
    """A value that turns a technique off (e.g. --lowrank 0) or sets its key."""
    kind = key.split(".")[0]
    return lambda v: [f"{kind}=off"] if v == off else [f"{key}={v}"]


def _flag(kind: str) -> Callable[[Any], list[str]]:
    return lambda v: [f"{kind}=on"] if v else []


def _choice(kind: str, values: dict[str, str]) -> Callable[[Any], list[str]]:
    return lambda v: [f"{kind}={values[v]}"]


@dataclass(frozen=True)
class Alias:
    flag: str
    kind: Any  # click type; bool for a flag
    assign: Callable[[Any], list[str]]


ALIASES: tuple[Alias, ...] = (
    Alias("--w-bits", int, lambda v: [f"bits.weights={v}"]),
    Alias("--a-bits", int, lambda v: [f"bits.activations={v}"]),
    Alias("--timestep-wise", bool, lambda v: ["granularity.time_ranges=null"] if v else []),
    Alias("--time-ranges", int, lambda v: [f"granularity.time_ranges={v}"]),
    Alias("--smooth", click.Choice(["none", "asq", "tsq"]), _switch("smoothquant.mode", "none")),
    Alias("--alpha", str, lambda v: [f"smoothquant.alpha={v}"]),
    Alias("--asq-stat", click.Choice(["ema", "max", "range"]), lambda v: [f"smoothquant.statistic={v}"]),
    Alias("--smooth-ranges", int, lambda v: [f"smoothquant.shared_ranges={v}"]),
    Alias("--channel-shift", bool, _flag("channel_shift")),
    Alias("--weight-clip", click.Choice(["minmax", "mse"]), _choice("weight_clip", {"minmax": "off", "mse": "on"})),
    Alias("--weight-rounding", click.Choice(["nearest", "gptq"]), _choice("gptq", {"nearest": "off", "gptq": "on"})),
    Alias(
        "--act-observer",
        click.Choice(["minmax", "percentile", "mse", "search"]),
        _switch("activation_observer.method", "minmax"),
    ),
    Alias("--replay-prompts", int, lambda v: [f"replay.prompts={v}"]),
    Alias("--lowrank", int, _switch("lowrank.rank", 0)),
    Alias("--mixed-precision", float, _switch("mixed_precision.budget", 0.0)),
    Alias("--rotate", bool, _flag("head_rotation")),
    Alias("--online-rotation", int, _switch("online_rotation.block", 0)),
    Alias("--rotation-choice", click.Choice(["adaptive", "all"]), lambda v: [f"online_rotation.choice={v}"]),
    Alias("--precompute-kv", bool, _flag("precompute_kv")),
    Alias("--quantize-attention", bool, _flag("attention")),
)


def _dest(alias: Alias) -> str:
    return "old_" + alias.flag.lstrip("-").replace("-", "_")


def alias_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add every alias to a click command as a hidden option (its value reaches the command in
    ``**old``, None / False when not given)."""
    for alias in reversed(ALIASES):
        if alias.kind is bool:
            command = click.option(alias.flag, _dest(alias), is_flag=True, default=False, hidden=True)(command)
        else:
            command = click.option(alias.flag, _dest(alias), type=alias.kind, default=None, hidden=True)(command)
    return command


def alias_assignments(values: dict[str, Any]) -> list[str]:
    """The ``--set`` assignments of the aliases given on the command line, in the table's order
    (granularity first, then the techniques, each technique's mode before its other keys)."""
    out: list[str] = []
    for alias in ALIASES:
        value = values.get(_dest(alias))
        if value is not None and value is not False:
            out.extend(alias.assign(value))
    return out
