"""Every size limit of reidal's API, in one place (the protos publish the same numbers).

Plain constants, imported by the workflows that check them for Python callers (ingest,
answers, collection ids) and by the gRPC edge (:mod:`reidal.request_checks`), which checks
every request field against them before a servicer runs. Lengths count characters.
"""

from __future__ import annotations

#: Longest caller id: collection, image, pair, batch, answer, operation, job, request id.
MAX_ID_LENGTH = 256
#: Longest name of a person or tool recorded with answers and audited actions
#: (annotator_id, actor), of a species and of an image's identity name.
MAX_WHO_LENGTH = 256
#: Longest identity name given to an image at ingest (IngestImage.name).
MAX_NAME_LENGTH = 256
#: Longest free-text note of an answer.
MAX_NOTE_LENGTH = 4096
#: Longest image URI (PATH_MAX on Linux).
MAX_URI_LENGTH = 4096
#: Most metadata entries of one image, and the longest key or value.
MAX_METADATA_ENTRIES = 64
MAX_METADATA_TEXT = 1024
#: Longest value of any other string field (a reason, a date bound, a parameter name).
MAX_TEXT_LENGTH = 1024
#: Most items of one page of a list call (page_size), and the size of a page_size of 0.
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
#: Largest model version and page token: both are int64 where they are used.
MAX_INT64 = 2**63 - 1
#: Most vectors of one PutVectors request and of one GetVectors message, and most image ids
#: one GetVectors request names (the AddImages message bound).
MAX_VECTORS_PER_CALL = 1024
#: Longest vector PutVectors accepts (MiewID: 2152, MegaDescriptor-L: 1536).
MAX_VECTOR_DIM = 4096
#: Most bytes of vector components in one GetVectors message: far below gRPC's default
#: 4 MiB receive limit, so a client with default options reads any dimension.
MAX_VECTOR_BYTES_PER_MESSAGE = 1 << 20
