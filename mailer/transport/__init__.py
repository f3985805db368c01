"""Mail transport adapters: SMTP out (outcomes as values) and the embedded capture server."""
