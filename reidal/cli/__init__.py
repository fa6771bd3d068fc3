"""The `reidal` command line: run a server, drive a collection through it, run the demo.

    reidal serve [--service all|embedding|collections|sampling|constraints ...]
    reidal collection create|list|show|delete
    reidal image delete COLLECTION IMAGE...
    reidal ingest COLLECTION (FOLDER | --csv metadata.csv)
    reidal pairs COLLECTION [--budget N|0.0002] [--out pairs.csv]
    reidal answer COLLECTION (--csv answers.csv | --interactive)
    reidal identities COLLECTION [--csv identities.csv]
    reidal demo
    reidal bench [--dataset CSV_OR_NAME ...] [--methods ...] [--budget 0.5%x5] [--quick]
    reidal health [--address HOST:PORT] [--service NAME]
    reidal triton [--model-repository DIR]
    reidal vectors get|put COLLECTION ...
    reidal train start|watch|list|cancel|promote ...
    reidal token create --name NAME --collections a,b [--role reader|annotator|admin]

What every client command shares (``--server``, deadlines and retries, TLS, access
tokens, one-line errors and exit statuses) is in :mod:`reidal.cli.common`.

One module per command group (server, collections, vectors, answers, demo, bench,
training, tokens), each importing only :mod:`reidal.cli.common`; :mod:`reidal.cli.app`
assembles the parser. This package re-exports what other code imports from ``reidal.cli``
(``main``, ``build_parser``, ``run_command``, the CSV helpers and constants).
"""

from reidal.cli.answers import PAIR_CSV_FIELDS, read_answers_csv
from reidal.cli.app import build_parser, main
from reidal.cli.collections import IMAGE_SUFFIXES, csv_images, folder_images
from reidal.cli.common import (
    CLUSTERING_MODES,
    DEBUG_ENV,
    DEFAULT_SERVER,
    SAMPLERS,
    SERVER_ENV,
    TOKEN_ENV,
    CliError,
    run_command,
)
from reidal.cli.server import DEFAULT_HTTP_PORT, DEFAULT_PORT

__all__ = ["CLUSTERING_MODES", "DEBUG_ENV", "DEFAULT_HTTP_PORT", "DEFAULT_PORT",
           "DEFAULT_SERVER", "IMAGE_SUFFIXES",
           "PAIR_CSV_FIELDS", "SAMPLERS", "SERVER_ENV", "TOKEN_ENV", "CliError", "build_parser",
           "csv_images", "folder_images", "main", "read_answers_csv", "run_command"]
