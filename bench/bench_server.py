"""The server as its clients see it: a real ``reidal serve`` (a subprocess) on loopback.

    .venv/bin/python bench/bench_server.py [--quick] [--stored 0 100000 1000000]
                                           [--clients 8] [--read-clients 16] [--seconds 10]
                                           [--images 2000] [--ingest 256] [--ingest-rounds 3]
                                           [--ingest-per-message 16] [--ingest-only]
                                           [--reads-only] [--out results.json]

What it measures, each figure from this run:

* durable answers/s: ``--clients`` threads (one channel each) send SubmitConstraints with
  1 and with 50 answers a call for ``--seconds`` each, on a collection that already holds
  0, 100k, 1M answers (``--stored``). An answer counts once its call returned (it is on
  disk then: SQLite ``synchronous=FULL``). The answers are drawn on random pairs of 20,000
  images and labelled from a hidden identity per image, so they agree with each other (no
  contradictions), as an annotator's mostly do; a pair already answered is revised with
  the same label. ``first_submit_s``: the first call after the server started (it loads
  the collection's answer state once per process, here from every stored answer);
  ``first_submit_after_restart_s``: the first call again after the server was stopped and
  started once more once every row ran (a restart: it loads the snapshot of the state
  that the measured submits left in the store, reidal.answer_state, and catches up).
* reads: ``--read-clients`` threads, half calling GetQueryPairs (budget 10), half
  GetIdentities, on a collection of ``--images`` images with stored vectors, while one
  more client submits an answer every 0.5 s (so the state keeps changing); p50 / p99 of
  each. ``identities_idle_s``: GetIdentities alone, computing a changed state (the median
  of ``IDLE_SAMPLES`` calls, each after one more answer; one call alone is a noisy
  baseline on a shared machine), and ``identities_cached_s``: alone on an unchanged state
  (the call after each of those); ``identities_p99_vs_idle`` the target's ratio. With them the CPU time the server
  process and this (client) process spent per call served (``server_cpu_ms_per_call``,
  ``client_cpu_ms_per_call``, from /proc and getrusage) and the load average before and
  after: the clients are threads of this one process, and these say whether the measured
  latencies are the server's or this process's (its threads share one GIL). Only this
  part: ``--reads-only``.
* ingest: ``--ingest`` synthetic 128 px PNG images streamed through AddImages
  (``--ingest-per-message``, 16 a message) into a server with every service and the bundled Triton on CPU: images/s,
  embedding included, beside bench_embedding.py's two figures measured in the same run on
  the same server and images (the EmbeddingService at 32 images a request, and plain
  torch decoding and embedding 32 at a time in this process), in ``--ingest-rounds``
  alternating rounds, medians and their ratios, with the load average before and after
  (skipped with ``--ingest 0``; ``--quick`` skips it; ``--ingest-only`` runs only it).

Pre-filled data goes in through the store API (``Store``: collections, images, vectors)
and, for the stored answers, one ``executemany`` INSERT into the answers table inside one
store transaction before the server starts: a million SubmitConstraints calls would take
hours, and the server reads what is stored exactly as it reads its own answers.

The last line printed is one JSON object with every figure. ``--quick``: tiny sizes, for
the smoke test in the suite (tests/test_bench_server.py). The machine's other load is not
controlled: run it on an idle machine for figures to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from reidal.collection_state import effective_params
from reidal.simulation.synthetic import make_reid_embeddings
from reidal.store import ImageRecord, Store
from reidal.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    constraints_pb2,
    constraints_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
)

ANSWER_IMAGES = 20_000  # images of each answers collection (--quick: 1000)
PER_IDENTITY = 10  # images per hidden identity (answers' labels)
READS_COLLECTION = "reads"
IDLE_SAMPLES = 5  # idle GetIdentities calls (each after one answer): their median


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``reidal serve`` as a subprocess; started, waited for, stopped (SIGTERM)."""

    def __init__(self, data_dir: Path, services: list[str], timeout_s: float = 300.0) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        exe = Path(sys.executable).with_name("reidal")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--service", *services, "--data-dir", str(data_dir),
             "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1], "--no-http",
             "--workers", "32", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if line.startswith("reidal serving"):
                break
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"reidal serve did not start: {line!r}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- pre-fill


def answer_collection(store: Store, cid: str, stored: int, rng: np.random.Generator) -> None:
    """A collection of ANSWER_IMAGES images holding ``stored`` answers (direct INSERT)."""
    store.collections.create(cid)
    ids = [f"{cid}-{k:06d}" for k in range(ANSWER_IMAGES)]
    store.images.add(cid, [ImageRecord(i) for i in ids])
    if not stored:
        return
    identity = np.arange(ANSWER_IMAGES) // PER_IDENTITY
    pairs = np.unique(np.sort(rng.integers(0, ANSWER_IMAGES, (int(stored * 1.05) + 10, 2)),
                              axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = pairs[rng.permutation(len(pairs))[:stored]]
    same = identity[pairs[:, 0]] == identity[pairs[:, 1]]
    now = time.time()
    rows = [(cid, ids[a], ids[b], "SAME" if s else "DIFFERENT", "prefill", now)
            for (a, b), s in zip(pairs.tolist(), same.tolist(), strict=True)]
    with store.db.tx(cid) as db:  # the documented direct pre-fill
        db.executemany("INSERT INTO answers (collection_id, image_a, image_b, label,"
                       " annotator, received_at) VALUES (?, ?, ?, ?, ?, ?)", rows)


def reads_collection(store: Store, n: int) -> list[str]:
    data = make_reid_embeddings(n_identities=max(2, n // 10), dim=64, seed=0)
    X = data.X[:n].astype(np.float32)
    ids = [f"r{k:06d}" for k in range(len(X))]
    store.collections.create(READS_COLLECTION, model_name="bench", model_version="1",
                             params=effective_params(None, None))
    store.images.add(READS_COLLECTION, [ImageRecord(i) for i in ids])
    store.images.put_vectors(READS_COLLECTION, "bench", "1", ids, X)
    return ids


# --------------------------------------------------------------------------- load


def by_images(a: str, b: str, same: bool) -> constraints_pb2.AnswerInput:
    return constraints_pb2.AnswerInput(
        images=constraints_pb2.ImagePair(image_a=a, image_b=b), annotator_id="bench",
        label=constraints_pb2.ANSWER_LABEL_SAME if same else constraints_pb2.ANSWER_LABEL_DIFFERENT)


def random_answers(cid: str, rng: np.random.Generator, k: int) -> list[constraints_pb2.AnswerInput]:
    pairs = rng.integers(0, ANSWER_IMAGES, (k, 2))
    pairs[:, 1] = np.where(pairs[:, 0] == pairs[:, 1], (pairs[:, 1] + 1) % ANSWER_IMAGES,
                           pairs[:, 1])
    same = pairs[:, 0] // PER_IDENTITY == pairs[:, 1] // PER_IDENTITY
    return [by_images(f"{cid}-{a:06d}", f"{cid}-{b:06d}", bool(s))
            for (a, b), s in zip(pairs.tolist(), same.tolist(), strict=True)]


def run_clients(n: int, seconds: float, work: Callable[[int, np.random.Generator], int],
                ) -> tuple[int, int, list[float]]:
    """``n`` threads calling ``work(k, rng)`` (returns items done) for ``seconds``:
    (calls, items, per-call latencies)."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    totals = [0, 0]
    latencies: list[float] = []
    errors: list[BaseException] = []

    def loop(k: int) -> None:
        rng = np.random.default_rng(1000 + k)
        try:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                done = work(k, rng)
                dt = time.perf_counter() - t0
                with lock:
                    totals[0] += 1
                    totals[1] += done
                    latencies.append(dt)
        except BaseException as exc:  # reported below, after the other threads stop
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return totals[0], totals[1], latencies


def first_submit(server: Server, cid: str, rng: np.random.Generator) -> float:
    """Seconds of the first SubmitConstraints (one answer) of ``cid`` in this server."""
    stub = constraints_pb2_grpc.ConstraintServiceStub(server.channel())
    t0 = time.perf_counter()
    stub.SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(
        collection_id=cid, answers=random_answers(cid, rng, 1)), timeout=3600)
    return time.perf_counter() - t0


def submit_load(server: Server, cid: str, per_call: int, clients: int,
                seconds: float) -> dict[str, float]:
    stubs = [constraints_pb2_grpc.ConstraintServiceStub(server.channel()) for _ in range(clients)]

    def work(k: int, rng: np.random.Generator) -> int:
        out = stubs[k].SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(
            collection_id=cid, answers=random_answers(cid, rng, per_call)), timeout=600)
        return out.stored_count

    t0 = time.perf_counter()
    calls, answers, lat = run_clients(clients, seconds, work)
    wall = time.perf_counter() - t0
    return {"answers_per_s": answers / wall, "calls_per_s": calls / wall,
            "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99))}


def pct(lat: list[float], q: float) -> float | None:
    return float(np.percentile(lat, q)) if lat else None


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (None where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_load(server: Server, image_ids: list[str], clients: int,
              seconds: float) -> dict[str, float | None]:
    ch = server.channel()
    ident = constraints_pb2_grpc.ConstraintServiceStub(ch)
    ask = constraints_pb2.GetIdentitiesRequest(collection_id=READS_COLLECTION)
    writer_rng = np.random.default_rng(7)

    def one_answer() -> None:
        a, b = writer_rng.choice(len(image_ids), 2, replace=False)
        ident.SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(
            collection_id=READS_COLLECTION,
            answers=[by_images(image_ids[a], image_ids[b], False)]), timeout=60)

    ident.GetIdentities(ask, timeout=600)  # first computation (warm-up)
    changed: list[float] = []
    unchanged: list[float] = []
    for _ in range(IDLE_SAMPLES):
        one_answer()
        for into in (changed, unchanged):
            t0 = time.perf_counter()
            ident.GetIdentities(ask, timeout=600)
            into.append(time.perf_counter() - t0)
    idle, cached = float(np.median(changed)), float(np.median(unchanged))

    samplers = [sampling_pb2_grpc.SamplingServiceStub(server.channel()) for _ in range(clients)]
    readers = [constraints_pb2_grpc.ConstraintServiceStub(server.channel())
               for _ in range(clients)]
    pair_lat: list[float] = []
    ident_lat: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.wait(0.5):
            one_answer()

    def work(k: int, rng: np.random.Generator) -> int:
        t0 = time.perf_counter()
        if k % 2:
            samplers[k].GetQueryPairs(sampling_pb2.GetQueryPairsRequest(
                collection_id=READS_COLLECTION, budget=collections_pb2.Budget(count=10)),
                timeout=600)
            pair_lat.append(time.perf_counter() - t0)
        else:
            readers[k].GetIdentities(ask, timeout=600)
            ident_lat.append(time.perf_counter() - t0)
        return 1

    load_before = os.getloadavg()[0]
    server_cpu, client_cpu = process_cpu_s(server.proc.pid), own_cpu_s()
    w = threading.Thread(target=writer)
    w.start()
    try:
        run_clients(clients, seconds, work)
    finally:
        stop.set()
        w.join()
    server_after, client_after = process_cpu_s(server.proc.pid), own_cpu_s()
    calls = max(1, len(ident_lat) + len(pair_lat))
    return {"identities_idle_s": idle, "identities_cached_s": cached,
            "identities_idle_samples_s": changed,
            "identities_p50_s": pct(ident_lat, 50), "identities_p99_s": pct(ident_lat, 99),
            "identities_p99_vs_idle": (pct(ident_lat, 99) or 0.0) / idle,
            "pairs_p50_s": pct(pair_lat, 50), "pairs_p99_s": pct(pair_lat, 99),
            "identities_calls": len(ident_lat), "pairs_calls": len(pair_lat),
            "server_cpu_ms_per_call": None if server_cpu is None or server_after is None
            else 1000 * (server_after - server_cpu) / calls,
            "client_cpu_ms_per_call": 1000 * (client_after - client_cpu) / calls,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def ingest(data_dir: Path, n: int, rounds: int = 3, per_message: int = 16,
           batch: int = 32, input_size: int | None = None) -> dict[str, object]:
    """AddImages against bench_embedding's two images/s figures, side by side on the same
    server, machine and images: ``rounds`` alternating blocks of (1) ``n`` images streamed
    through AddImages ``per_message`` a message into a new collection, (2) the same images
    sent to the server's own EmbeddingService (Embed, ``batch`` a request: nothing
    stored), (3) plain torch in this process decoding and embedding them ``batch`` at a
    time with the same model; the median of each, and the load average around them.
    ``input_size``: the served model's (square) input, written into the server's new
    repository (None: the default model's, reidal.embedding.spec.DEFAULT_INPUT_SIZE)."""
    import io
    import statistics

    import torch
    from bench_embedding import torch_decode_forward

    from reidal.data.synthetic_images import SyntheticConfig, iter_samples
    from reidal.embedding.model import build_default_model
    from reidal.embedding.spec import default_spec
    from reidal.embedding.triton_repo import write_model_repository
    from reidal.v1 import embedding_pb2, embedding_pb2_grpc

    cfg = SyntheticConfig.tiny(n_individuals=max(2, n // 8), images_per_individual=(8, 8),
                               seed=0, image_size=128)
    pics = []
    for s in iter_samples(cfg):
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        pics.append((s.image_id, buf.getvalue()))
    pics = pics[:n]
    spec = default_spec() if input_size is None else default_spec(
        input_size=(input_size, input_size))
    # what `reidal serve` would write into a new repository, at the size asked for
    write_model_repository(data_dir / "model_repository", spec=spec)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = build_default_model(input_size=spec.input_size)
    blobs = [d for _, d in pics]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    server = Server(data_dir, ["all"])
    started = time.perf_counter() - t0
    runs: dict[str, list[float]] = {"ingest": [], "embed_service": [], "torch": []}
    try:
        stub = collections_pb2_grpc.CollectionServiceStub(server.channel())
        embed = embedding_pb2_grpc.EmbeddingServiceStub(server.channel())
        requests = [embedding_pb2.EmbedRequest(images=[
            common_pb2.Image(id=i, data=d) for i, d in pics[s:s + batch]])
            for s in range(0, len(pics), batch)]
        embed.Embed(requests[0], timeout=600)  # warm-up: Triton's first call
        for r in range(rounds):
            cid = f"ingest-{r}"
            stub.CreateCollection(collections_pb2.CreateCollectionRequest(collection_id=cid))
            msgs = [collections_pb2.AddImagesRequest(collection_id=cid, images=[
                collections_pb2.IngestImage(image=common_pb2.Image(id=i, data=d))
                for i, d in pics[s:s + per_message]]) for s in range(0, len(pics), per_message)]
            t0 = time.perf_counter()
            out = stub.AddImages(iter(msgs), timeout=3600)
            runs["ingest"].append(out.added / (time.perf_counter() - t0))
            assert out.added == out.embedded == len(pics), out
            t0 = time.perf_counter()
            for request in requests:
                embed.Embed(request, timeout=600)
            runs["embed_service"].append(len(pics) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for s in range(0, len(blobs), batch):
                torch_decode_forward(model, spec, blobs[s:s + batch])
            runs["torch"].append(len(pics) / (time.perf_counter() - t0))
            print(f"ingest round {r}: " + ", ".join(f"{k} {v[-1]:.1f} img/s"
                                                   for k, v in runs.items()), flush=True)
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"ingest_images": len(pics), "ingest_images_per_s": med["ingest"],
            "embed_service_images_per_s": med["embed_service"],
            "torch_images_per_s": med["torch"],
            "ingest_vs_embed_service": med["ingest"] / med["embed_service"],
            "ingest_vs_torch": med["ingest"] / med["torch"],
            "ingest_rounds": runs, "ingest_per_message": per_message, "embed_batch": batch,
            "load_before": load_before, "load_after": os.getloadavg(),
            "server_start_s": started, "input_size": list(spec.input_size)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--stored", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--read-clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="per measured phase")
    ap.add_argument("--images", type=int, default=2000, help="images of the reads collection")
    ap.add_argument("--ingest", type=int, default=256, help="images to ingest (0: skip)")
    ap.add_argument("--ingest-rounds", type=int, default=3,
                    help="alternating rounds of ingest / Embed / torch")
    ap.add_argument("--ingest-per-message", type=int, default=16,
                    help="images per AddImages message")
    ap.add_argument("--input-size", type=int, default=None, metavar="PX",
                    help="the served model's square input size for the ingest figures "
                         "(default: the default model's)")
    ap.add_argument("--ingest-only", action="store_true",
                    help="only the ingest figures (no answers, no reads)")
    ap.add_argument("--reads-only", action="store_true",
                    help="only the reads figures (no answers, no ingest)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.stored, args.seconds, args.images, args.ingest = [0, 2000], 0.5, 120, 0
        args.clients, args.read_clients = 4, 4
    if args.reads_only:
        args.stored, args.ingest = [], 0
        global ANSWER_IMAGES
        ANSWER_IMAGES = 1000
    rng = np.random.default_rng(0)
    result: dict[str, object] = {
        "machine": f"{platform.node()} {os.cpu_count()} cpu", "clients": args.clients,
        "read_clients": args.read_clients, "seconds": args.seconds, "answers": {}}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        if args.ingest_only:
            result["ingest"] = ingest(Path(tmp) / "ingest", args.ingest, args.ingest_rounds,
                                      args.ingest_per_message, input_size=args.input_size)
            print(json.dumps(result, sort_keys=True))
            return 0
        data = Path(tmp) / "data"
        store = Store(data)
        t0 = time.perf_counter()
        for stored in args.stored:
            answer_collection(store, f"answers-{stored}", stored, rng)
        image_ids = reads_collection(store, args.images)
        store.close()
        print(f"pre-fill: {time.perf_counter() - t0:.1f} s", flush=True)
        server = Server(data, ["sampling", "constraints"])
        try:
            for stored in args.stored:
                cid = f"answers-{stored}"
                row: dict[str, object] = {"first_submit_s": first_submit(server, cid, rng)}
                for per_call in (1, 50):
                    row[f"per_call_{per_call}"] = submit_load(server, cid, per_call,
                                                              args.clients, args.seconds)
                result["answers"][str(stored)] = row  # type: ignore[index]
                print(f"{stored} stored answers: {json.dumps(row)}", flush=True)
            result["reads"] = read_load(server, image_ids, args.read_clients, args.seconds)
            print(f"reads: {json.dumps(result['reads'])}", flush=True)
        finally:
            server.stop()
        if args.stored:
            server = Server(data, ["sampling", "constraints"])  # a restart
            try:
                for stored in args.stored:
                    row = result["answers"][str(stored)]  # type: ignore[index]
                    row["first_submit_after_restart_s"] = first_submit(
                        server, f"answers-{stored}", rng)
                    print(f"{stored} stored answers, first submit after a restart: "
                          f"{row['first_submit_after_restart_s']:.2f} s", flush=True)
            finally:
                server.stop()
        if args.ingest:
            result["ingest"] = ingest(Path(tmp) / "ingest", args.ingest, args.ingest_rounds,
                                      args.ingest_per_message, input_size=args.input_size)
            print(f"ingest: {json.dumps(result['ingest'])}", flush=True)
    line = json.dumps(result, sort_keys=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
