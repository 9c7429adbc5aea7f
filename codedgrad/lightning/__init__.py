"""Lightning strategies of codedgrad; importing this package registers them by name.

``import codedgrad.lightning`` makes ``Trainer(strategy="balanced")`` available
(:class:`~codedgrad.lightning.balanced.BalancedStrategy`: DDP with per-rank batch sizes from measured
speeds and the exact weighted gradient) and ``Trainer(strategy="coded")``
(:class:`~codedgrad.lightning.coded.CodedStrategy`: coded, heterogeneity-aware steps with exact gradients).
"""

from __future__ import annotations

from pytorch_lightning.strategies import StrategyRegistry

from codedgrad.lightning.balanced import BalancedStrategy
from codedgrad.lightning.coded import CodedStrategy

__all__ = ["BalancedStrategy", "CodedStrategy"]


def _register_strategies() -> None:
    """Add codedgrad's strategies to Lightning's registry (idempotent: a re-import changes nothing)."""
    BalancedStrategy.register_strategies(StrategyRegistry)
    CodedStrategy.register_strategies(StrategyRegistry)


_register_strategies()
