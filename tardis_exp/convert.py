"""``python -m tardis_exp.convert in.h5ad out.zarr``: an h5ad file as a zarr store, X copied in row blocks.

zarr is the store ``data.backend=dask`` reads fastest (chunked, parallel reads); see
docs/large-data.md. ``obs``, ``var``, ``obsm`` and ``uns`` are copied, layers are not.
"""

from __future__ import annotations

import argparse
import sys

from .errors import TardisError
from .lazy import DEFAULT_CHUNK_ROWS, convert


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tardis_exp.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="input .h5ad file")
    ap.add_argument("dst", help="output .zarr folder (must not exist)")
    ap.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                    help=f"spots per block read and written at a time (default {DEFAULT_CHUNK_ROWS})")
    a = ap.parse_args(argv)
    if a.chunk_rows < 1:
        ap.error(f"--chunk-rows must be >= 1, got {a.chunk_rows}")
    try:
        out = convert(a.src, a.dst, chunk_rows=a.chunk_rows)
    except TardisError as e:
        print(f"tardis_exp.convert: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
