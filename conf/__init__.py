"""The Hydra config tree (``conf/`` in a checkout), shipped in the package as ``tardis_exp.conf``."""
