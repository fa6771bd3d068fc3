"""bench/bench_server.py --quick: a real `reidal serve` under concurrent clients, tiny sizes;
its last line is one JSON object with every figure (the figures themselves are not judged
here: speed targets live in bench/, never in tests)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_server.py"


def test_quick_run_ends_with_one_json_line_of_figures():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["answers"]) == {"0", "2000"}
    for row in result["answers"].values():
        for per_call in ("per_call_1", "per_call_50"):
            assert row[per_call]["answers_per_s"] > 0 and row[per_call]["calls_per_s"] > 0
    reads = result["reads"]
    assert reads["identities_calls"] > 0 and reads["pairs_calls"] > 0
    assert 0 < reads["identities_p50_s"] <= reads["identities_p99_s"]
