"""`reidal demo` end to end on a small generated collection: real Triton, real gRPC."""

import csv

from reidal.cli import main


def test_demo_runs_the_whole_loop(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--cycles", "2", "--individuals", "8",
                 "--budget", "40"]) == 0
    printed = capsys.readouterr().out
    assert "embedding through reidal's EmbeddingService" in printed
    assert "open-set retrieval of the pretrained model" in printed
    with (out / "cycles.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["cycle"]) for r in rows] == [0, 1, 2]
    asked = [int(r["pairs_asked"]) for r in rows[1:]]
    assert all(0 <= a <= 40 for a in asked)
    assert int(rows[-1]["cumulative_pairs"]) == sum(asked)
    for r in rows:
        for key in ("precision", "recall", "f1", "ari"):
            assert -1.0 <= float(r[key]) <= 1.0
    png = (out / "cycles.png").read_bytes()
    assert png.startswith(b"\x89PNG")
