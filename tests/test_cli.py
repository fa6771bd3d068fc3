"""The `reidal` CLI against a real server (real gRPC, SQLite and Triton): every client
command through ``reidal.cli.main([...])``, and ``reidal serve`` as a real process stopped
with SIGTERM. What the commands stored is read back with the Python client and compared
with the ground truth of the generated pictures."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _services_support import pictures, running_server

from reidal.cli import PAIR_CSV_FIELDS, main
from reidal_client import ReidalClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory):
    with running_server(triton, tmp_path_factory.mktemp("reidal-cli")) as srv:
        yield srv


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """28 pictures in a folder (one sub-folder per individual) and 12 more in a
    WildlifeDatasets CSV; returns (folder, csv, truth by image id)."""
    base = tmp_path_factory.mktemp("photos")
    pics = pictures()
    folder = base / "folder"
    truth = {}
    for p in pics[:28]:
        path = folder / p.identity / f"{p.image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(p.png)
        truth[f"{p.identity}/{p.image_id}.png"] = p.identity
    meta = base / "wild" / "metadata.csv"
    (base / "wild" / "images").mkdir(parents=True)
    with meta.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "identity", "path", "viewpoint"])
        for p in pics[28:]:
            (base / "wild" / "images" / f"{p.image_id}.png").write_bytes(p.png)
            w.writerow([p.image_id, p.identity, f"images/{p.image_id}.png", p.viewpoint])
            truth[p.image_id] = p.identity
    return folder, meta, truth


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_end_to_end(server, photos, capsys, monkeypatch, tmp_path):
    folder, meta, truth = photos
    s = ("--server", server.address)
    code, out, _ = run(capsys, "collection", "create", "herd", "--species", "zebra",
                       "--k1", "6", "--k2", "2", "--min-samples", "2", *s)
    assert code == 0 and "created collection 'herd'" in out and "k1=6" in out

    code, out, err = run(capsys, "ingest", "herd", str(folder), "--batch", "8", *s)
    assert code == 0 and "28 images: 28 added, 0 already present, 28 embedded" in out
    assert "28/28 images" in err  # the progress bar, as plain lines without a TTY
    code, out, _ = run(capsys, "ingest", "herd", "--csv", str(meta), *s)
    assert code == 0 and "12 images: 12 added" in out
    code, out, _ = run(capsys, "ingest", "herd", "--csv", str(meta), *s)
    assert code == 0 and "12 images: 0 added, 12 already present" in out

    monkeypatch.setenv("REIDAL_SERVER", server.address)  # the default of --server
    code, out, _ = run(capsys, "collection", "list")
    assert code == 0 and "herd" in out and "zebra" in out
    code, out, _ = run(capsys, "collection", "show", "herd")
    assert code == 0 and "40 (40 embedded, 0 excluded)" in out

    with ReidalClient(server.address) as client:
        images = {i.image_id: i for i in client.list_images("herd")}
    assert sorted(images) == sorted(truth)
    assert images["ind0000/ind0000_000.png"].metadata["path"].endswith("ind0000_000.png")
    csv_id = next(i for i in truth if "/" not in i)
    assert images[csv_id].metadata["viewpoint"] in ("left", "right", "front", "back")

    # pairs -> CSV -> fill the answer column from the ground truth -> answer --csv
    pairs_csv = tmp_path / "pairs.csv"
    code, out, _ = run(capsys, "pairs", "herd", "--budget", "6", "--out", str(pairs_csv))
    assert code == 0 and "wrote" in out
    with pairs_csv.open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == PAIR_CSV_FIELDS
        rows = list(reader)
    assert 0 < len(rows) <= 6, out
    for r in rows:
        r["answer"] = "same" if truth[r["image_a"]] == truth[r["image_b"]] else "different"
    with pairs_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PAIR_CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    code, out, _ = run(capsys, "answer", "herd", "--csv", str(pairs_csv), "--annotator", "ann")
    assert code == 0 and f"stored {len(rows)} answer(s)" in out
    with ReidalClient(server.address) as client:
        stored = {a.pair_id: a for a in client.list_constraints("herd", annotator_id="ann")}
    assert sorted(stored) == sorted(r["pair_id"] for r in rows)
    for r in rows:
        a = stored[r["pair_id"]]
        assert a.label == r["answer"].upper() and a.annotator_id == "ann"
        assert a.batch_id == r["batch_id"]

    # interactive: an invalid key is asked again, then same, different, quit
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\ns\nd\nq\n"))
    code, out, _ = run(capsys, "answer", "herd", "--interactive", "--budget", "6",
                       "--annotator", "keyboard")
    batch_id = out.splitlines()[0].split()[1]
    with ReidalClient(server.address) as client:
        batch = client.get_query_batch("herd", batch_id)
        mine = {a.pair_id: a.label for a in client.list_constraints("herd",
                                                                     annotator_id="keyboard")}
    answered = min(len(batch.pairs), 2)
    assert code == 0 and answered >= 1 and f"stored {answered} answer(s)" in out
    assert "similarity" in out and "  A: ind" in out and "answer s (same)" in out
    assert mine == dict(zip([p.pair_id for p in batch.pairs[:answered]], ["SAME", "DIFFERENT"],
                            strict=False))

    # printed pairs
    code, out, _ = run(capsys, "pairs", "herd", "--budget", "3")
    assert code == 0 and out.splitlines()[0].startswith("batch c3-")
    assert "kNN graph flat: recall@" in out and " 1.000 +- 0.000 on 0 sample rows" in out

    # identities: table and CSV
    code, out, _ = run(capsys, "identities", "herd", "--all")
    assert code == 0 and "identities" in out.splitlines()[0]
    ids_csv = tmp_path / "identities.csv"
    code, out, _ = run(capsys, "identities", "herd", "--csv", str(ids_csv))
    assert code == 0 and f"wrote 40 rows to {ids_csv}" in out
    with ids_csv.open() as fh:
        exported = {r["image_id"]: r["identity_id"] for r in csv.DictReader(fh)}
    with ReidalClient(server.address) as client:
        assert exported == client.get_identities("herd").assignment()

    # delete: refused without --yes when nobody can confirm, then done
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run(capsys, "collection", "delete", "herd")
    assert code == 1 and "--yes" in err
    code, out, _ = run(capsys, "collection", "delete", "herd", "--yes")
    assert code == 0 and "deleted collection 'herd'" in out


@pytest.mark.parametrize("argv, message", [
    (["collection", "show", "nope"], "error: NOT_FOUND: collection 'nope' does not exist"),
    (["pairs", "nope", "--budget", "3"], "error: NOT_FOUND: collection 'nope'"),
    (["identities", "nope"], "error: NOT_FOUND: collection 'nope'"),
    (["pairs", "nope", "--budget", "lots"], "error: budget 'lots' is neither"),
    (["answer", "nope", "--csv", "/nonexistent/answers.csv"], "cannot open"),
    (["ingest", "nope"], "give a FOLDER or --csv"),
])
def test_cli_errors_are_clean(server, capsys, argv, message):
    code, out, err = run(capsys, *argv, "--server", server.address)
    assert code == 1
    assert message in err and "Traceback" not in err + out


def test_cli_unreachable_server_is_a_clean_error(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = run(capsys, "collection", "list", "--server", f"127.0.0.1:{port}",
                       "--retries", "1")
    assert code == 1 and err.startswith("error: UNAVAILABLE: ") and "Traceback" not in err


def test_serve_runs_until_sigterm(triton, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "clients" / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "reidal.cli", "serve", "--service", "collections", "sampling",
         "constraints", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--triton-url", triton.grpc_url, "--log-json", "--grace", "5", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"reidal serving collections, sampling, constraints on "
                                f"127.0.0.1:{port}"), first + proc.stderr.read()
        with ReidalClient(f"127.0.0.1:{port}", timeout_s=10) as client:
            assert client.health() == "SERVING"
            client.create_collection("served")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "reidal stopped" in out
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert {"reidal_serving", "signal", "reidal_stopped"} <= {e.get("event") for e in events}
    assert (tmp_path / "data" / "reidal.sqlite3").exists()
