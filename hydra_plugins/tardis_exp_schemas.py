"""Registers tardis_exp's config schemas with Hydra whenever tardis_exp's ``conf/`` is composed.

``conf/<group>/default.yaml`` builds on ``<group>/schema``, a structured config that
``tardis_exp.params`` registers in Hydra's ConfigStore when ``tardis_exp`` is imported (the
``tardis-exp`` command does). Hydra imports every module under ``hydra_plugins`` before it
composes, so this search-path plugin also covers Hydra's compose API
(``initialize_config_dir(<checkout>/conf)``, ``initialize_config_module('tardis_exp.conf')``)
in a process that has not imported ``tardis_exp``. It imports ``tardis_exp`` only when the
search path holds its config (other Hydra apps in the environment do not pay the import).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

_MARKER = ("preprocess", "default.yaml")  # a group file that names tardis_exp's schema


def _is_tardis_conf(path: str) -> bool:
    if path.startswith("pkg://"):
        return path[len("pkg://"):].strip("/").replace("/", ".") == "tardis_exp.conf"
    if path.startswith("file://"):
        path = path[len("file://"):]
    try:
        return "tardis_exp/params.py" in Path(path, *_MARKER).read_text()
    except OSError:
        return False


class TardisExpSchemas(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            p = element.path or ""
            if element.provider != "schema" and _is_tardis_conf(p if "://" in p else f"file://{p}"):
                from tardis_exp.params import register_configs

                register_configs()
                return
