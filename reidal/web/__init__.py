"""The pair-review web page: a person answers "same animal?" in a browser.

``reidal serve`` starts it next to the gRPC port (``--http-port``, default 8080;
``--no-http`` turns it off). It is one static page (plain HTML, JavaScript and CSS in
``static/``, no build step) and a small JSON API that calls the same gRPC services through
:mod:`reidal_client`. See docs/review-ui.md.
"""

from reidal.web.server import ReviewHTTP, start_review_http

__all__ = ["ReviewHTTP", "start_review_http"]
