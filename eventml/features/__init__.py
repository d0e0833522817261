"""Point-in-time features per decision: aggregates of the entity's events strictly before it.

- `declare`: the declaration language (`Feature`, `EventFilter`, `FeatureSet`).
- `families`: a dataset pack's feature families, expanded into a `FeatureSet`.
- `batch`: `compute_features`, every decision of a day (or of all days) at once.
- `one`: `features_for_one`, one live request, the definitions applied literally.
- `keyed`: features per terminal, merchant or device rather than per entity, from each key's
  activity per day (`key_activity`), joined the same way by both paths (`keyed_features`).
The two paths agree to the last bit; tests and an asset check hold them together.
"""

from eventml.features.batch import compute_features
from eventml.features.declare import (
    FLOAT_KINDS,
    STAT_KINDS,
    WINDOWED_KINDS,
    EventFilter,
    Feature,
    FeatureSet,
    category_vocab,
    encode_expr,
    encode_value,
    window_us,
)
from eventml.features.families import FeatureFamilies, build_feature_set
from eventml.features.keyed import (
    ACTIVITY_SCHEMA,
    KEYED_KINDS,
    key_activity,
    keyed_features,
    lookback_days,
)
from eventml.features.one import features_for_one

__all__ = [
    "ACTIVITY_SCHEMA",
    "KEYED_KINDS",
    "FLOAT_KINDS",
    "STAT_KINDS",
    "WINDOWED_KINDS",
    "EventFilter",
    "Feature",
    "FeatureFamilies",
    "FeatureSet",
    "build_feature_set",
    "category_vocab",
    "compute_features",
    "encode_expr",
    "encode_value",
    "features_for_one",
    "key_activity",
    "keyed_features",
    "lookback_days",
    "window_us",
]
