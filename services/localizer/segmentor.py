"""DiffSeg on the captured attention, and the cross-attention vote that ties segments to words (docs/method.md#segmentor).

All maps are square. R is the largest attention resolution (64 for SD at 512 px, 16 for the tiny bundle); the
label map is produced at the bundle's image size S.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as connected_components

from services.localizer.attention import AttentionMaps
from services.localizer.kl import kl_below, merge_step


@dataclass(frozen=True)
class DiffSegConfig:
    anchors_per_side: int = 16  # 16 × 16 anchor grid, capped by the resolution
    merge_threshold: float = 1.1
    merge_rounds: int = 3
    refine_kmeans: bool = True
    kmeans_max_iter: int = 300
    kl_backend: str = "torch"  # resolved: torch or triton


def aggregate_self_attention(maps: dict[int, torch.Tensor]) -> torch.Tensor:
    """[R², R²]: row i is the attention distribution of query pixel i over the R × R map.

    Per resolution s: each query's s × s map is upsampled bilinearly to R × R and renormalised, the query grid is
    repeated to R × R (nearest), and resolutions are summed with weights ∝ s (64/32/16/8 → 0.533/0.267/...).
    """
    r = max(maps)
    total = sum(maps)
    out = None
    for s, a in sorted(maps.items(), reverse=True):
        up = F.interpolate(a.reshape(s * s, 1, s, s), size=(r, r), mode="bilinear", align_corners=False)
        up = up.reshape(s, s, r * r)
        up = up / up.sum(-1, keepdim=True)
        rep = r // s
        up = up.repeat_interleave(rep, dim=0).repeat_interleave(rep, dim=1).reshape(r * r, r * r)
        term = (s / total) * up
        out = term if out is None else out + term
    return out


def anchor_indices(r: int, per_side: int) -> torch.Tensor:
    """Flat indices of an evenly spaced, centred per_side × per_side grid on an r × r map ({1, 5, …, 61} at 64)."""
    n = min(per_side, r)
    step = (r - 1) // (n - 1) if n > 1 else 0
    offset = ((r - 1) - step * (n - 1)) // 2
    coords = torch.arange(n) * step + offset
    return (coords[:, None] * r + coords[None, :]).flatten()


def greedy_merge(proposals: torch.Tensor, threshold: float, backend: str) -> torch.Tensor:
    """One later merge round: in list order, an unmatched proposal gathers every proposal within the threshold
    (itself included, matched or not), all of them become matched, and their mean is one new proposal."""
    close = kl_below(proposals, proposals, threshold, backend).cpu()
    matched = torch.zeros(proposals.shape[0], dtype=torch.bool)
    groups = []
    for i in range(proposals.shape[0]):
        if matched[i]:
            continue
        members = close[i].clone()
        members[i] = True
        matched |= members
        groups.append(members)
    weights = torch.stack(groups).to(proposals.device, torch.float32)
    return (weights @ proposals) / weights.sum(1, keepdim=True)


def kmeans(points: torch.Tensor, centroids: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Lloyd's K-means from the given centroids (Euclidean, like sklearn's KMeans(init=centroids, n_init=1));
    an emptied cluster keeps its centroid. Returns the final centroids."""
    centroids = centroids.clone()
    assign = None
    for _ in range(max_iter):
        d = torch.cdist(points, centroids)
        new = d.argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        onehot = F.one_hot(assign, centroids.shape[0]).to(points.dtype)
        counts = onehot.sum(0)
        sums = onehot.T @ points
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def diffseg(attention: torch.Tensor, config: DiffSegConfig) -> torch.Tensor:
    """Merged (and optionally refined) proposals [K, R²] from the aggregated self-attention [R², R²]."""
    r = int(round(attention.shape[0] ** 0.5))
    anchors = attention[anchor_indices(r, config.anchors_per_side).to(attention.device)]
    proposals = merge_step(anchors, attention, config.merge_threshold, config.kl_backend)
    for _ in range(config.merge_rounds - 1):
        proposals = greedy_merge(proposals, config.merge_threshold, config.kl_backend)
    if config.refine_kmeans:
        proposals = kmeans(attention, proposals, config.kmeans_max_iter)
    return proposals


def label_map(proposals: torch.Tensor, size: int) -> torch.Tensor:
    """Per-pixel argmax of the proposals upsampled bilinearly to size × size: long [size, size]."""
    r = int(round(proposals.shape[1] ** 0.5))
    up = F.interpolate(proposals.reshape(1, -1, r, r), size=(size, size), mode="bilinear", align_corners=False)
    return up[0].argmax(0)


def word_token_positions(tokenizer, words: list[str]) -> list[list[int]]:
    """Token positions of each word of the prompt " ".join(words), after BOS: every BPE token of a word."""
    positions, start = [], 1
    for word in words:
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        positions.append(list(range(start, start + n)))
        start += n
    return positions


def word_maps(cross: dict[int, torch.Tensor], positions: list[list[int]], size: int) -> torch.Tensor:
    """[W, size, size]: for each word, the cross-attention averaged over ALL its token positions (docs/method.md#multi-token-nouns),
    upsampled, normalised over the token axis, summed over resolutions, then L2-normalised over pixels."""
    out = None
    for s, a in cross.items():
        a = a.T.reshape(-1, 1, s, s)  # [tokens, 1, s, s]
        up = F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        up = up / up.sum(0, keepdim=True).clamp_min(1e-12)
        per_word = torch.stack([up[p].mean(0) for p in positions])
        out = per_word if out is None else out + per_word
    flat = out.reshape(len(positions), -1)
    return F.normalize(flat, dim=1).reshape(out.shape)


def vote(labels: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """For each segment id in `labels`, the word whose map has the highest mean over the segment: long [K]."""
    k = int(labels.max()) + 1
    flat = labels.flatten()
    onehot = F.one_hot(flat, k).to(maps.dtype)  # [P, K]
    sums = maps.reshape(maps.shape[0], -1) @ onehot  # [W, K]
    counts = onehot.sum(0).clamp_min(1.0)
    return (sums / counts).argmax(0)


def instances(mask: np.ndarray, min_area_fraction: float) -> list[np.ndarray]:
    """8-connected components of `mask` larger than `min_area_fraction` of the map, largest first."""
    comp = connected_components(mask, connectivity=2)
    floor = min_area_fraction * mask.size
    out = [comp == i for i in range(1, int(comp.max()) + 1)]
    out = [m for m in out if m.sum() > floor]
    return sorted(out, key=lambda m: -int(m.sum()))


@dataclass
class Segmentation:
    labels: np.ndarray  # int [S, S] segment id per pixel
    segment_words: np.ndarray  # int [K]: index into the prompt words voted for each segment
    noun: np.ndarray  # bool [S, S]: union of the segments voted for the noun
    background: np.ndarray  # bool [S, S]: union of the segments voted for "background"


def segment(maps: AttentionMaps, positions: list[list[int]], size: int, config: DiffSegConfig) -> Segmentation:
    """DiffSeg + the vote. The prompt words are [noun, "things", "background"]."""
    attention = aggregate_self_attention(maps.self_attention)
    proposals = diffseg(attention, config)
    labels = label_map(proposals, size)
    words = vote(labels, word_maps(maps.cross_attention, positions, size))
    per_pixel = words[labels].cpu().numpy()
    return Segmentation(
        labels=labels.cpu().numpy(),
        segment_words=words.cpu().numpy(),
        noun=per_pixel == 0,
        background=per_pixel == 2,
    )
