"""``python -m tardis_exp.benchmark``: the runner (:func:`tardis_exp.benchmark.runner.main`)."""

from .runner import main

main()
