#!/usr/bin/env python3
"""Storage on the realistic dedup series (perf/benchlib/series.py): bytes a registry stores for
series-1..4 as gzip OCI and as nydus-py without / with chunk dictionaries, plus the chunk-level
dedup of fixed-size vs content-defined chunking (offline: unique uncompressed bytes).

    sudo .venv/bin/python perf/series.py [--skip-cdc] [--only MODES] [--work DIR] [--json FILE]
                                                           → perf/results/series.json + a table

Modes: gzip (always), estargz, plain / prev / all (fixed-size chunks: no dictionary, the
previous image, every earlier image as --chunk-dict), cdc-plain / cdc-prev / cdc-all (the same
with `--chunker cdc`, real format-v3 conversions), cdc (the offline pyfastcdc file-by-file
analysis).

"Stored" counts each distinct blob once (layer digest), as a registry does; nydus-py counts its
bootstraps too. Conversions are OCI layout → OCI layout (no registry), one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import seriesrun                             # noqa: E402
from benchlib.util import CACHE, ROOT                      # noqa: E402



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-cdc", action="store_true")
    ap.add_argument("--only", default="gzip,estargz,plain,prev,all,cdc-plain,cdc-prev,cdc-all,cdc")
    ap.add_argument("--work", type=Path, default=CACHE / "series-out", help="scratch dir (emptied first)")
    ap.add_argument("--json", type=Path, default=ROOT / "perf/results/series.json",
                    help="raw numbers (a partial run keeps the other rows of this file)")
    a = ap.parse_args()
    only = [m for m in a.only.split(",") if not (a.skip_cdc and m == "cdc")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = seriesrun.run(only, a.work)
    out = a.json
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():       # a partial run (--only) keeps the other rows of the last one
        res = {**json.loads(out.read_text()), **res}
    out.write_text(json.dumps(res, indent=1))
    print("\n".join(seriesrun.table(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
