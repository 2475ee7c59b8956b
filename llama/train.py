"""Train on a packed corpus with the one loop, no profile: ``python -m llama.train --train out/quickstart/corpus
--steps 100 --model kernels=torch`` (quick runs, tests, torchrun). The loop is :mod:`llama.training`; task CLIs
such as :mod:`llama.pretrain` and :mod:`llama.sft` size a run to the card first."""

from __future__ import annotations

from .training.cli import run_from_args

if __name__ == "__main__":
    raise SystemExit(run_from_args())
