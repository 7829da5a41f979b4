"""Loading 1M rows from one Parquet file into `reports` (target: under 10 s).

Baseline, same run and same file: DuckDB copying the file into a table with
no validation at all, the floor any loader stands on.
"""

from __future__ import annotations

import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline import duck, extract
from pipeline.config import SyntheticSource, load_config
from pipeline.sources.synthetic import generate

ROWS = 1_000_000
TARGET_S = 10.0
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)


def write_parquet(path: Path, rows: int) -> None:
    """Typed road-condition reports, as an export from the seed's table would be."""
    t = generate(SyntheticSource(kind="synthetic", domain="road_conditions", count=rows, bad_fraction=0), AS_OF)
    typed = pa.table(
        {
            "id": t["report_id"],
            "lat": pc.cast(t["lat"], pa.float64()),
            "lng": pc.cast(t["lng"], pa.float64()),
            "submitted_at": pc.cast(pc.replace_substring(t["observed_at"], "Z", ""), pa.timestamp("us")),
            "condition_type": t["category"],
            "severity": pc.cast(t["severity"], pa.int16()),
            "upvotes": pc.cast(t["upvotes"], pa.int32()),
            "session_token": t["session_token"],
            "activity_context": t["activity"],
            "description": t["description"],
        }
    )
    pq.write_table(typed, path)


def main() -> bool:
    with tempfile.TemporaryDirectory(prefix="hotspots-bench-") as tmp:
        tmp = Path(tmp)
        write_parquet(tmp / "reports.parquet", ROWS)
        (tmp / "hotspots.yaml").write_text(
            yaml.safe_dump(
                {
                    "sources": {
                        "roads": {
                            "kind": "file",
                            "path": "reports.parquet",
                            "format": "parquet",
                            "columns": {
                                "report_id": "id",
                                "lat": "lat",
                                "lng": "lng",
                                "observed_at": "submitted_at",
                                "category": "condition_type",
                                "severity": "severity",
                                "upvotes": "upvotes",
                                "session_token": "session_token",
                                "activity": "activity_context",
                                "description": "description",
                            },
                        }
                    },
                    "tilesets": {"roads": {"source": "roads", "profile": "road_conditions"}},
                }
            )
        )
        cfg = load_config(tmp / "hotspots.yaml")

        started = time.perf_counter()
        extract.preflight(cfg, ["roads"])
        extract.stage(cfg, ["roads"], AS_OF)
        [result] = extract.validate(cfg, ["roads"], AS_OF).values()
        seconds = time.perf_counter() - started

        con = duck.connect(tmp / "baseline.duckdb")
        started = time.perf_counter()
        con.execute("CREATE TABLE copy AS SELECT * FROM read_parquet($p)", {"p": str(tmp / "reports.parquet")})
        baseline = time.perf_counter() - started
        con.close()

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    ok = seconds < TARGET_S and result.read == ROWS
    print(f"load: {ROWS:,} Parquet rows -> reports ({result.valid:,} valid, {result.rejected_total:,} rejected)")
    print(f"  hotspots stage + validate : {seconds:6.2f} s  ({ROWS / seconds / 1e6:.2f} M rows/s)")
    print(f"  target                    : {TARGET_S:6.2f} s  (ratio {seconds / TARGET_S:.2f} of target)")
    print(f"  baseline: plain DuckDB copy, no validation: {baseline:.2f} s  (hotspots = {seconds / baseline:.1f}x)")
    print(f"  peak RSS                  : {peak_gb:6.2f} GB")
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok
