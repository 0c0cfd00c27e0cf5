"""Progress bars that show on a terminal and stay quiet in logs and CI."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, total=None, desc=None, enabled=None, **kwargs):
    """A tqdm bar; ``enabled=None`` shows it only when stderr is a terminal.

    ``TARDIS_EXP_PROGRESS=0/1`` forces it off/on.
    """
    env = os.environ.get("TARDIS_EXP_PROGRESS")
    if env is not None:
        enabled = env not in ("0", "false", "False", "")
    elif enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)
