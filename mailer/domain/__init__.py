"""Pure rules: no await, no database, no network, no clock reads, no environment."""
