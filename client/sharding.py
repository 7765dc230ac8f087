"""Split a batch manifest into shards, one per pod of a Kubernetes Indexed Job.

Pod `i` of a Job with `completions: N` runs `ice batch MANIFEST --shard-index i --shard-count N` and takes
`shard(items, i, N)`. Sharding is strided (`items[i::N]`): every item lands in exactly one shard, shard sizes
differ by at most one, and a shard's items are spread over the whole manifest (so a run of slow images at one
end does not all fall on one pod). The split depends only on the manifest's order and `N`: keep both fixed
while resuming a run, or shards would take different items (finished items are skipped either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def _check(index: int, count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"shard count must be an int, got {type(count).__name__}")
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"shard index must be an int, got {type(index).__name__}")
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}) for a shard count of {count}, got {index}")


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """The items of shard `index` of `count`: `items[index::count]`, in manifest order."""
    _check(index, count)
    return list(items[index::count])


def shard_indices(n: int, index: int, count: int) -> range:
    """Positions (into a manifest of `n` items) that shard `index` of `count` takes."""
    _check(index, count)
    if n < 0:
        raise ValueError(f"item count must be non-negative, got {n}")
    return range(index, n, count)


def shard_size(n: int, index: int, count: int) -> int:
    """How many of `n` items shard `index` of `count` takes: ceil((n - index) / count), at least 0."""
    return len(shard_indices(n, index, count))
