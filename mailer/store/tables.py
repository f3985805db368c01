"""The Core ``Table`` objects behind the SQLModel classes, for typed, fast queries.

Timestamps are aware UTC datetimes in and out (SQLModel's ``UTCDateTime`` column type).
"""

from sqlmodel import SQLModel

from mailer import models as _models  # registers every table on the metadata

metadata = SQLModel.metadata
assert _models.MailingList.__tablename__ in metadata.tables

lists = metadata.tables["mailing_list"]
subscribers = metadata.tables["subscriber"]
subscriptions = metadata.tables["subscription"]
suppressions = metadata.tables["suppression"]
consent_events = metadata.tables["consent_event"]
api_keys = metadata.tables["api_key"]
outbox = metadata.tables["outbox"]
instance_settings = metadata.tables["instance_setting"]
campaigns = metadata.tables["campaign"]
policy_versions = metadata.tables["policy_version"]
rate_buckets = metadata.tables["rate_bucket"]
bounce_scores = metadata.tables["bounce_score"]
