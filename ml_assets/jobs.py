"""Jobs: each names what it refreshes."""

import dagster as dg

from ml_assets.partitions import daily

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.groups("ingest"),
    partitions_def=daily,
    description="Validate a range of days from the event source into raw_events and event_rejects.",
)
