"""The heavy steps on a Ray cluster: the encoder trained data-parallel on Ray Train (`train`),
the scorers on XGBoost's collective through Ray Train (`train`), and batch inference with Ray
Data (`inference`). Each takes the same inputs and gives the same artifacts as its in-process
counterpart (`eventml.encoder.train`, `eventml.scorer.train_boosters`, `eventml.embedding`).

Workers receive data and weights as arrays and saved files through Ray's object store, never a
pickled model. `ray` is imported only here (and by `resources.compute`), so the rest of eventml,
and the Bento, run without it.
"""

from eventml.cluster.inference import embedding_table_by_parts, probability_table_by_parts
from eventml.cluster.train import RayTrain

__all__ = ["RayTrain", "embedding_table_by_parts", "probability_table_by_parts"]
