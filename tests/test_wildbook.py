"""The Wildbook adapter against a local Wildbook stand-in and a real reidal server.

The stand-in (tests/_wildbook_fake.py) speaks the REST subset of docs/wildbook.md over
real HTTP on loopback and serves generated photos of six individuals: three named in
Wildbook (each with one unassigned sighting), three unknown, two of them sharing one
photo as two boxes. reidal is the real all-in-one server with the real Triton. What the
adapter did is read back independently: the images through ListImages, the answers
through ListConstraints (checked against the stand-in's names with a union-find written
here), the identities through GetIdentities, the proposals as the stand-in recorded them.
"""

from __future__ import annotations

import io
import socket
from collections import defaultdict

import numpy as np
import pytest
from _services_support import pictures, running_server
from _wildbook_fake import FakeWildbook

from reidal_client import ClusteringParams, ReidalClient, StoredAnswer
from reidal_wildbook import (
    ReidalLCABackend,
    WildbookClient,
    WildbookError,
    WildbookNotFound,
    WildbookSync,
    build_proposals,
    crop_to_box,
    decision_label,
    plan_answers,
)
from reidal_wildbook.cli import main as cli_main

ZEBRA = "Equus quagga"
COLLECTION = "wb-zebras"
SMALL = ClusteringParams(k1=6, k2=2, min_samples=2)


# --------------------------------------------------------------------------- data


def composite(left: bytes, right: bytes) -> bytes:
    """Two 64 px photos side by side in one 128 x 64 PNG (two animals in one picture)."""
    from PIL import Image

    a, b = Image.open(io.BytesIO(left)), Image.open(io.BytesIO(right))
    out = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def build_wildbook() -> tuple[FakeWildbook, dict[str, str]]:
    """The stand-in's data, and the ground truth: annotation id -> true identity."""
    fake = FakeWildbook()
    pics = pictures(6, 4, seed=3)
    by_ind: dict[str, list] = defaultdict(list)
    for p in pics:
        by_ind[p.identity].append(p)
    truth: dict[str, str] = {}

    def whole(p) -> dict:
        truth[f"ann-{p.image_id}"] = p.identity
        return {"id": f"ma-{p.image_id}", "url": fake.add_media(f"{p.image_id}.png", p.png),
                "annotations": [{"id": f"ann-{p.image_id}", "isTrivial": True,
                                 "viewpoint": p.viewpoint}]}

    for k, ind in enumerate(sorted(by_ind)):
        p0, p1, p2, p3 = by_ind[ind]
        named = {"individual_id": f"wb-{k}", "name": f"Zebra {k}"} if k < 3 else {}
        fake.add_encounter(f"E{k}a", ZEBRA, [whole(p0), whole(p1)], **named)
        fake.add_encounter(f"E{k}b", ZEBRA, [whole(p2)], **named)
        if k < 4:
            fake.add_encounter(f"E{k}c", ZEBRA, [whole(p3)])  # an unassigned sighting
    # Individuals 4 and 5 photographed together: one media asset, two boxes.
    q4, q5 = by_ind[sorted(by_ind)[4]][3], by_ind[sorted(by_ind)[5]][3]
    url = fake.add_media("group.png", composite(q4.png, q5.png))
    boxes = {"E4c": (q4, 0), "E5c": (q5, 64)}
    asset_anns = [{"id": f"ann-{q.image_id}", "encounterId": enc, "x": x, "y": 0, "width": 64,
                   "height": 64, "isTrivial": False} for enc, (q, x) in boxes.items()]
    for enc, (q, _) in boxes.items():
        truth[f"ann-{q.image_id}"] = q.identity
        fake.add_encounter(enc, ZEBRA, [{"id": "ma-group", "url": url,
                                         "annotations": [dict(a) for a in asset_anns]}])
    # Another species, left out by the species filter.
    fake.add_encounter("G0", "Giraffa tippelskirchi", [{
        "id": "ma-g0", "url": fake.add_media("g0.png", pics[0].png),
        "annotations": [{"id": "ann-giraffe", "isTrivial": True}]}])
    return fake, truth


def wildbook_groups(fake: FakeWildbook) -> dict[str, str]:
    """annotation id -> its must-link group as the stand-in has it now (independent of
    the adapter: read straight from the stand-in's documents)."""
    out = {}
    for enc in fake.encounters.values():
        if enc["taxonomy"] != ZEBRA:
            continue
        for asset in enc["mediaAssets"]:
            for ann in asset["annotations"]:
                if ann["encounterId"] == enc["id"]:
                    out[ann["id"]] = (f"i:{enc['individualId']}" if enc["individualId"]
                                      else f"e:{enc['id']}")
    return out


def components(nodes, edges) -> dict[str, str]:
    parent = {n: n for n in nodes}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[find(a)] = find(b)
    return {n: find(n) for n in nodes}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wildbook():
    fake, truth = build_wildbook()
    fake.start()
    fake.truth = truth  # type: ignore[attr-defined]
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory):
    with running_server(triton, tmp_path_factory.mktemp("reidal-wildbook")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with ReidalClient(server.address, timeout_s=60) as c:
        yield c


def make_sync(wildbook, client, **kw) -> WildbookSync:
    kw.setdefault("species", ZEBRA)
    kw.setdefault("clustering", SMALL)
    return WildbookSync(WildbookClient(wildbook.url, timeout_s=10, page_size=5), client,
                        kw.pop("collection", COLLECTION), **kw)


@pytest.fixture(scope="module")
def synced(wildbook, client):
    """One full sync into a fresh collection (created by the sync itself), with DIFFERENT
    answers between the named individuals so that NP3 keeps them apart."""
    lines: list[str] = []
    report = make_sync(wildbook, client, stage=lines.append, different_between_names=True).run()
    return report, lines


# ------------------------------------------------------------------ no reidal needed


def test_pull_reads_annotations_across_pages(wildbook):
    wb = WildbookClient(wildbook.url, timeout_s=10, page_size=5)
    before = len(wildbook.requests)
    anns = wb.annotations(ZEBRA)
    searches = [r for r in wildbook.requests[before:] if r.path == "/api/v3/search/encounter"]
    assert len(searches) == 4  # 18 zebra encounters, 5 per page: 5 + 5 + 5 + 3
    assert [int(r.query["from"][0]) for r in searches] == [0, 5, 10, 15]
    truth = wildbook.truth
    assert sorted(a.annotation_id for a in anns) == sorted(truth)
    docs = {e["id"]: e for e in wildbook.encounters.values()}
    for a in anns:
        enc = docs[a.encounter_id]
        assert a.species == ZEBRA
        assert a.individual_id == enc["individualId"]
        assert a.individual_name == enc["individualDisplayName"]
        assert a.image_url.startswith(wildbook.url + "/media/")
    boxed = {a.annotation_id: a.bbox for a in anns if a.bbox is not None}
    assert sorted(boxed.values()) == [(0, 0, 64, 64), (64, 0, 64, 64)]
    assert len(wb.annotations(None)) == len(truth) + 1  # the giraffe too


def test_crop_cuts_exactly_the_box():
    from PIL import Image

    pics = pictures(6, 4, seed=3)
    group = composite(pics[0].png, pics[5].png)
    for pic, x in ((pics[0], 0), (pics[5], 64)):
        got = np.asarray(Image.open(io.BytesIO(crop_to_box(group, (x, 0, 64, 64)))))
        assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(pic.png))))
    assert crop_to_box(group, None) == group
    with pytest.raises(ValueError, match="outside"):
        crop_to_box(group, (500, 0, 10, 10))


def _stored(a: str, b: str, label: str, annotator: str = "someone", n: int = 0
            ) -> StoredAnswer:
    return StoredAnswer(f"ans-{n}", a, b, label, annotator, (), None, "", None, None, None,
                        "", "", "", "CURRENT", "")


def test_plan_answers_spans_each_group_minimally():
    """Random groups and random answers already present: the planned SAME answers plus
    the present ones connect every group, with one answer per missing join, none on a
    pair already answered and none across groups (checked by a union-find here)."""
    from reidal_wildbook.api import WildbookAnnotation

    rng = np.random.default_rng(7)
    anns = []
    for k in range(60):
        ind = int(rng.integers(0, 8))
        anns.append(WildbookAnnotation(
            f"a{k:03d}", f"enc{k // 2}", "http://x/y.png",
            individual_id=f"ind{ind}" if ind < 5 else None))
    ids = [a.annotation_id for a in anns]
    current = [_stored(ids[i], ids[j], "SAME" if rng.random() < 0.7 else "DIFFERENT", n=n)
               for n, (i, j) in enumerate(rng.integers(0, len(ids), size=(40, 2)).tolist())
               if i != j]
    plan = plan_answers(anns, current)
    assert plan.remove == ()
    group = {a.annotation_id: (f"i{a.individual_id}" if a.individual_id else f"e{a.encounter_id}")
             for a in anns}
    answered = {frozenset((s.image_a, s.image_b)) for s in current}
    for ans in plan.add:
        a, b = ans.images
        assert ans.label == "SAME" and group[a] == group[b]
        assert frozenset((a, b)) not in answered
    present = [(s.image_a, s.image_b) for s in current
               if s.label == "SAME" and group[s.image_a] == group[s.image_b]]
    before = components(ids, present)
    after = components(ids, present + [ans.images for ans in plan.add])
    for g in set(group.values()):
        members = [i for i in ids if group[i] == g]
        assert len({after[i] for i in members}) == 1 or plan.skipped > 0
        joins = len({before[i] for i in members}) - 1
        assert sum(group[ans.images[0]] == g for ans in plan.add) <= joins
    assert len(plan.add) + plan.skipped == sum(
        len({before[i] for i in ids if group[i] == g}) - 1 for g in set(group.values()))


def test_plan_answers_owns_only_its_own_answers():
    from reidal_wildbook.api import WildbookAnnotation

    anns = [WildbookAnnotation("a1", "e1", "u", individual_id="x"),
            WildbookAnnotation("a2", "e2", "u", individual_id="x"),
            WildbookAnnotation("a3", "e3", "u", individual_id="y"),
            WildbookAnnotation("a4", "e4", "u")]
    current = [_stored("a1", "a3", "DIFFERENT", "wildbook", 1),   # option off: stale
               _stored("a2", "a3", "SAME", "wildbook", 2),        # names differ: stale
               _stored("a1", "a4", "SAME", "alice", 3),           # a person's: kept
               _stored("a1", "a2", "DIFFERENT", "alice", 4),      # a person said no
               _stored("a3", "zz", "SAME", "wildbook", 5)]        # outside the pull: kept
    plan = plan_answers(anns, current)
    assert sorted(s.answer_id for s in plan.remove) == ["ans-1", "ans-2"]
    assert plan.add == () and plan.skipped == 1  # a1-a2 is answered by alice already
    on = plan_answers(anns, current, different_between_names=True)
    assert [s.answer_id for s in on.remove] == ["ans-2"] and on.different == 0
    few = plan_answers(anns, current[1:], different_between_names=True,
                       max_named_for_different=1)
    assert few.different == 0 and "max_named_for_different" in few.note


def test_http_errors_are_clear_exceptions(wildbook):
    wb = WildbookClient(wildbook.url, timeout_s=0.5)
    wildbook.failures["/api/v3/encounters/E1b"] = (500, "database down")
    try:
        with pytest.raises(WildbookError) as err:
            wb.get_encounter("E1b")
    finally:
        del wildbook.failures["/api/v3/encounters/E1b"]
    assert err.value.status == 500 and "database down" in str(err.value)
    assert "GET" in str(err.value) and "/api/v3/encounters/E1b" in str(err.value)

    with pytest.raises(WildbookNotFound) as missing:
        wb.get_encounter("no-such-encounter")
    assert missing.value.status == 404 and isinstance(missing.value, LookupError)

    wildbook.not_json.add("/api/v3/search/")
    try:
        with pytest.raises(WildbookError, match="not JSON"):
            wb.annotations(ZEBRA)
    finally:
        wildbook.not_json.discard("/api/v3/search/")

    wildbook.delays["/media/slow"] = 1.5
    try:
        with pytest.raises(WildbookError, match="timed out after 0.5 s"):
            wb.fetch_image("/media/slow.png")
    finally:
        del wildbook.delays["/media/slow"]

    with pytest.raises(WildbookError, match="cannot reach"):
        WildbookClient(f"http://127.0.0.1:{free_port()}", timeout_s=2).get_encounter("E0a")

    wildbook.token = "s3cret-token"
    try:
        with pytest.raises(WildbookError) as denied:
            wb.get_encounter("E0a")
        assert denied.value.status == 401
        authed = WildbookClient(wildbook.url, token="s3cret-token", timeout_s=2)
        assert authed.get_encounter("E0a")["id"] == "E0a"
        assert "s3cret" not in repr(authed)
    finally:
        wildbook.token = None

    with pytest.raises(ValueError, match="http"):
        WildbookClient("ftp://example.org")


# ------------------------------------------------------------------ against reidal


def test_sync_ingests_every_annotation(synced, wildbook, client):
    report, lines = synced
    truth = wildbook.truth
    images = {i.image_id: i for i in client.list_images(COLLECTION)}
    assert sorted(images) == sorted(truth)  # the giraffe filtered out by species
    assert report.images_added == len(truth) and report.annotations == len(truth)
    docs = {e["id"]: e for e in wildbook.encounters.values()}
    for info in images.values():
        enc = docs[info.metadata["encounter_id"]]
        assert info.name == (enc["individualId"] or "")
        assert info.embedded
    assert client.get_collection(COLLECTION).clustering.k1 == SMALL.k1
    assert any("annotations in" in line for line in lines)


def test_names_become_spanning_same_answers(synced, wildbook, client):
    report, _ = synced
    groups = wildbook_groups(wildbook)
    answers = client.list_constraints(COLLECTION, annotator_id="wildbook")
    same = [a for a in answers if a.label == "SAME"]
    for a in same:
        assert groups[a.image_a] == groups[a.image_b]
    members: dict[str, list[str]] = defaultdict(list)
    for ann, g in groups.items():
        members[g].append(ann)
    expected = sum(len(m) - 1 for m in members.values())
    assert len(same) == expected == report.same_added == 9  # a chain, not all pairs
    roots = components(list(groups), [(a.image_a, a.image_b) for a in same])
    for m in members.values():
        assert len({roots[x] for x in m}) == 1
    # different_between_names: one DIFFERENT answer per pair of named individuals.
    diff = [a for a in answers if a.label == "DIFFERENT"]
    assert len(diff) + len(same) == len(answers)
    assert {frozenset((groups[a.image_a], groups[a.image_b])) for a in diff} == {
        frozenset(p) for p in (("i:wb-0", "i:wb-1"), ("i:wb-0", "i:wb-2"),
                               ("i:wb-1", "i:wb-2"))} and len(diff) == 3
    # So reidal keeps every named individual whole and apart from the others.
    identity = client.get_identities(COLLECTION).assignment()
    named = {g: {identity[x] for x in m} for g, m in members.items() if g.startswith("i:")}
    assert all(len(ids) == 1 for ids in named.values())
    assert len(set().union(*named.values())) == 3


def test_identities_are_pushed_as_proposals_for_unnamed_encounters(wildbook, client):
    # A sync of its own into a fresh collection (the shared one gets other tests' answers,
    # in any order), read from what the fake Wildbook received since (other tests push too).
    cid = "wb-proposals"
    start = len(wildbook.proposals)
    report = make_sync(wildbook, client, collection=cid, different_between_names=True).run()
    pushed = wildbook.proposals[start:]
    docs = {e["id"]: e for e in wildbook.encounters.values() if e["taxonomy"] == ZEBRA}
    unnamed = {e for e, d in docs.items() if not d["individualId"]}
    got = {p["encounterId"]: p for p in pushed}
    assert len(got) == len(pushed) == report.sent == report.accepted
    assert not set(got) - unnamed  # never a proposal for a named encounter
    assert len(got) + len(report.conflicts) == len(unnamed) == 12
    assert wildbook.writes() == []  # nothing assigned, only proposed
    # Independent reading of GetIdentities: who should each unnamed encounter be?
    identities = client.get_identities(cid)
    anns_of = {enc: sorted(x["id"] for m in d["mediaAssets"] for x in m["annotations"]
                           if x["encounterId"] == enc) for enc, d in docs.items()}
    name_of = {a: docs[enc]["individualId"] for enc, anns in anns_of.items() for a in anns}
    identity_of = identities.assignment()
    members = {x.identity_id: x.image_ids for x in identities.identities}
    for enc, p in got.items():
        assert sorted(p["annotationIds"]) == anns_of[enc]
        (ident,) = {identity_of[a] for a in anns_of[enc]}
        names = {name_of[a] for a in members[ident] if name_of[a]}
        assert len(names) <= 1
        assert p["individualId"] == (names.pop() if names else None)
        assert p["newIndividual"] == (p["individualId"] is None)
        assert p["reidalIdentityId"] == ident
        assert sorted(p["clusterAnnotationIds"]) == sorted(members[ident])
        if p["individualId"]:
            assert p["individualDisplayName"] == f"Zebra {p['individualId'][-1]}"
            assert p["matchedAnnotationIds"] and all(
                name_of[a] == p["individualId"] for a in p["matchedAnnotationIds"])
    assert any(p["individualId"] for p in got.values())  # some sightings matched a name
    assert any(p["newIndividual"] for p in got.values())
    for line in report.conflicts:  # a conflict really is one
        enc = line.split(":")[0].removeprefix("encounter ")
        held = {identity_of[a] for a in anns_of[enc]}
        assert len(held) > 1 or len({name_of[a] for a in members[held.pop()]
                                     if name_of[a]}) > 1


def test_a_confirmed_name_is_never_overwritten(synced, wildbook, client):
    sync = make_sync(wildbook, client)
    anns = sync.pull()
    proposals, _ = build_proposals(anns, client.get_identities(COLLECTION))
    target = proposals[0].encounter_id
    wildbook.set_individual(target, "wb-9", "Zebra 9")  # named in Wildbook meanwhile
    wildbook.proposals.clear()
    try:
        from reidal_wildbook.sync import SyncReport

        report = SyncReport()
        sent = sync.push(proposals, report)
        assert report.named_meanwhile == 1 and target not in {p.encounter_id for p in sent}
        assert target not in {p["encounterId"] for p in wildbook.proposals}
        assert len(wildbook.proposals) == len(proposals) - 1
        # Without the re-read the receiver's own guard refuses it, and the adapter says so.
        wildbook.proposals.clear()
        report = SyncReport()
        sync.push(proposals, report, recheck=False)
        assert [r["encounterId"] for r in report.rejected] == [target]
        assert wildbook.encounters[target]["individualId"] == "wb-9"
        assert wildbook.writes() == []
    finally:
        wildbook.set_individual(target, None)


def test_resync_is_idempotent_and_follows_renames(synced, wildbook, client):
    again = make_sync(wildbook, client, different_between_names=True).run()
    assert (again.images_added, again.same_added, again.answers_removed) == (0, 0, 0)
    assert again.images_present == len(wildbook.truth)

    # Encounter E0b moves from individual wb-0 to wb-1 in Wildbook.
    wildbook.set_individual("E0b", "wb-1", "Zebra 1")
    try:
        report = make_sync(wildbook, client, different_between_names=True).run()
        assert report.answers_removed >= 1 and report.same_added >= 1
        groups = wildbook_groups(wildbook)
        ours = client.list_constraints(COLLECTION, annotator_id="wildbook")
        for a in ours:
            if a.label == "SAME":
                assert groups[a.image_a] == groups[a.image_b]
        same = [(a.image_a, a.image_b) for a in client.list_constraints(COLLECTION, label="SAME")
                if a.image_a in groups and a.image_b in groups
                and groups[a.image_a] == groups[a.image_b]]
        roots = components(list(groups), same)
        members: dict[str, set[str]] = defaultdict(set)
        for ann, g in groups.items():
            members[g].add(roots[ann])
        assert all(len(r) == 1 for r in members.values())
        # One DIFFERENT answer per pair of the three named individuals.
        diff = [a for a in ours if a.label == "DIFFERENT"]
        named = {a: g for a, g in groups.items() if g.startswith("i:")}
        assert len(diff) == 3 and report.different_added == 0  # still between the same three
        assert {frozenset((named[a.image_a], named[a.image_b])) for a in diff} == {
            frozenset(p) for p in (("i:wb-0", "i:wb-1"), ("i:wb-0", "i:wb-2"),
                                   ("i:wb-1", "i:wb-2"))}
    finally:
        wildbook.set_individual("E0b", "wb-0", "Zebra 0")
        restored = make_sync(wildbook, client, different_between_names=True).run(push=False)
    assert restored.answers_removed >= 1 and restored.same_added >= 1


def test_lca_backend_step_loop(synced, wildbook, client):
    truth = wildbook.truth
    lca = ReidalLCABackend(client, COLLECTION, budget=2, annotator_id="lca-human")
    requested = lca.step([("ann-x", "ann-y", 0.93, "miewid")])  # verifier edges: ignored
    assert lca.num_ignored_edges == 1
    stored: dict[frozenset, str] = {}
    rounds = 0
    for round_ in range(8):
        if lca.is_finished():
            break
        assert 0 < len(requested) <= 2
        rounds += 1
        assert all(a in truth and b in truth and 0.0 <= s <= 1.0 for a, b, s in requested)
        if round_ % 2 == 0:  # LCA's unified form, as its run loop converts reviews
            edges = [(a, b, 1.0 if truth[a] == truth[b] else 0.0, "human")
                     for a, b, _ in requested]
        else:  # the reviewer's own (n0, n1, decision)
            edges = [(a, b, truth[a] == truth[b]) for a, b, _ in requested]
        for a, b, _ in requested:
            stored[frozenset((a, b))] = "SAME" if truth[a] == truth[b] else "DIFFERENT"
        requested = lca.step(edges)
    assert lca.num_human_reviews == len(stored) > 0
    assert rounds >= 2  # both edge forms went through
    answers = client.list_constraints(COLLECTION, annotator_id="lca-human")
    assert {frozenset((a.image_a, a.image_b)): a.label for a in answers} == stored
    clustering, node2cid, graph = lca.get_clustering()
    assert sorted(node2cid) == sorted(truth)
    assert sum(len(c) for c in clustering.values()) == len(truth)
    ids = client.get_identities(COLLECTION)
    assert {x.identity_id: set(x.image_ids) for x in ids.identities} == clustering
    for pair, label in stored.items():
        a, b = tuple(pair)
        assert graph.edges[a, b]["label"] == {"SAME": "positive", "DIFFERENT": "negative"}[label]
    assert decision_label("incomparable") == "UNSURE" and decision_label(0.2) == "DIFFERENT"
    with pytest.raises(ValueError, match="edge"):
        lca.step([("a", "b")])


def test_broken_images_fail_clearly_or_are_skipped(synced, wildbook, client):
    """Every species this time: only the giraffe is new, and its image is broken."""
    # the zebras as the synced fixture left them (a test before may have synced otherwise)
    make_sync(wildbook, client, different_between_names=True).run(push=False)
    wildbook.failures["/media/g0.png"] = (503, "storage offline")
    try:
        with pytest.raises(WildbookError, match="annotation ann-giraffe.*503.*storage offline"):
            make_sync(wildbook, client, species=None).run(push=False)
        report = make_sync(wildbook, client, species=None, different_between_names=True,
                           skip_broken_images=True).run(push=False)
    finally:
        del wildbook.failures["/media/g0.png"]
    assert (report.annotations, report.images_skipped, report.images_added) == (25, 1, 0)
    assert any("ann-giraffe" in note for note in report.notes)
    assert "ann-giraffe" not in {i.image_id for i in client.list_images(COLLECTION)}
    assert report.same_added == report.different_added == report.answers_removed == 0


def test_cli_sync(synced, wildbook, server, capsys):
    code = cli_main(["sync", "--wildbook", wildbook.url, "--reidal", server.address,
                     "--collection", COLLECTION, "--species", ZEBRA, "--page-size", "7"])
    out = capsys.readouterr().out
    assert code == 0, out
    for text in ("pulling annotations from", "24 annotations in 18 encounters",
                 "images: 0 added, 24 already present", "proposals:", "pushed"):
        assert text in out
    code = cli_main(["sync", "--wildbook", f"http://127.0.0.1:{free_port()}", "--reidal",
                     server.address, "--collection", COLLECTION, "--timeout", "2"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "cannot reach" in err
