"""Wildbook adapter for reidal: Wildbook annotations in, proposed identities out.

>>> from reidal_client import ReidalClient
>>> from reidal_wildbook import WildbookClient, WildbookSync
>>> with ReidalClient("127.0.0.1:50051") as reidal:
...     sync = WildbookSync(WildbookClient("https://wildbook.example.org", token=TOKEN),
...                         reidal, "zebras", species="Equus quagga")
...     report = sync.run()

Or from a shell: ``python -m reidal_wildbook sync --wildbook URL --reidal ADDR
--collection ID``. :class:`ReidalLCABackend` lets code written for Wild Me's LCA loop
(``step(new_edges) -> pairs to review``) use reidal as its backend. The REST subset,
the JSON shapes and the LCA mapping are documented in docs/wildbook.md.
"""

from reidal_wildbook.api import (
    WildbookAnnotation,
    WildbookClient,
    WildbookError,
    WildbookNotFound,
    annotations_from_encounter,
)
from reidal_wildbook.images import crop_to_box
from reidal_wildbook.lca import ReidalLCABackend, decision_label
from reidal_wildbook.sync import (
    AnswerPlan,
    Proposal,
    SyncReport,
    WildbookSync,
    build_proposals,
    plan_answers,
)

__all__ = [
    "AnswerPlan", "Proposal", "ReidalLCABackend", "SyncReport", "WildbookAnnotation",
    "WildbookClient", "WildbookError", "WildbookNotFound", "WildbookSync",
    "annotations_from_encounter", "build_proposals", "crop_to_box", "decision_label",
    "plan_answers",
]
