"""The feature store (Feast): point-in-time training tables and the online store.

``features.store: feast`` in mloop.yaml makes the ingest step join a Feast repo's feature views
onto the entity table (``data``); ``mloop features materialize`` fills the online store and
``mloop features check`` proves the two paths give the same values; a server reads the
online store once per micro-batch (``OnlineFeatures``). Feast is the optional
extra ``mloop[feast]``: nothing here imports it until a repo is opened.
"""

from mloop.features.lookup import OnlineFeatures
from mloop.features.online import SkewReport, check_skew, materialize, materialized_until
from mloop.features.repo import FeatureRepo, definitions_hash, open_repo
from mloop.features.training import FeatureLineage, online_values, training_table

__all__ = ["FeatureLineage", "FeatureRepo", "OnlineFeatures", "SkewReport", "check_skew",
           "definitions_hash", "materialize", "materialized_until", "online_values",
           "open_repo", "training_table"]
