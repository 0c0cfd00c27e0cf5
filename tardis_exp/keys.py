"""Where each stage writes in the AnnData, from one name (scanpy's ``key_added`` convention).

The defaults are the keys the stages have always written (the seed's ``obsm['X_nmf']``,
``obs['nmf_cluster_{i}']``); another ``key_added`` puts a second result beside the first,
and the next stage reads it by the same name (``consensus(adata, nmf_key=...)``,
``score(adata, consensus_key=...)``). As scanpy's ``neighbors`` does, a non-default name
prefixes every key it owns.
"""

from __future__ import annotations

from dataclasses import dataclass

NMF = "nmf"
CONSENSUS = "nmf_consensus"
SCORE = "nmf"


def _name(value, arg: str) -> str:
    if not isinstance(value, str) or not value.strip():
        from .errors import ConfigError

        raise ConfigError(f"{arg} must be a non-empty key name, got {value!r}")
    return value


@dataclass(frozen=True)
class NMFKeys:
    """What :func:`tardis_exp.factorize.factorize` writes under ``key_added``."""

    base: str = NMF

    @property
    def uns(self) -> str:  # every replicate: components, errors, n_iter, params
        return self.base

    @property
    def usage(self) -> str:  # obsm: W of the best replicate
        return f"X_{self.base}"

    @property
    def components(self) -> str:  # uns: H of the best replicate
        return f"X_{self.base}_components"

    @property
    def replicates(self) -> str:  # obsm: every replicate's W side by side
        return f"X_{self.base}_replicates"


@dataclass(frozen=True)
class ConsensusKeys:
    """What :func:`tardis_exp.consensus.consensus` writes under ``key_added``."""

    base: str = CONSENSUS

    @property
    def uns(self) -> str:
        return self.base

    @property
    def usage(self) -> str:  # obsm: usages refit on the consensus spectra
        return f"X_{self.base}"

    @property
    def background(self) -> str:  # obsm: the shared background's usage (the default keeps its seed-era name)
        return "X_nmf_background" if self.base == CONSENSUS else f"X_{self.base}_background"


@dataclass(frozen=True)
class ScoreKeys:
    """What :func:`tardis_exp.score.score` writes under the prefix ``key_added``."""

    prefix: str = SCORE

    def score(self, i: int) -> str:  # obs: z-scored score of program i (the seed's nmf_cluster_{i})
        return f"{self.prefix}_cluster_{i}"

    @property
    def cluster(self) -> str:  # obs: argmax of the scores (the seed's tutorial)
        return f"{self.prefix}_cluster"

    @property
    def program(self) -> str:  # obs: argmax of the consensus usages
        return f"{self.prefix}_program"

    @property
    def programs(self) -> str:  # uns: top genes per program
        return f"{self.prefix}_programs"

    @property
    def metrics(self) -> str:  # uns: silhouette, Moran's I, truth
        return f"{self.prefix}_metrics"

    @property
    def samples(self) -> str:  # uns: programs x samples (share of usage, Moran's I per section)
        return f"{self.prefix}_samples"


def nmf_keys(key: str = NMF, arg: str = "key_added") -> NMFKeys:
    return NMFKeys(_name(key, arg))


def consensus_keys(key: str = CONSENSUS, arg: str = "key_added") -> ConsensusKeys:
    return ConsensusKeys(_name(key, arg))


def score_keys(key: str = SCORE, arg: str = "key_added") -> ScoreKeys:
    return ScoreKeys(_name(key, arg))


@dataclass(frozen=True)
class ResultKeys:
    """The three stages' keys of one result (what the figures and the run folder read)."""

    nmf: NMFKeys = NMFKeys()
    consensus: ConsensusKeys = ConsensusKeys()
    score: ScoreKeys = ScoreKeys()


def result_keys(nmf_key: str = NMF, consensus_key: str = CONSENSUS, score_key: str = SCORE) -> ResultKeys:
    return ResultKeys(nmf_keys(nmf_key, "nmf_key"), consensus_keys(consensus_key, "consensus_key"),
                      score_keys(score_key, "score_key"))
