"""The HTTP surface: the JSON API, the subscriber pages and the operations routes."""
