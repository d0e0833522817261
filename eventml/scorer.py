"""The scorer: one XGBoost model per task on named features, with reason codes a lender can give.

A `Scorer` holds a booster per task over one ordered feature list. Reason codes come from
XGBoost's own SHAP contributions (`pred_contribs`): per decision, the features pushing the risk
up the most, grouped by the human-readable reason declared for each feature (so every input read
from the sequence encoders becomes one "recent activity pattern" reason). Saved as UBJ + JSON, never
pickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import xgboost as xgb

from eventml.threads import step_threads


@dataclass(frozen=True)
class ScorerConfig:
    n_estimators: int = 800
    learning_rate: float = 0.05
    max_depth: int = 5
    min_child_weight: float = 5.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    early_stopping_rounds: int = 50
    # feature name -> +1 (risk never falls as it rises) or -1; features absent here are free.
    monotone: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    n_threads: int | None = None  # None: the step's thread budget (`eventml.threads`)
    # Map each booster's margin to a probability with a logistic fit on the validation split
    # (Platt scaling): the validation rows are the latest labelled ones, so base-rate drift since
    # the training rows is corrected without changing the ranking.
    calibrate: bool = True

    def params(self, feature_names: list[str]) -> dict:
        unknown = set(self.monotone) - set(feature_names)
        if unknown:
            raise ValueError(f"monotone constraints name unknown features {sorted(unknown)}")
        return {
            "objective": "binary:logistic",
            # Early stopping reads the last metric. Log loss, not AUC: where a label's valid rows
            # are nearly separable (the lending world's fraud label: valid AUC 0.99 after two
            # trees), AUC stopped most boosters at 2-3 trees, and which of them did swung the
            # test PR AUC by 0.1 (docs/embedding-lift.md).
            "eval_metric": ["auc", "logloss"],
            "tree_method": "hist",
            "learning_rate": self.learning_rate,
            "max_depth": self.max_depth,
            "min_child_weight": self.min_child_weight,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "reg_lambda": self.reg_lambda,
            "seed": self.seed,
            "nthread": self.n_threads or step_threads(),
            "monotone_constraints": "("
            + ",".join(str(self.monotone.get(f, 0)) for f in feature_names)
            + ")",
        }


def to_matrix(frame: pl.DataFrame, feature_names: list[str]) -> np.ndarray:
    """Features as float32 in the scorer's order; nulls become NaN, which XGBoost treats as missing."""
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise ValueError(
            f"scoring frame lacks features {missing[:5]}{'…' if len(missing) > 5 else ''}"
        )
    return frame.select(pl.col(c).cast(pl.Float32) for c in feature_names).to_numpy()


def platt(margin: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of p = sigmoid(slope * margin + intercept), fitted by logistic
    regression; the slope is kept positive so the map never reverses the ranking."""
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1e6, max_iter=1000).fit(margin.reshape(-1, 1), y)
    return max(float(fit.coef_[0, 0]), 1e-6), float(fit.intercept_[0])


class TaskRows(NamedTuple):
    """One task's labelled rows, as `to_matrix` builds them."""

    train_x: np.ndarray
    train_y: np.ndarray
    valid_x: np.ndarray
    valid_y: np.ndarray


# (params, rows by task, feature names, config) -> task -> booster early-stopped on its valid rows
BoosterTrainer = Callable[[dict, dict[str, TaskRows], list[str], "ScorerConfig"], dict]


def train_boosters(
    params: dict, rows: dict[str, TaskRows], feature_names: list[str], config: ScorerConfig
) -> dict[str, xgb.Booster]:
    """A booster per task trained in this process, early-stopped on the task's valid rows (with
    every round kept: `best_iteration` says where the best one is)."""
    boosters = {}
    for task, (train_x, train_y, valid_x, valid_y) in rows.items():
        dtrain = xgb.DMatrix(train_x, label=train_y, feature_names=feature_names)
        dvalid = xgb.DMatrix(valid_x, label=valid_y, feature_names=feature_names)
        boosters[task] = xgb.train(
            params,
            dtrain,
            num_boost_round=config.n_estimators,
            evals=[(dvalid, "valid")],
            early_stopping_rounds=config.early_stopping_rounds,
            verbose_eval=False,
        )
    return boosters


@dataclass
class Scorer:
    feature_names: list[str]
    boosters: dict[str, xgb.Booster]
    config: ScorerConfig = field(default_factory=ScorerConfig)
    # task -> (slope, intercept) applied to the margin; absent: the booster's own sigmoid.
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        train: pl.DataFrame,
        valid: pl.DataFrame,
        feature_names: list[str],
        tasks: list[str],
        config: ScorerConfig = ScorerConfig(),
        log=print,
        booster_trainer: BoosterTrainer | None = None,
    ) -> Scorer:
        """One booster per task, early-stopped on `valid`. Rows whose label is null (unmatured or
        not applicable to this task) are left out of that task only. `booster_trainer` trains
        the boosters: in this process (`train_boosters`), or on a cluster's workers
        (`eventml.cluster`)."""
        rows = {}
        for task in tasks:
            tr, va = (frame.filter(pl.col(task).is_not_null()) for frame in (train, valid))
            rows[task] = TaskRows(
                to_matrix(tr, feature_names), tr[task].to_numpy(),
                to_matrix(va, feature_names), va[task].to_numpy(),
            )  # fmt: skip
        trained = (booster_trainer or train_boosters)(
            config.params(feature_names), rows, feature_names, config
        )
        boosters, calibration = {}, {}
        for task, booster in trained.items():
            # Keep only the trees up to the best round, so predict() needs no iteration_range.
            boosters[task] = booster[: booster.best_iteration + 1]
            valid_x, valid_y = rows[task].valid_x, rows[task].valid_y
            if config.calibrate and 0 < valid_y.sum() < len(valid_y):
                dvalid = xgb.DMatrix(valid_x, feature_names=feature_names)
                margin = boosters[task].predict(dvalid, output_margin=True)
                calibration[task] = platt(margin, valid_y)
            log(
                f"{task}: {booster.best_iteration + 1} trees, valid log loss {booster.best_score:.4f} "
                f"on {len(valid_y):,} rows"
            )
        return cls(
            feature_names=list(feature_names),
            boosters=boosters,
            config=config,
            calibration=calibration,
        )

    def __post_init__(self) -> None:
        # `score_rows` skips xgboost's feature-name check on each call; checking once here keeps
        # its guarantee that every booster reads the columns in `feature_names` order.
        for task, booster in self.boosters.items():
            names = booster.feature_names
            if names is not None and list(names) != list(self.feature_names):
                raise ValueError(
                    f"booster {task!r} was trained on features {names[:5]}…, not on this "
                    f"scorer's feature_names {self.feature_names[:5]}… in that order"
                )

    @property
    def tasks(self) -> list[str]:
        return list(self.boosters)

    def _dmatrix(self, frame: pl.DataFrame) -> xgb.DMatrix:
        return xgb.DMatrix(to_matrix(frame, self.feature_names), feature_names=self.feature_names)

    def predict(self, frame: pl.DataFrame) -> dict[str, np.ndarray]:
        data = self._dmatrix(frame)
        return self._probabilities(
            lambda booster, margin: booster.predict(data, output_margin=margin)
        )

    def probability_table(self, frame: pl.DataFrame) -> pl.DataFrame:
        """decision_id and `p_<task>` (float64) per row of `frame` (its scorer inputs), in order:
        the offline scores, in process or on a cluster's workers."""
        probabilities = self.predict(frame)
        return frame.select("decision_id").with_columns(
            pl.Series(f"p_{task}", p.astype(np.float64)) for task, p in probabilities.items()
        )

    def score_rows(self, matrix: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Probabilities and SHAP contributions per task (as `predict` and `contributions` give
        them, to the bit) for rows already in the scorer's form: float32 in `feature_names`
        order, NaN for missing, what `to_matrix` builds. The request path builds its one row
        without a DataFrame; here one DMatrix without names serves all predictions, and
        xgboost's feature-name check, which converts every name from C on each call and costs
        more than a one-row prediction, is the one `__post_init__` did."""
        data = xgb.DMatrix(matrix)

        def raw(booster: xgb.Booster, margin: bool) -> np.ndarray:
            return booster.predict(data, output_margin=margin, validate_features=False)

        contributions = {
            task: booster.predict(data, pred_contribs=True, validate_features=False)
            for task, booster in self.boosters.items()
        }
        return self._probabilities(raw), contributions

    def _probabilities(
        self, raw: Callable[[xgb.Booster, bool], np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Probabilities per task from `raw(booster, margin)` (the booster's margin, or its own
        probability), through the calibration map where the task has one."""
        out = {}
        for task, booster in self.boosters.items():
            if task in self.calibration:
                slope, intercept = self.calibration[task]
                margin = raw(booster, True).astype(np.float64)
                out[task] = (1.0 / (1.0 + np.exp(-(slope * margin + intercept)))).astype(np.float32)
            else:
                out[task] = raw(booster, False)
        return out

    def margins(self, frame: pl.DataFrame, task: str) -> np.ndarray:
        return self.boosters[task].predict(self._dmatrix(frame), output_margin=True)

    def contributions(self, frame: pl.DataFrame, task: str) -> np.ndarray:
        """SHAP values in margin space, (n, features + 1); the last column is the base value."""
        return self.boosters[task].predict(self._dmatrix(frame), pred_contribs=True)

    def reasons(
        self, frame: pl.DataFrame, task: str, reason_of: dict[str, str], top: int = 4
    ) -> list[list[dict]]:
        """Per row, up to `top` reasons pushing `task` risk up, largest first, each with its summed
        contribution. Every feature must have a declared reason."""
        return self.top_reasons(self.contributions(frame, task), reason_of, top)

    def top_reasons(
        self, contributions: np.ndarray, reason_of: dict[str, str], top: int = 4
    ) -> list[list[dict]]:
        """`reasons` from SHAP values already computed ((n, features + 1), as `contributions`)."""
        undeclared = [f for f in self.feature_names if f not in reason_of]
        if undeclared:
            raise ValueError(f"no reason declared for features {undeclared[:5]}")
        reasons = sorted(set(reason_of[f] for f in self.feature_names))
        column_of = {r: i for i, r in enumerate(reasons)}
        # (features, reasons) 0/1 matrix: summing contributions per reason is one matmul.
        group = np.zeros((len(self.feature_names), len(reasons)), dtype=np.float32)
        for i, f in enumerate(self.feature_names):
            group[i, column_of[reason_of[f]]] = 1.0
        per_reason = contributions[:, :-1] @ group
        order = np.argsort(-per_reason, axis=1)[:, :top]
        # Names, values and signs of the top reasons as whole arrays, turned into Python objects
        # once: a batch then costs no numpy scalar per row and reason.
        values = np.take_along_axis(per_reason, order, axis=1)
        names = np.array(reasons, dtype=object)[order]
        return [
            [{"reason": n, "contribution": v} for n, v, up in zip(*row) if up]
            for row in zip(names.tolist(), values.tolist(), (values > 0).tolist())
        ]

    # ------------------------------------------------------------ persistence (no pickle)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for task, booster in self.boosters.items():
            booster.save_model(directory / f"{task}.ubj")
        meta = {
            "feature_names": self.feature_names,
            "tasks": self.tasks,
            "config": asdict(self.config),
            "calibration": {task: list(ab) for task, ab in self.calibration.items()},
        }
        (directory / "scorer.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Scorer:
        directory = Path(directory)
        meta = json.loads((directory / "scorer.json").read_text())
        boosters = {}
        for task in meta["tasks"]:
            booster = xgb.Booster()
            booster.load_model(directory / f"{task}.ubj")
            boosters[task] = booster
        return cls(
            feature_names=meta["feature_names"],
            boosters=boosters,
            config=ScorerConfig(**meta["config"]),
            calibration={task: tuple(ab) for task, ab in meta.get("calibration", {}).items()},
        )
