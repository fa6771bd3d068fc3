"""The pair-review web page against a real reidal server, in Debian's headless Chromium.

One all-in-one server (real gRPC, SQLite, the session's Triton) serves the page on an HTTP
port (``serve(..., http_port=0)``) and holds a generated collection of 8 individuals x 4
photos. What the page did is always checked through the gRPC API (ReidalClient), never
through the page itself: answers stored exactly once, with the annotator's name, the undone
one deleted. The JSON API and the GetImage RPC are tested without a browser too.

The browser is driven with Python playwright pointed at /usr/bin/chromium (no browser is
downloaded); the tests skip only when that binary is missing. Every run saves a screenshot
of the review screen to build/test-artifacts/review.png; with REIDAL_SCREENSHOT=PATH it goes
there instead (`REIDAL_SCREENSHOT=docs/img/review.png` refreshes the one the docs show).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from _services_support import Picture, Stubs, create_and_fill, pictures, rpc_error, running_server
from PIL import Image

from reidal.cli import build_parser
from reidal.serve import serve
from reidal.serve_config import review_port
from reidal.v1 import collections_pb2, common_pb2
from reidal.web import start_review_http
from reidal_client import ReidalClient

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(os.environ.get("REIDAL_SCREENSHOT")
                  or ROOT / "build" / "test-artifacts" / "review.png")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
CID = "herd"
KEYS = {"SAME": "s", "DIFFERENT": "d", "UNSURE": "u"}
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def photos() -> tuple[Picture, ...]:
    """8 individuals x 4 photos at 192 px (large enough to look like photos on screen)."""
    return pictures(8, 4, seed=3, image_size=192)


TRUTH = {p.image_id: p.identity for p in photos()}


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory):
    with running_server(triton, tmp_path_factory.mktemp("reidal-web"), http_port=0,
                        image_roots=[tmp_path_factory.getbasetemp()]) as srv:
        stubs = Stubs.connect(srv.address)
        create_and_fill(stubs, CID, photos(), species="plains zebra")
        stubs.close()
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with ReidalClient(server.address, timeout_s=30) as c:
        yield c


def http(url: str, method: str = "GET", body: object = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, object, dict[str, str]]:
    """(status, parsed JSON or bytes, headers) of one request; errors are returned too."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    request = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            status, payload, got = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, payload, got = exc.code, exc.read(), dict(exc.headers)
    if got.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(payload), got
    return status, payload, got


def api(server, path: str) -> str:
    return f"{server.http_url}api/{path}"


# ------------------------------------------------------------------------ GetImage RPC


def test_get_image_returns_the_ingested_file(server, tmp_path):
    stubs = Stubs.connect(server.address)
    try:
        pic = photos()[0]
        got = stubs.collections.GetImage(collections_pb2.GetImageRequest(
            collection_id=CID, image_id=pic.image_id), timeout=10)
        assert (got.image_id, got.data, got.mime_type) == (pic.image_id, pic.png, "image/png")
        assert got.sha256 == hashlib.sha256(pic.png).hexdigest()

        # JPEG and WebP bytes, a file given by path, and bytes that are no image (deferred
        # images are not decoded at ingest): the MIME type must agree with Pillow's reading.
        rgb = Image.open(io.BytesIO(pic.png)).convert("RGB")
        encoded = {}
        for fmt in ("JPEG", "WEBP"):
            buf = io.BytesIO()
            rgb.save(buf, format=fmt)
            encoded[fmt.lower()] = buf.getvalue()
        on_disk = tmp_path / "on-disk.png"
        on_disk.write_bytes(pic.png)
        stubs.collections.CreateCollection(collections_pb2.CreateCollectionRequest(
            collection_id="formats"), timeout=10)
        images = [common_pb2.Image(id=k, data=v) for k, v in encoded.items()]
        images += [common_pb2.Image(id="by-path", uri=str(on_disk)),
                   common_pb2.Image(id="junk", data=b"not an image at all")]
        stubs.collections.AddImages(iter([collections_pb2.AddImagesRequest(
            collection_id="formats", defer_embedding=True,
            images=[collections_pb2.IngestImage(image=i) for i in images])]), timeout=30)
        for iid, data in [*encoded.items(), ("by-path", pic.png)]:
            got = stubs.collections.GetImage(collections_pb2.GetImageRequest(
                collection_id="formats", image_id=iid), timeout=10)
            assert got.data == data
            assert got.mime_type == MIME[Image.open(io.BytesIO(data)).format]
            assert got.sha256 == hashlib.sha256(data).hexdigest()
        junk = stubs.collections.GetImage(collections_pb2.GetImageRequest(
            collection_id="formats", image_id="junk"), timeout=10)
        assert (junk.data, junk.mime_type) == (b"not an image at all", "application/octet-stream")

        # if_none_match: a current copy is answered without data, a stale one with the file
        for iid, data in [("jpeg", encoded["jpeg"]), ("by-path", pic.png)]:
            sha = hashlib.sha256(data).hexdigest()
            same = stubs.collections.GetImage(collections_pb2.GetImageRequest(
                collection_id="formats", image_id=iid, if_none_match=sha), timeout=10)
            assert (same.not_modified, same.data, same.sha256) == (True, b"", sha)
            stale = stubs.collections.GetImage(collections_pb2.GetImageRequest(
                collection_id="formats", image_id=iid, if_none_match="0" * 64), timeout=10)
            assert (stale.not_modified, stale.data) == (False, data)
        # a kept image that is current is not even read: its blob gone, it is still current
        sha = hashlib.sha256(encoded["webp"]).hexdigest()
        blob = server.runtime.blobs.path(sha)
        kept = blob.read_bytes()
        blob.unlink()
        try:
            same = stubs.collections.GetImage(collections_pb2.GetImageRequest(
                collection_id="formats", image_id="webp", if_none_match=sha), timeout=10)
            assert same.not_modified
            err = rpc_error(stubs.collections.GetImage, collections_pb2.GetImageRequest(
                collection_id="formats", image_id="webp"), timeout=10)
            assert err.code().name == "DATA_LOSS"
        finally:
            blob.write_bytes(kept)

        on_disk.unlink()
        for request, code in [
            (collections_pb2.GetImageRequest(collection_id="formats", image_id="by-path"),
             "FAILED_PRECONDITION"),
            (collections_pb2.GetImageRequest(collection_id=CID, image_id="no-such-image"),
             "NOT_FOUND"),
            (collections_pb2.GetImageRequest(collection_id="no-such-collection",
                                             image_id=pic.image_id), "NOT_FOUND"),
        ]:
            err = rpc_error(stubs.collections.GetImage, request, timeout=10)
            assert err.code().name == code
            assert (request.image_id if code != "NOT_FOUND" or request.collection_id == CID
                    else request.collection_id) in err.details()
        stubs.collections.DeleteCollection(collections_pb2.DeleteCollectionRequest(
            collection_id="formats"), timeout=10)
    finally:
        stubs.close()


# ------------------------------------------------------------------------ JSON API


def test_json_api_collections_batches_and_images(server, client):
    status, data, _ = http(api(server, "collections"))
    assert status == 200
    ours = next(c for c in data["collections"] if c["collection_id"] == CID)
    ref = client.get_collection(CID)
    assert (ours["image_count"], ours["species"], ours["total_pairs"]) == (
        ref.image_count, ref.species, ref.total_pairs) == (32, "plains zebra", 32 * 31 // 2)

    status, first, _ = http(api(server, f"collections/{CID}/batch"), "POST",
                            {"budget": 3, "request_id": "api-batch-1"})
    assert status == 200
    batch = first["batch"]
    assert 1 <= len(batch["pairs"]) <= 3 and batch["budget"] == 3
    assert first["collection"]["pairs_asked"] == client.get_collection(CID).pairs_asked
    # the same request id is the same cycle (a double click or a reload during sampling)
    status, again, _ = http(api(server, f"collections/{CID}/batch"), "POST",
                            {"budget": 3, "request_id": "api-batch-1"})
    assert status == 200 and again["batch"]["batch_id"] == batch["batch_id"]
    ref_batch = client.get_query_batch(CID, batch["batch_id"])
    status, stored, _ = http(api(server, f"collections/{CID}/batches/{batch['batch_id']}"))
    assert status == 200
    assert [(p["pair_id"], p["image_a"], p["image_b"]) for p in stored["batch"]["pairs"]] == [
        (p.pair_id, p.image_a, p.image_b) for p in ref_batch.pairs]
    assert all(p["why"] and p["pool"] in ("U_os", "U_us") for p in stored["batch"]["pairs"])
    assert stored["batch"]["sampler"] == "aas"
    assert stored["batch"]["clustering"]["mode"] == "fixed"
    assert stored["batch"]["clustering"]["k1"] == ref_batch.clustering.k1

    pic = photos()[5]
    status, body, headers = http(api(server, f"images/{CID}/{pic.image_id}"))
    assert status == 200 and body == pic.png and headers["Content-Type"] == "image/png"
    assert headers["ETag"] == f'"{hashlib.sha256(pic.png).hexdigest()}"'
    status, body, _ = http(api(server, f"images/{CID}/{pic.image_id}"),
                           headers={"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""


def test_json_api_answers_are_idempotent_and_undo_deletes(server, client):
    batch = client.get_query_pairs(CID, 2)
    pair = batch.pairs[0]
    answer = {"batch_id": batch.batch_id, "pair_id": pair.pair_id, "label": "SAME",
              "annotator_id": "api-tester", "request_id": f"{batch.batch_id}:{pair.pair_id}:n1",
              "started_at": 1_700_000_000_000, "ended_at": 1_700_000_004_500}
    url = api(server, f"collections/{CID}/answers")
    status, first, _ = http(url, "POST", answer)
    assert status == 200 and first["stored"] == 1 and not first["replayed"]
    status, second, _ = http(url, "POST", answer)  # the resend after a lost response
    assert status == 200 and second["stored"] == 0 and second["replayed"]
    assert second["answer_id"] == first["answer_id"]
    status, clash, _ = http(url, "POST", {**answer, "label": "DIFFERENT"})
    assert status == 409 and clash["error"]["code"] == "ALREADY_EXISTS"

    history = client.list_constraints(CID, batch_id=batch.batch_id, include_history=True)
    assert [(a.answer_id, a.pair_id, a.label, a.annotator_id, a.status) for a in history] == [
        (first["answer_id"], pair.pair_id, "SAME", "api-tester", "CURRENT")]
    assert history[0].ended_at.timestamp() - history[0].started_at.timestamp() == \
        pytest.approx(4.5)

    undo = api(server, f"collections/{CID}/undo")
    status, done, _ = http(undo, "POST", {"answer_id": first["answer_id"], "actor": "api-tester",
                                          "batch_id": batch.batch_id})
    assert status == 200 and done["deleted"]["status"] == "DELETED"
    assert not done["already_deleted"] and done["restored"] is None
    status, again, _ = http(undo, "POST", {"answer_id": first["answer_id"],
                                           "batch_id": batch.batch_id})
    assert status == 200 and again["already_deleted"]
    assert client.list_constraints(CID, batch_id=batch.batch_id) == []
    status, missing, _ = http(undo, "POST", {"answer_id": "answer-999999"})
    assert status == 404 and "answer-999999" in missing["error"]["message"]

    # a re-check answers two images directly, without a batch
    a, b = pair.image_a, pair.image_b
    status, by_pair, _ = http(url, "POST", {"image_a": a, "image_b": b, "label": "unsure",
                                            "annotator_id": "api-tester", "request_id": "rc-1"})
    assert status == 200 and by_pair["stored"] == 1
    current = client.list_constraints(CID, image_id=a, annotator_id="api-tester")
    assert [(x.image_a, x.image_b, x.label, x.batch_id) for x in current] == [
        (min(a, b), max(a, b), "UNSURE", "")]


def test_json_api_errors_are_clear(server, triton):
    cases = [
        ("GET", "collections/nope", None, 404, "nope"),
        ("GET", f"collections/{CID}/batches/nope", None, 404, "nope"),
        ("GET", f"images/{CID}/nope", None, 404, "nope"),
        ("POST", f"collections/{CID}/answers", {"label": "maybe", "annotator_id": "x",
                                                  "request_id": "r", "image_a": "a",
                                                  "image_b": "b"}, 400, "maybe"),
        ("POST", f"collections/{CID}/answers", {"label": "same", "annotator_id": "x"}, 400,
         "request_id"),
        ("POST", f"collections/{CID}/answers", {"label": "same", "request_id": "r2"}, 400,
         "annotator_id"),
        ("POST", f"collections/{CID}/answers", {"label": "same", "annotator_id": "x",
                                                  "request_id": "r3", "pair_id": "p"}, 400,
         "batch_id"),
        ("POST", f"collections/{CID}/batch", {"budget": -1}, 400, "budget"),
        ("POST", f"collections/{CID}/batch", {"budget": "many"}, 400, "budget"),
        ("GET", f"collections/{CID}/answers", None, 405, "POST"),
        ("GET", "nothing/here", None, 404, "nothing/here"),
    ]
    for method, path, body, status, word in cases:
        got, data, _ = http(api(server, path), method, body)
        assert (got, data["error"]["retryable"]) == (status, False), (path, data)
        assert word in data["error"]["message"], (path, data)
    got, data, _ = http(api(server, f"collections/{CID}/answers"), "POST", raw=b"{}",
                        headers={"Content-Type": "text/plain"})
    assert got == 415  # what a cross-site form could send: refused
    got, data, _ = http(api(server, f"collections/{CID}/answers"), "POST", raw=b"{not json",
                        headers={"Content-Type": "application/json"})
    assert got == 400 and "JSON" in data["error"]["message"]
    got, data, _ = http(api(server, f"collections/{CID}/answers"), "POST",
                        raw=b" " * (64 * 1024 + 1), headers={"Content-Type": "application/json"})
    assert got == 413
    got, data, _ = http(api(server, "collections"), headers={"Host": "evil.example:8080"})
    assert got == 403  # DNS rebinding: a foreign host name pointed at loopback
    got, page, headers = http(server.http_url)
    assert got == 200 and b"static/review.js" in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert http(f"{server.http_url}static/../pyproject.toml")[0] == 404

    # the gRPC server unreachable: 503, retryable, with Retry-After
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    with start_review_http(f"127.0.0.1:{dead}", retries=0, timeout_s=5) as page_server:
        got, data, headers = http(f"{page_server.url}api/collections")
        assert (got, data["error"]["code"], data["error"]["retryable"]) == (
            503, "UNAVAILABLE", True)
        assert headers["Retry-After"]
    with pytest.raises(RuntimeError, match="cannot bind"):
        start_review_http(server.address, port=server.http_port)


def test_serve_and_cli_wiring(server, tmp_path):
    assert server.http_url == f"http://127.0.0.1:{server.http_port}/"
    with pytest.raises(ValueError, match="review page"):
        serve(["sampling"], data_dir=tmp_path, http_port=0)
    parser = build_parser()
    tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
    for argv, port in [(["serve"], 8080), (["serve", "--http-port", "0"], 0),
                       (["serve", "--no-http"], None),
                       (["serve", "--service", "embedding"], None),
                       (["serve", "--auth-tokens", "tokens.json"], 8080),
                       (["serve", *tls], 8080),  # HTTPS (tests/test_web_tls.py)
                       (["serve", *tls, "--tls-client-ca", "ca.pem"], None),
                       (["serve", *tls, "--tls-client-ca", "ca.pem", "--review-client-cert",
                         "p.pem", "--review-client-key", "p.key"], 8080)]:
        assert review_port(parser.parse_args(argv)) == port, argv


# ------------------------------------------------------------------------ access tokens


@pytest.fixture(scope="module")
def secured(triton, tmp_path_factory):
    """A server that checks tokens, with its page: an admin token for both collections,
    an annotator token (pinned name) for the first only, and one the file does not know."""
    from reidal.auth import create_token

    d = tmp_path_factory.mktemp("reidal-web-auth")
    admin, admin_entry = create_token("admin", "*", "admin")
    alice, alice_entry = create_token("alice", [CID], "annotator", annotator="alice")
    stranger, _ = create_token("stranger", "*", "admin")
    (d / "tokens.json").write_text(json.dumps(
        {"tokens": [admin_entry.to_json(), alice_entry.to_json()]}))
    with running_server(triton, d / "data", http_port=0, auth_tokens=d / "tokens.json") as srv:
        with ReidalClient(srv.address, token=admin, timeout_s=60) as c:
            for cid in (CID, "other"):
                c.create_collection(cid)
                c.add_images(cid, [(p.image_id, p.png) for p in photos()[:8]])
        yield srv, {"admin": admin, "alice": alice, "stranger": stranger}


def test_page_sessions_carry_each_persons_token(secured):
    srv, tokens = secured
    status, body, _ = http(api(srv, "session"))
    assert status == 200 and body == {"auth_required": True, "signed_in": False,
                                      "pinned_annotator": ""}
    status, body, _ = http(api(srv, "collections"))
    assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED"
    status, body, _ = http(api(srv, "session"), "POST", {"token": tokens["stranger"]})
    assert status == 401
    status, body, headers = http(api(srv, "session"), "POST", {"token": tokens["alice"]})
    assert status == 200 and body["signed_in"] is True and body["pinned_annotator"] == "alice"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
    assert tokens["alice"] not in cookie and tokens["alice"] not in json.dumps(body)
    jar = {"Cookie": cookie.split(";", 1)[0]}
    assert http(api(srv, "session"), headers=jar)[1] == {
        "auth_required": True, "signed_in": True, "pinned_annotator": "alice"}
    admin_jar = {"Cookie": http(api(srv, "session"), "POST", {"token": tokens["admin"]}
                                )[2]["Set-Cookie"].split(";", 1)[0]}
    assert http(api(srv, "session"), headers=admin_jar)[1]["pinned_annotator"] == ""
    status, body, _ = http(api(srv, "collections"), headers=jar)
    assert status == 200 and [c["collection_id"] for c in body["collections"]] == [CID]
    assert http(api(srv, "collections/other"), headers=jar)[0] == 403
    iid = photos()[0].image_id
    status, data, _ = http(api(srv, f"images/{CID}/{iid}"), headers=jar)
    assert status == 200 and data == photos()[0].png  # images load with the cookie alone
    status, batch, _ = http(api(srv, f"collections/{CID}/batch"), "POST", {"budget": 2},
                            headers=jar)
    assert status == 200 and batch["batch"]["pairs"]
    pair = batch["batch"]["pairs"][0]
    status, body, _ = http(api(srv, f"collections/{CID}/answers"), "POST", {
        "pair_id": pair["pair_id"], "batch_id": batch["batch"]["batch_id"],
        "label": "SAME", "annotator_id": "alice", "request_id": "r-1"}, headers=jar)
    assert status == 200, body
    with ReidalClient(srv.address, token=tokens["admin"]) as c:
        stored = c.list_constraints(CID)
    assert [(a.pair_id, a.annotator_id) for a in stored  # other tests' answers aside
            if a.pair_id == pair["pair_id"]] == [(pair["pair_id"], "alice")]
    status, body, headers = http(api(srv, "session/end"), "POST", {}, headers=jar)
    assert status == 200 and "Max-Age=0" in headers["Set-Cookie"]
    assert http(api(srv, "collections"), headers=jar)[0] == 401  # the session is gone


def test_page_asks_for_the_token_then_shows_a_pinned_name_read_only(secured, browser):
    """The token first; a token pinning "alice" fills the name field with it, read-only (a
    name typed there would have every answer refused), and the answers are stored as alice.
    A token without a pinned name keeps the free field."""
    srv, tokens = secured
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(srv.http_url)
        page.evaluate("localStorage.setItem('reidal.annotator', 'mallory')")  # an old name
        page.reload()
        page.wait_for_selector("#view-token:not([hidden])")
        page.fill("#token-input", "not-a-token")
        page.press("#token-input", "Enter")
        page.wait_for_selector("#token-error:not([hidden])")
        page.fill("#token-input", tokens["alice"])
        page.press("#token-input", "Enter")
        page.wait_for_selector("#view-name:not([hidden])")
        assert page.input_value("#name-input") == "alice"
        assert not page.is_editable("#name-input")
        assert page.is_visible("#name-pinned")
        page.click("#name-input")
        page.keyboard.type("bob")  # typing changes nothing
        assert page.input_value("#name-input") == "alice"
        page.click("#name-submit")
        page.wait_for_selector(f"#collection-list a[href='#/c/{CID}/review']")
        assert page.query_selector("#collection-list a[href='#/c/other/review']") is None
        assert page.inner_text("#who-name") == "alice" and not page.is_visible("#change-name")
        assert tokens["alice"] not in page.content()

        ui = Review(page)
        batch_id = ui.start_batch(CID, 2)
        p = ui.current()
        ui.press(KEYS[_truth(p["image_a"], p["image_b"])])
        ui.settled()
        assert page.query_selector("#alert:not([hidden])") is None
        with ReidalClient(srv.address, token=tokens["admin"]) as c:
            stored = c.list_constraints(CID, batch_id=batch_id)
        assert [(a.pair_id, a.annotator_id) for a in stored] == [(p["pair_id"], "alice")]
    finally:
        context.close()

    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(srv.http_url)
        page.fill("#token-input", tokens["admin"])
        page.press("#token-input", "Enter")
        page.wait_for_selector("#view-name:not([hidden])")
        assert page.is_editable("#name-input") and not page.is_visible("#name-pinned")
        Review(page).sign_in("ops-person")
        page.wait_for_selector("#collection-list a[href='#/c/other/review']")
        assert page.inner_text("#who-name") == "ops-person" and page.is_visible("#change-name")
    finally:
        context.close()


# ------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium); the review page "
                    "is tested in a real browser only")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _truth(pair_a: str, pair_b: str) -> str:
    return "SAME" if TRUTH[pair_a] == TRUTH[pair_b] else "DIFFERENT"


class Review:
    """The review screen as a person at a keyboard sees it."""

    def __init__(self, page) -> None:
        self.page = page

    def sign_in(self, name: str) -> None:
        self.page.fill("#name-input", name)
        self.page.press("#name-input", "Enter")

    def start_batch(self, cid: str, budget: int) -> str:
        self.page.click(f"#collection-list a[href='#/c/{urllib.parse.quote(cid, safe='')}/review']")
        self.page.wait_for_selector("#batch-panel:not([hidden])")
        self.page.fill("#budget-input", str(budget))
        self.page.click("#btn-next-batch")
        self.current()
        return self.page.evaluate(
            "cid => JSON.parse(localStorage.getItem('reidal.review.v1')).sessions[cid].batch_id",
            cid)

    def current(self) -> dict[str, str]:
        """The pair on screen once it accepts answers."""
        box = self.page.wait_for_selector("#pair[data-accepting]")
        return {"pair_id": box.get_attribute("data-pair-id"),
                "image_a": box.get_attribute("data-image-a"),
                "image_b": box.get_attribute("data-image-b")}

    def press(self, key: str) -> None:
        """Press a shortcut and wait until the page moved on from the pair on screen."""
        self._moving_on(lambda: self.page.keyboard.press(key))

    def tap(self, selector: str) -> None:
        self._moving_on(lambda: self.page.tap(selector))

    def _moving_on(self, action) -> None:
        before = self.page.get_attribute("#pair", "data-key")
        action()
        self.page.wait_for_function(
            "k => document.querySelector('#pair').dataset.key !== k"
            " || !document.querySelector('#pair').hasAttribute('data-accepting')", arg=before)

    def settled(self) -> None:
        """Every answer and undo confirmed by the server."""
        self.page.wait_for_selector("body[data-outbox='0']")
        self.page.wait_for_function(
            "!document.querySelector(\"#answer-log li[data-state='pending']\")")

    def log(self) -> list[tuple[str, str, str]]:
        return [(li.get_attribute("data-key"), li.get_attribute("data-label"),
                 li.get_attribute("data-state"))
                for li in self.page.query_selector_all("#answer-log li")]


def test_review_a_batch_with_the_keyboard_undo_reload_and_network_loss(server, client, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    answers_route = "**/api/collections/*/answers"
    try:
        page.goto(server.http_url)
        ui = Review(page)
        ui.sign_in("alice")
        batch_id = ui.start_batch(CID, 6)
        pairs = client.get_query_batch(CID, batch_id).pairs
        assert len(pairs) >= 5, "the cycle asked too few pairs for this test"
        given: dict[str, str] = {}

        first = ui.current()
        page.dblclick("#btn-same")  # the second click lands on the next pair: ignored
        given[first["pair_id"]] = "SAME"
        assert ui.current()["pair_id"] != first["pair_id"]
        ui.settled()
        stored = client.list_constraints(CID, batch_id=batch_id, include_history=True)
        assert [(a.pair_id, a.label) for a in stored] == [(first["pair_id"], "SAME")]

        for _ in range(2):  # two answers with the keyboard, by ground truth
            p = ui.current()
            given[p["pair_id"]] = _truth(p["image_a"], p["image_b"])
            ui.press(KEYS[given[p["pair_id"]]])
        undone = p["pair_id"]
        undone_label = given.pop(undone)
        ui.press("z")  # undo the third: it is shown again, its answer deleted on the server
        assert ui.current()["pair_id"] == undone
        ui.settled()
        assert ui.log()[-1] == (f"pair:{undone}", undone_label, "undone")
        for side in ("a", "b"):  # both images really decoded in the browser
            page.wait_for_selector(f"#viewport-{side}[data-state='loaded']")
            assert page.evaluate(f"document.querySelector('#img-{side}').naturalWidth") == 192
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.evaluate("document.activeElement.blur()")  # no focus ring in the docs' picture
        page.screenshot(path=str(SCREENSHOT))

        page.reload()  # mid-batch: the page resumes at the undone pair, its log intact
        assert ui.current()["pair_id"] == undone
        assert [s for _, _, s in ui.log()] == ["saved", "saved", "undone"]
        given[undone] = "UNSURE"
        ui.press("u")

        # the next answer's response is lost once: the page says so, resends it with the
        # same request id, and the server stores it once
        attempts = []

        def lose_first_response(route):
            attempts.append(json.loads(route.request.post_data))
            if len(attempts) == 1:
                route.fetch()  # the server stores it ...
                route.abort("connectionreset")  # ... and the answer never reaches the page
            else:
                route.continue_()

        page.route(answers_route, lose_first_response)
        p = ui.current()
        given[p["pair_id"]] = _truth(p["image_a"], p["image_b"])
        ui.press(KEYS[given[p["pair_id"]]])
        page.wait_for_selector("#status[data-kind='offline']")
        assert "Connection to the server lost" in page.inner_text("#status")
        ui.settled()
        page.unroute(answers_route)
        assert len(attempts) == 2 and attempts[0]["request_id"] == attempts[1]["request_id"]

        # an answer given while the connection is down, then a reload: sent once, later
        page.route(answers_route, lambda route: route.abort("internetdisconnected"))
        p = ui.current()
        given[p["pair_id"]] = _truth(p["image_a"], p["image_b"])
        ui.press(KEYS[given[p["pair_id"]]])
        page.wait_for_selector("#status[data-kind='offline']")
        assert page.query_selector(f"#answer-log li[data-key='pair:{p['pair_id']}']"
                                   ).get_attribute("data-state") == "pending"
        page.unroute(answers_route)
        page.reload()
        page.wait_for_selector("#pair[data-accepting], #batch-panel:not([hidden])")
        ui.settled()

        while page.is_visible("#pair"):
            p = ui.current()
            given[p["pair_id"]] = _truth(p["image_a"], p["image_b"])
            ui.press(KEYS[given[p["pair_id"]]])
        ui.settled()
        assert "is done" in page.inner_text("#batch-panel-text")
    finally:
        context.close()

    # through the gRPC API: exactly the answers given, once each, all by alice
    current = client.list_constraints(CID, batch_id=batch_id)
    assert {a.pair_id: a.label for a in current} == given
    assert len(given) == len(pairs)
    assert {a.annotator_id for a in current} == {"alice"}
    history = client.list_constraints(CID, batch_id=batch_id, include_history=True)
    assert len(history) == len(pairs) + 1
    deleted = [a for a in history if a.status == "DELETED"]
    assert [(a.pair_id, a.label, a.annotator_id) for a in deleted] == [
        (undone, undone_label, "alice")]
    assert len({a.request_id for a in history}) == len(history)
    assert all(a.request_id.startswith(f"{batch_id}:{a.pair_id}:") for a in history)


def test_summary_lists_identities_and_opens_contradictions(server, client, browser):
    ids = sorted(TRUTH)
    a, b, c = ids[0], ids[1], ids[2]  # two SAME answers joining the ends of a DIFFERENT one
    client.submit_answers(CID, [(a, b, "same"), (b, c, "same"), (a, c, "different")],
                          annotator_id="carol")
    identities = client.get_identities(CID)
    assert identities.contradictions
    context = browser.new_context(viewport={"width": 820, "height": 1180}, has_touch=True)
    page = context.new_page()  # a tablet, upright
    try:
        page.goto(f"{server.http_url}#/c/{CID}/summary")
        ui = Review(page)
        ui.sign_in("bob")
        page.wait_for_selector("#identity-list article")
        shown = {art.get_attribute("data-identity-id"): int(art.get_attribute("data-size"))
                 for art in page.query_selector_all("#identity-list article")}
        assert shown == {x.identity_id: x.size for x in identities.identities if x.size > 1}
        singles = page.query_selector_all("#singleton-grid li")
        assert len(singles) == sum(x.size == 1 for x in identities.identities)
        grid = page.query_selector_all("#identity-list img")
        assert len(grid) == sum(x.size for x in identities.identities if x.size > 1)
        assert all(img.get_attribute("alt") for img in grid)
        items = page.query_selector_all("#contradiction-list > li")
        assert len(items) == len(identities.contradictions)

        involved = {frozenset((x.image_a, x.image_b)) for x in identities.contradictions[0].answers}
        page.tap("#contradiction-list > li:first-child a")
        shown_pairs = set()
        for _ in involved:
            p = ui.current()
            assert page.is_visible("#current-answer-row")
            shown_pairs.add(frozenset((p["image_a"], p["image_b"])))
            ui.tap("#btn-different" if TRUTH[p["image_a"]] != TRUTH[p["image_b"]]
                   else "#btn-same")
        assert shown_pairs == involved
        ui.settled()
        rechecked = client.list_constraints(CID, annotator_id="bob")
        assert {frozenset((x.image_a, x.image_b)) for x in rechecked if not x.batch_id} == involved
    finally:
        context.close()
