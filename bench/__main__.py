"""`python -m bench [NAME ...]`: run the benchmarks (all by default); `python -m bench snapshot world`: one input."""

from __future__ import annotations

import sys

from . import freshness, load, postgres, pyramid, refresh, retention, shards, snapshot, ui

BENCHES = {
    "load": load.main,
    "postgres": postgres.main,
    "pyramid": pyramid.main,
    "snapshot": snapshot.main,
    "shards": shards.main,
    "large": shards.large,
    "refresh": refresh.main,
    "freshness": freshness.main,
    "retention": retention.main,
    "ui": ui.main,
}


def main(argv: list[str]) -> int:
    if argv[:1] == ["snapshot"] and len(argv) > 1:  # `snapshot world`: one input
        return 0 if snapshot.main(names=argv[1:]) else 1
    if argv[:1] == ["shards"] and len(argv) > 1:  # `shards 1000000`: another size
        return 0 if shards.main(int(argv[1])) else 1
    names = argv or [n for n in BENCHES if n != "large"]  # `large` (100M reports) only when named
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHES)})", file=sys.stderr)
        return 2
    ok = True
    for name in names:
        ok &= BENCHES[name]()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
