"""A stage's defaults are the same in a notebook call, on the command line and in validation.

The stage function's signature, its ``check_params`` and ``conf/<stage>/default.yaml`` must
agree on every parameter they share: a user who calls ``tardis_exp.consensus(adata)`` and one
who runs ``tardis-exp`` on the same data get the same programs.
"""

import inspect
from pathlib import Path

import pytest
import yaml

import tardis_exp
from tardis_exp import consensus, factorize, preprocess, score

CONF = Path(__file__).resolve().parents[1] / "conf"
STAGES = {"preprocess": preprocess, "factorize": factorize, "consensus": consensus, "score": score}


def _defaults(func) -> dict:
    return {n: p.default for n, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return list(a) == list(b)
    return a == b and type(a) is type(b) or (isinstance(a, float) and isinstance(b, (int, float)) and a == b)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_function_yaml_and_validation_defaults_agree(stage):
    yaml_defaults = yaml.safe_load((CONF / stage / "default.yaml").read_text())
    yaml_defaults = {k: v for k, v in yaml_defaults.items() if k != "_target_"}
    func = _defaults(STAGES[stage])
    check = _defaults(getattr(__import__(f"tardis_exp.{stage}", fromlist=["check_params"]), "check_params"))
    # every YAML key is a parameter of the function (what the CLI sets, a notebook can set)
    assert not set(yaml_defaults) - set(func), f"{stage}: YAML keys the function lacks"
    bad = [f"{stage}.{k}: function {func[k]!r} vs YAML {v!r}" for k, v in yaml_defaults.items()
           if not _same(func[k], v)]
    bad += [f"{stage}.{k}: check_params {check[k]!r} vs YAML {v!r}" for k, v in yaml_defaults.items()
            if k in check and not _same(check[k], v)]
    assert not bad, "\n".join(bad)
    assert hasattr(tardis_exp, stage)
