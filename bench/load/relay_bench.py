"""Run ``relay bench`` from a source checkout without installing relay.

    python bench/load/relay_bench.py [SCENARIO ...] [options]   # same as: relay bench ...

See bench/load/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.bench import main  # after the sys.path change above

if __name__ == "__main__":
    sys.exit(main())
