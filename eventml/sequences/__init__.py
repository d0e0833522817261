"""History → tensors: each decision's most recent prior events as fixed-size arrays for the encoder.

- `coding`: how each column becomes ids or numbers (`SequenceSpec`, fitted at training and
  saved with the model) and the per-event inputs both builders share.
- `batch`: `build_sequences`, every decision of a table at once, vectorized.
- `one`: `build_one`, the request path, the same steps for one history in plain numpy.
The two agree exactly; tests hold them together.

Choices a reader should know:
- Only events strictly before the decision instant enter; an event at the same microsecond is
  treated as after it (the decision event itself, or anything logged with it).
- The last K events are kept, oldest first, right-aligned: padding is on the left and position
  K-1 always holds the most recent event.
- Ties in time are ordered by event_id, so a shuffled event table builds the same arrays.
- Time since the previous event is measured inside the window (the oldest kept event gets 0), so
  serving needs only the entity's last K events to reproduce training inputs.
- Categorical ids: 0 = null (and padding). A column with declared `categories` in the dataset
  spec, or with at most `max_vocab` distinct training values, gets a vocabulary (ids 1..V, and
  V+1 for any other value).
- A column the pack lists under `identifiers`, or a larger one, is an identifier (a device id,
  an IP address, a terminal), and by default its id says only
  in which order the value first appeared among the kept events: the history's first device is
  1, the next new one 2, a return to the first device 1 again ("first seen" coding, capped). A
  global id per value would let the encoder recognise people by their devices and memorise
  their outcomes instead of learning what histories look like (docs/embedding-lift.md measures
  both). The order keeps what generalises: a new device among familiar ones. `high_cardinality="hash"` instead hashes each
  value into `hash_buckets`, for identifiers whose identity is the signal (a merchant, say).
  Values are compared, and hashed, by BLAKE2b of their UTF-8 bytes, not polars' `hash` or
  Python's `hash()`: those change across library versions and processes, and a model must see
  the same id for the same value in training, in the Bento, and next year.
- Numeric fields (amount first, then the spec's numeric columns): sign(x)·log1p(|x|) clipped to
  ±NUMERIC_CLIP, null → 0 with a separate is-null flag, so 0 and "unknown" stay distinct.

The arrays keep ids as int32 to halve memory at training scale; `eventml.encoder.iter_batches`
widens them to the int64 batch format.
"""

from eventml.sequences.batch import build_sequences
from eventml.sequences.coding import (
    NUMERIC_CLIP,
    TIME_FEATURES,
    CategoricalCoding,
    SequenceSpec,
    first_seen_ids,
    sequence_columns,
    stable_hash,
    utc_us,
)
from eventml.sequences.one import build_one

__all__ = [
    "NUMERIC_CLIP",
    "TIME_FEATURES",
    "CategoricalCoding",
    "SequenceSpec",
    "build_one",
    "build_sequences",
    "first_seen_ids",
    "sequence_columns",
    "stable_hash",
    "utc_us",
]
