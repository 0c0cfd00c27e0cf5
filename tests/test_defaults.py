"""A parameter's default is the same in a notebook call, on the command line and in validation.

Each config group declares its parameters once (``tardis_exp.params``). For every parameter
of every stage this checks that the three places a default can be seen agree with that
declaration: the stage function's signature, the config Hydra composes from ``conf/`` (what
``tardis-exp`` runs with), and what validation fills in for a key it is not given -- and
that the default passes validation. The second half changes one of the three at a time
and shows that the comparison catches it: the test cannot pass on a drifted default.
"""

import copy
import inspect
import types

import pytest

import tardis_exp
from tardis_exp import params as P
from tardis_exp.consensus import check_params as check_consensus
from tardis_exp.errors import ConfigError
from tardis_exp.factorize import check_params as check_factorize
from tardis_exp.preprocess import check_params as check_preprocess
from tardis_exp.score import check_params as check_score

STAGES = {"preprocess": (tardis_exp.preprocess, check_preprocess),
          "factorize": (tardis_exp.factorize, check_factorize),
          "consensus": (tardis_exp.consensus, check_consensus),
          "score": (tardis_exp.score, check_score)}
# stage arguments that are calls' business, not configuration
NOT_CONFIG = {"progress", "copy", "key_added", "nmf_key", "consensus_key",  # keys: calls' business (tardis_exp.keys)
              "sample_key"}  # data.sample_key, which the pipeline passes
# what validation needs even to start (factorize.n_components is required there)
REQUIRED = {"factorize": {"n_components": 10}}


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return list(a) == list(b)
    return a == b


def _signature_defaults(func) -> dict:
    return {n: p.default for n, p in inspect.signature(func).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in NOT_CONFIG}


def disagreements(stage, func, composed, checker) -> list[str]:
    """Every parameter whose function, CLI or validation default differs from the declaration."""
    declared = P.defaults(P.PARAMS[stage])
    sig = _signature_defaults(func)
    checked = checker(**REQUIRED.get(stage, {}))
    bad = [f"{stage}: function parameters {sorted(set(sig) ^ set(declared))} not declared (or missing)"
           ] if set(sig) != set(declared) else []
    bad += [f"{stage}: CLI config keys {sorted(set(composed) ^ set(declared))} not declared (or missing)"
            ] if set(composed) != set(declared) else []
    for name, value in declared.items():
        if name in sig and not _same(sig[name], value):
            bad.append(f"{stage}.{name}: function default {sig[name]!r} != declared {value!r}")
        if name in composed and not _same(composed[name], value):
            bad.append(f"{stage}.{name}: CLI default {composed[name]!r} != declared {value!r}")
        if name not in REQUIRED.get(stage, {}) and not _same(checked.get(name), value):
            bad.append(f"{stage}.{name}: validation default {checked.get(name)!r} != declared {value!r}")
    return bad


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    from conftest import compose_config

    return compose_config(tmp_path_factory.mktemp("defaults"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_function_cli_and_validation_defaults_agree(stage, composed):
    func, checker = STAGES[stage]
    assert not disagreements(stage, func, composed[stage], checker)
    # the declared defaults are valid values, and the run uses what the CLI composed
    checker(**composed[stage])


@pytest.mark.parametrize("group", ["tracking", "cache"])
def test_tracking_and_cache_groups_compose_from_their_declaration(group, composed):
    declared = P.defaults(P.PARAMS[group])
    assert set(composed[group]) == set(declared)
    # paths are interpolated (${paths...}); every other default is the declared value
    for k, v in declared.items():
        if not (isinstance(v, str) and "${" in v):
            assert _same(composed[group][k], v), k
    P.check(group, composed[group])


def _with_default(func, name, value):
    """A copy of ``func`` whose default for keyword ``name`` is ``value`` (a signature edited alone)."""
    g = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    g.__kwdefaults__ = {**func.__kwdefaults__, name: value}
    return g


def _other(value):
    """A value different from ``value`` (of a plausible type)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_changed"
    if value is None:
        return 7
    return [*value, "x"] if isinstance(value, (list, tuple)) else {"x": 1}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_one_default_changed_alone_is_caught(stage, composed):
    """Each of the three places, changed alone for every parameter, makes the comparison fail."""
    func, checker = STAGES[stage]
    for name, value in P.defaults(P.PARAMS[stage]).items():
        # the function's signature
        bad = disagreements(stage, _with_default(func, name, _other(value)), composed[stage], checker)
        assert any(f"{stage}.{name}: function default" in b for b in bad), (stage, name)
        # the CLI: a YAML preset (conf/<stage>/default.yaml) that sets the key to something else
        cli = copy.deepcopy(composed[stage])
        cli[name] = _other(value)
        bad = disagreements(stage, func, cli, checker)
        assert any(f"{stage}.{name}: CLI default" in b for b in bad), (stage, name)
        # validation that fills in another default
        if name not in REQUIRED.get(stage, {}):
            def drifted(**kw):
                return {**checker(**kw), name: _other(value)}
            bad = disagreements(stage, func, composed[stage], drifted)
            assert any(f"{stage}.{name}: validation default" in b for b in bad), (stage, name)
    # and a parameter added to the function but not declared
    extra = types.FunctionType(func.__code__, func.__globals__)
    sig = inspect.signature(func)
    extra.__signature__ = sig.replace(parameters=[*sig.parameters.values(), inspect.Parameter(
        "new_param", inspect.Parameter.KEYWORD_ONLY, default=1)])
    assert any("not declared" in b for b in disagreements(stage, extra, composed[stage], checker))


def test_changing_the_declaration_moves_all_three(tmp_path, monkeypatch):
    """One edit, in params.py, changes the function, the CLI and the validation default together."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    src = (REPO / "tardis_exp" / "params.py").read_text()
    line = '    n_replicates: Any = integer(10, "independent restarts'
    assert src.count(line) == 1, "the declaration of factorize.n_replicates moved; update this test"
    pkg = tmp_path / "pkg" / "tardis_exp"
    shutil.copytree(REPO / "tardis_exp", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "params.py").write_text(src.replace(line, line.replace("integer(10,", "integer(7,")))
    code = (f"import sys, inspect; sys.path.append({str(REPO / 'tests')!r});"
            "import tardis_exp; from conftest import compose_config; "
            "from tardis_exp.factorize import check_params;"
            "f = inspect.signature(tardis_exp.factorize).parameters['n_replicates'].default;"
            f"c = compose_config({str(tmp_path / 'root')!r})['factorize']['n_replicates'];"
            "v = check_params(n_components=3)['n_replicates'];"
            "print(f, c, v, tardis_exp.__file__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    f, c, v, where = out.stdout.split()
    assert where.startswith(str(pkg))
    assert (f, c, v) == ("7", "7", "7")


def test_a_bad_declared_default_would_fail_validation():
    """Validation reads the declared checks: a key outside its range names the key."""
    with pytest.raises(ConfigError, match="factorize.n_replicates must be an integer >= 1"):
        check_factorize(n_components=3, n_replicates=0)
    with pytest.raises(ConfigError, match=r"preprocess.normalize='z' is unknown; choose one of \('log1p'"):
        check_preprocess(normalize="z")


def test_parameter_reference_is_generated_from_the_declarations():
    """docs/usage.md's parameter reference is ``params.describe``'s table, built with the docs:
    every key of every group with its declared default and every allowed choice."""
    import json
    import re
    from pathlib import Path

    for group, params in P.PARAMS.items():
        table = P.describe(group)
        rows = {r.split("|")[1].strip(" `"): r for r in table.splitlines()[2:]}
        assert set(rows) == {f"{group}.{n}" for n in P.names(params)}
        for name, default in P.defaults(params).items():
            row = rows[f"{group}.{name}"]
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            assert f"`{shown}`" in row, (row, default)
        for f in P.dataclasses.fields(params):
            for c in f.metadata.get("choices", ()):
                assert f"`{c}`" in rows[f"{group}.{f.name}"]
    usage = (Path(__file__).resolve().parent.parent / "docs" / "usage.md").read_text()
    assert "{include} generated/parameters.md" in usage
    # no hand-written copy of the per-parameter defaults beside it (the old table listed `solver` (`mu`/`cd`))
    assert not re.search(r"`n_components` \(\d+\)", usage)
