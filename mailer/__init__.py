"""mailer: a self-hosted mailing list manager whose promise is guaranteed opt-out."""

__version__ = "0.1.0"
