"""Both Lightning strategies' torchrun checks in one launch: balanced_worker.py's, then coded_lightning_worker.py's.

One launch instead of two saves a launch's start-up (torchrun, and three interpreters importing torch
and Lightning: ≈ 6 s on two cores). Both run on 3 ranks in the one process group the first Trainer
creates, as each worker's own Trainers already share it; the balanced checks go first, since the
coded ones end with a SIGTERM. A failure in the balanced part fails the launch before the coded part.

Usage: ``torchrun --nproc-per-node 3 lightning_worker.py OUT_DIR``; writes ``OUT_DIR/balanced/rank{r}.json``
and ``OUT_DIR/coded/rank{r}.json``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from tests.distributed import balanced_worker, coded_lightning_worker


def main() -> None:
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and logging is noise here
    out_dir = Path(sys.argv[1])
    balanced_worker.run(out_dir / "balanced")
    coded_lightning_worker.main_torchrun(out_dir / "coded")


if __name__ == "__main__":
    main()
