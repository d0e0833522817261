"""The `monitoring` resource: when drift or live performance is bad enough to retrain.

One place for the thresholds, read by the monitoring assets (which judge) and by the sensors
(which act, once per champion and not again within the cooldown)."""

from __future__ import annotations

import dagster as dg

from eventml.drift import DriftThresholds


class Monitoring(dg.ConfigurableResource):
    # Drift: the recent window of decisions against the champion's reference sample (the
    # out-of-time test decisions it was promoted on).
    window_days: int = 14
    watch: float = 0.10
    act: float = 0.25
    score_psi_act: float = 0.25  # any task's score PSI past this requests a retrain
    # Monitored features (bounded windows, see eventml.drift.monitored_features) past `act`
    # that request a retrain; a small world's sparse features are noisy, so tests raise it.
    features_to_act: int = 3
    # Live performance: retrain when a task's AUC on matured live decisions falls this far
    # below the AUC the champion was promoted on, judged only on enough matured labels.
    max_auc_drop: float = 0.05
    min_labels: int = 1000
    min_positives: int = 50
    # A retrain needs new data to learn anything: none is requested until the champion's
    # training data is at least this many days older than the data being monitored.
    cooldown_days: int = 30

    def thresholds(self) -> DriftThresholds:
        return DriftThresholds(
            watch=self.watch, act=self.act, score_psi_act=self.score_psi_act,
            features_to_act=self.features_to_act,
        )  # fmt: skip
