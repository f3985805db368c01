"""Use cases and transaction boundaries. No HTTP or CLI knowledge lives here."""
