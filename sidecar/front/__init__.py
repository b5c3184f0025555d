"""The sidecar's front door: what every request passes before the money path.

Request ids and the access record (:mod:`.context`), request targets (:mod:`.targets`), body
decoding and JSON limits (:mod:`.body`), CORS (:mod:`.cors`), malformed HTTP
(:mod:`.protocol`), and the access log (:mod:`.access_log`).
"""
