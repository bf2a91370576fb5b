"""The quality benchmark's parts (``benchmarks/quality_bench.py`` is the entry point).

- :mod:`quality.settings`: per-preset sizes, the levers, the pretraining and
  finetuning configs built from them.
- :mod:`quality.runs`: pretraining (or reusing a finished run), finetuning runs with
  their learning curves, and the incremental results file.
- :mod:`quality.positions`: held-out position prediction and its baselines.
- :mod:`quality.plateau`: full finetuning at the plateau, a thin caller of ``voco
  compare`` (:mod:`voco_core.evaluation.compare`).
- paired differences with confidence intervals and curve areas come from
  :mod:`voco_core.evaluation.stats` (``voco compare`` uses them too).
- :mod:`quality.report`: summaries, markdown tables and figures from a results file.
"""
