"""The subset of the Wildbook REST API the adapter uses (docs/wildbook.md), over urllib.

Only the standard library speaks HTTP here, so the adapter adds no dependency to a
Wildbook deployment's Python environment. Every request has a timeout, and every failure
(an HTTP error status, a refused connection, a timeout, a body that is not the JSON the
endpoint promises) is raised as a :class:`WildbookError` naming the method, the URL and
the cause, never as a bare ``urllib`` exception. The bearer token is sent in the
``Authorization`` header and never appears in an error message, a log line or a repr.

Endpoints (Wildbook 10 ``/api/v3``; the last one is our assumption, see the docs):

- ``POST /api/v3/search/encounter?from=&size=``: encounter ids (OpenSearch query body).
- ``GET  /api/v3/encounters/{id}``: one encounter with its media assets and annotations.
- ``GET  <media asset url>``: the image bytes.
- ``POST /api/v3/identity-proposals``: proposed individual assignments (OURS).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("reidal_wildbook")

SEARCH_PATH = "/api/v3/search/encounter"
ENCOUNTER_PATH = "/api/v3/encounters/"
#: Not part of Wildbook: the endpoint a site adds to receive proposals (docs/wildbook.md).
PROPOSALS_PATH = "/api/v3/identity-proposals"
USER_AGENT = "reidal-wildbook/0.1"
#: Largest image the adapter downloads (bytes); a larger one is an error, not a hang.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024


class WildbookError(Exception):
    """A Wildbook request failed: ``status`` is the HTTP status (None when no response
    came: refused, unreachable, timed out), ``method`` and ``url`` name the request."""

    def __init__(self, message: str, *, method: str = "", url: str = "",
                 status: int | None = None) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.message = message
        where = f"{method} {url}: " if method else ""
        super().__init__(f"{where}{message}")


class WildbookNotFound(WildbookError, LookupError):
    """HTTP 404: an unknown encounter, media asset or endpoint."""


@dataclass(frozen=True)
class WildbookAnnotation:
    """One annotation as the adapter uses it: a reidal image, and what Wildbook knows.

    ``individual_id`` / ``individual_name``: the encounter's individual (Wildbook assigns
    individuals per encounter), None when the encounter is unassigned. ``bbox``: (x, y,
    width, height) in pixels of the media asset, None for a whole-image ("trivial")
    annotation.
    """

    annotation_id: str
    encounter_id: str
    image_url: str
    species: str = ""
    individual_id: str | None = None
    individual_name: str | None = None
    bbox: tuple[int, int, int, int] | None = None
    media_asset_id: str = ""
    viewpoint: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def named(self) -> bool:
        return self.individual_id is not None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _bbox(ann: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """The annotation's box, or None when it covers the whole media asset."""
    if ann.get("isTrivial") or ann.get("trivial"):
        return None
    try:
        box = tuple(int(round(float(ann[k]))) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        return None
    return box if box[2] > 0 and box[3] > 0 else None  # type: ignore[return-value]


def annotations_from_encounter(doc: Mapping[str, Any], base_url: str
                               ) -> list[WildbookAnnotation]:
    """The annotations of one ``GET /api/v3/encounters/{id}`` document.

    A media asset may also carry annotations of other encounters (two animals in one
    photo); only those whose ``encounterId`` is this encounter (or that name none) are
    taken, so each annotation is read once, with its own encounter's individual. Media
    asset URLs may be relative: they are resolved against ``base_url``.
    """
    enc_id = _text(doc.get("id"))
    if not enc_id:
        raise ValueError(f"encounter document without an id: {str(doc)[:120]}")
    individual_id = _text(doc.get("individualId")) or None
    individual_name = _text(doc.get("individualDisplayName")) or None
    species = _text(doc.get("taxonomy"))
    out = []
    for asset in doc.get("mediaAssets") or []:
        url = _text(asset.get("url"))
        for ann in asset.get("annotations") or []:
            if _text(ann.get("encounterId")) not in ("", enc_id):
                continue
            ann_id = _text(ann.get("id"))
            if not ann_id:
                raise ValueError(f"encounter {enc_id}: an annotation without an id")
            if not url:
                raise ValueError(f"encounter {enc_id}: annotation {ann_id} has a media asset "
                                 "without a url")
            meta = {"encounter_id": enc_id, "media_asset_id": _text(asset.get("id"))}
            for key, value in (("species", species), ("viewpoint", ann.get("viewpoint")),
                               ("individual_name", individual_name),
                               ("location", doc.get("locationId")), ("date", doc.get("date"))):
                if value:
                    meta[key] = _text(value)
            out.append(WildbookAnnotation(
                annotation_id=ann_id, encounter_id=enc_id,
                image_url=urllib.parse.urljoin(base_url + "/", url), species=species,
                individual_id=individual_id, individual_name=individual_name,
                bbox=_bbox(ann), media_asset_id=_text(asset.get("id")),
                viewpoint=_text(ann.get("viewpoint")), metadata=meta))
    return out


def species_query(species: str | None) -> dict[str, Any]:
    """The OpenSearch query of the encounter search: every encounter, or one taxonomy
    (the same ``match`` on ``taxonomy`` that Wildbook's own front end sends)."""
    if not species:
        return {"query": {"match_all": {}}}
    return {"query": {"bool": {"filter": [{"match": {"taxonomy": species}}]}}}


class WildbookClient:
    """A Wildbook (or Wildbook-compatible) server at ``base_url``.

    token: a Wildbook API token, sent as ``Authorization: Bearer``. timeout_s: per request
    (connect and each read). page_size: encounters per search request.
    """

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = 30.0,
                 page_size: int = 100, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not 1 <= page_size <= 10000:
            raise ValueError(f"page_size must be in [1, 10000], got {page_size}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.page_size = int(page_size)
        self.max_image_bytes = int(max_image_bytes)
        self._token = token or None

    def __repr__(self) -> str:
        auth = ", token=***" if self._token else ""
        return f"WildbookClient({self.base_url!r}{auth}, timeout_s={self.timeout_s})"

    # ------------------------------------------------------------------ transport

    def _url(self, path_or_url: str, query: Mapping[str, Any] | None = None) -> str:
        url = urllib.parse.urljoin(self.base_url + "/", path_or_url)
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return url

    def _request(self, method: str, url: str, body: Any = None, *,
                 accept: str = "application/json", limit: int | None = None
                 ) -> tuple[bytes, Mapping[str, str]]:
        """Send one request; the response body and headers, or a WildbookError."""
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                payload = resp.read(limit + 1) if limit else resp.read()
                if limit and len(payload) > limit:
                    raise WildbookError(f"response larger than {limit} bytes", method=method,
                                        url=url, status=resp.status)
                return payload, dict(resp.headers.items())
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            cls = WildbookNotFound if exc.code == 404 else WildbookError
            raise cls(f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else ""),
                      method=method, url=url, status=exc.code) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise WildbookError(f"timed out after {self.timeout_s:g} s", method=method,
                                    url=url) from None
            raise WildbookError(f"cannot reach the server: {reason}", method=method,
                                url=url) from None
        except TimeoutError:
            raise WildbookError(f"timed out after {self.timeout_s:g} s", method=method,
                                url=url) from None
        except (ConnectionError, OSError) as exc:  # reset or closed mid-response
            raise WildbookError(f"connection failed: {exc}", method=method, url=url) from None

    def _json(self, method: str, url: str, body: Any = None) -> tuple[Any, Mapping[str, str]]:
        payload, headers = self._request(method, url, body)
        try:
            return json.loads(payload.decode("utf-8")), headers
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WildbookError(f"response is not JSON: {payload[:120]!r}", method=method,
                                url=url) from None

    # ------------------------------------------------------------------ endpoints

    def search_encounters(self, species: str | None = None,
                          query: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every encounter document the search returns, page by page (``from`` / ``size``
        query parameters; stops at a short page or at ``X-Wildbook-Total-Hits``)."""
        body = dict(query) if query is not None else species_query(species)
        start = 0
        while True:
            url = self._url(SEARCH_PATH, {"from": start, "size": self.page_size})
            doc, headers = self._json("POST", url, body)
            hits = doc.get("hits") if isinstance(doc, dict) else None
            if not isinstance(hits, list):
                raise WildbookError("search response has no 'hits' list", method="POST",
                                    url=url)
            yield from hits
            start += len(hits)
            total = _int_header(headers, "X-Wildbook-Total-Hits")
            if len(hits) < self.page_size or (total is not None and total >= 0
                                              and start >= total):
                return

    def get_encounter(self, encounter_id: str) -> dict[str, Any]:
        url = self._url(ENCOUNTER_PATH + urllib.parse.quote(encounter_id, safe=""))
        doc, _ = self._json("GET", url)
        if not isinstance(doc, dict) or (doc.get("success") is False):
            raise WildbookError(f"unexpected encounter document: {str(doc)[:120]}",
                                method="GET", url=url)
        return doc

    def annotations(self, species: str | None = None,
                    progress: Callable[[int, int | None], None] | None = None
                    ) -> list[WildbookAnnotation]:
        """Every annotation of every readable encounter of ``species`` (None: all).

        Search hits the caller may not read in full (``"access": "none"``) are skipped:
        Wildbook itself withholds their media. ``progress(done, total)`` after each
        encounter (total: None, the search count is not known up front).
        """
        out: list[WildbookAnnotation] = []
        seen: set[str] = set()
        for n, hit in enumerate(self.search_encounters(species), start=1):
            enc_id = _text(hit.get("id"))
            if not enc_id or enc_id in seen or hit.get("access") == "none":
                continue
            seen.add(enc_id)
            out.extend(annotations_from_encounter(self.get_encounter(enc_id), self.base_url))
            if progress is not None:
                progress(n, None)
        return out

    def fetch_image(self, url: str) -> bytes:
        """The bytes at a media asset URL (relative URLs resolve against the base URL)."""
        full = self._url(url)
        payload, _ = self._request("GET", full, accept="image/*",
                                   limit=self.max_image_bytes)
        if not payload:
            raise WildbookError("empty image", method="GET", url=full)
        return payload

    def post_proposals(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Send proposals; the server's JSON answer (``accepted``, ``rejected``)."""
        url = self._url(PROPOSALS_PATH)
        doc, _ = self._json("POST", url, payload)
        if not isinstance(doc, dict) or doc.get("success") is False:
            raise WildbookError(f"proposals refused: {str(doc)[:200]}", method="POST", url=url)
        return doc


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's own words from an error body: its JSON ``error`` / ``message`` /
    ``debug`` field, else the first 200 characters of the text."""
    try:
        body = exc.read(4096).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a broken body must not hide the status
        return ""
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:200]
    if isinstance(doc, dict):
        for key in ("error", "message", "debug", "errors"):
            if doc.get(key) not in (None, ""):
                return str(doc[key])[:200]
    return body.strip()[:200]


__all__ = ["ENCOUNTER_PATH", "PROPOSALS_PATH", "SEARCH_PATH", "WildbookAnnotation",
           "WildbookClient", "WildbookError", "WildbookNotFound",
           "annotations_from_encounter", "species_query"]
