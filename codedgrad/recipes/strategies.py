"""The ``strategy`` config group as a Lightning strategy object.

``ddp`` is Lightning's own DDPStrategy. Any other name is looked up in Lightning's strategy registry,
where ``import codedgrad.lightning`` registers ``balanced`` and ``coded``. That import is guarded:
while the package does not exist yet, ``ddp`` still runs and the other names fail with a message
saying why.

The group's keys other than ``name`` are the strategy's constructor arguments (plain keys, no
``_target_``). A key the constructor does not take is left out with a warning, so a config written
ahead of a strategy keeps working while the strategy's signature settles; ``emulate`` (the cluster's
:class:`~codedgrad.emulate.Heterogeneity`) is passed when the constructor takes it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from pytorch_lightning.strategies import DDPStrategy, Strategy, StrategyRegistry

from codedgrad.emulate import Heterogeneity

__all__ = ["build_strategy", "emulation_unit", "takes_emulation"]

_SAMPLE_UNIT = {"balanced"}  # strategies known to draw one emulated delay per sample (see emulation_unit)

log = logging.getLogger(__name__)

try:
    import codedgrad.lightning  # noqa: F401  (registers "balanced" and "coded" with Lightning)

    _MISSING: ModuleNotFoundError | None = None
except ModuleNotFoundError as error:
    if not (error.name or "").startswith("codedgrad.lightning"):
        raise  # a missing dependency inside the package is a real error, not "not written yet"
    _MISSING = error


def _strategy_class(name: str) -> tuple[type, dict[str, Any]]:
    if name not in StrategyRegistry and _MISSING is None:
        # A strategy module that registers itself when imported but is not (yet) imported by the
        # package's __init__; a name with no such module falls through to the error below.
        try:
            importlib.import_module(f"codedgrad.lightning.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"codedgrad.lightning.{name}":
                raise
    if name not in StrategyRegistry:
        hint = f" (import codedgrad.lightning failed: {_MISSING})" if _MISSING else ""
        known = ", ".join(sorted(StrategyRegistry))
        raise ValueError(f"strategy.name: {name!r} is not a registered Lightning strategy{hint}; known: {known}")
    entry = StrategyRegistry[name]
    return entry["strategy"], dict(entry["init_params"])


def takes_emulation(name: str) -> bool:
    """Whether strategy ``name`` emulates heterogeneity itself (its constructor takes ``emulate``)."""
    if name == "ddp":
        return False
    cls, _ = _strategy_class(name)
    return "emulate" in inspect.signature(cls.__init__).parameters


def emulation_unit(name: str) -> str:
    """What strategy ``name`` draws one emulated delay for: ``"sample"`` or ``"task"``.

    A strategy class may say so itself with an ``emulation_unit`` attribute; otherwise ``balanced`` is
    known to draw per sample and every other strategy (``coded``: ``CodedDataParallel``) per task.
    """
    cls, _ = _strategy_class(name)
    return getattr(cls, "emulation_unit", "sample" if name in _SAMPLE_UNIT else "task")


def build_strategy(cfg: Mapping[str, Any], emulate: Heterogeneity | None = None) -> Strategy:
    """The strategy the ``strategy`` config group names, built from its keys.

    Args:
        cfg: ``name`` plus constructor arguments. ``timeout`` is in seconds; it becomes the
            ``timedelta`` DDPStrategy wants when the strategy hands it on to DDPStrategy (``ddp``, and
            subclasses that take it through ``**kwargs``).
        emulate: the emulation, passed to strategies whose constructor takes ``emulate``.
    """
    args = {k: v for k, v in cfg.items() if k != "name"}
    name = cfg["name"]
    if name == "ddp":
        timeout = args.pop("timeout", None)
        if timeout is not None:
            args["timeout"] = timedelta(seconds=float(timeout))
        return DDPStrategy(**args)
    cls, init_params = _strategy_class(name)
    parameters = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unused = sorted(k for k in args if k not in parameters and not open_ended)
    if unused:
        log.warning("strategy=%s: its constructor takes no %s; left out", name, ", ".join(unused))
    kwargs = {**init_params, **{k: v for k, v in args.items() if k not in unused}}
    if "timeout" in kwargs and "timeout" not in parameters and issubclass(cls, DDPStrategy):
        kwargs["timeout"] = timedelta(seconds=float(kwargs["timeout"]))
    if "emulate" in parameters:
        kwargs["emulate"] = emulate
    return cls(**kwargs)
