"""Benchmark generator: datasets drawn with their truth, and a runner that scores the K rule on them.

Every draw is a function of ``(family, seed)`` (and of the size caps): the family's
parameters -- planted K, spots, genes, depth, marker strength, overlap, dispersion -- are
drawn from ranges by a generator seeded with the family and the seed alone, the counts by a
second one, so capping the size changes the data but not the design. The truth is stored as
:func:`tardis_exp.synthetic.make_synthetic` stores it:

``obs['true_domain']``
    The spot's dominant planted program (``'P0'`` ...).
``obsm['true_usage']``
    Planted usages (spots x K), rows sum to 1.
``var['true_program']``
    The planted program a gene marks, ``'none'`` for the others.
``varm['true_programs']``
    The planted programs' gene profiles (genes x K).
``uns['benchmark']``
    ``{family, seed, planted_k, params}``.

Families (:data:`FAMILIES`): ``spatial`` (smooth domains over a shared background),
``cnmf`` (identity + activity programs, Kotliar et al. 2019), ``monti`` (Gaussian sample
classes, Monti et al. 2003), ``rare`` (programs held by 1-5 % of the spots) and ``batch``
(2-6 sections sharing spatial programs, gene-wise technical factors per section, one program
in one section only; scored by :func:`evaluate_batch`).

Seeds below :data:`DESIGN_SEEDS` are for designing rules; figures are reported on seeds at or
above it (fresh draws nobody tuned on). The runner::

    python -m tardis_exp.benchmark --family spatial --draws 20 --max-spots 1500

runs preprocess -> factorize -> consensus -> score with the stages' defaults on each draw
(the K search range widened to the families' 2..15, see :data:`SEARCH_RANGE`) and prints one
line per draw and the exact-K and within-one rates with 95 % Wilson intervals (``batch``: also
each shared program found once, the section-only program found and flagged). ``--write DIR``
writes the draws as h5ad instead and runs nothing (``batch``: one file per section).

Modules: :mod:`.families` (the draws), :mod:`.evaluate` (scoring a run against a draw's
truth), :mod:`.runner` (the stages on each draw, the command line).
"""

from __future__ import annotations

from .families import (
    DESIGN_SEEDS, FAMILIES, Family, K_RANGE, SEARCH_RANGE, SPOTS_RANGE, draw, draw_batch,
    draw_cnmf, draw_monti, draw_rare, draw_spatial, write_draw,
)
from .evaluate import (
    MATCH_R, MIN_SECTION_SHARE, evaluate_batch, match_programs, section_shares, usage_recovery,
    wilson,
)
from .runner import (
    main, parse_overrides, run_draw, run_matrix_rules, summarize,
)

__all__ = [
    "DESIGN_SEEDS", "FAMILIES", "Family", "K_RANGE", "MATCH_R", "MIN_SECTION_SHARE",
    "SEARCH_RANGE", "SPOTS_RANGE", "draw", "draw_batch", "draw_cnmf", "draw_monti", "draw_rare",
    "draw_spatial", "evaluate_batch", "main", "match_programs", "parse_overrides", "run_draw",
    "run_matrix_rules", "section_shares", "summarize", "usage_recovery", "wilson", "write_draw",
]
