"""Deterministic synthetic long user histories with planted short- and long-range signal.

The built-in default dataset: thousands of events per user, next to signal that only a model with
long-range memory can use. Every event carries a ``signal`` code saying which planted pattern makes it
predictable, and long-range targets carry the distance back to their evidence, so a benchmark can
report accuracy per signal and per distance bucket.

The story of one user (all of it vectorised over users; no per-event Python loops):

- **Background sessions** (``SIGNAL_BACKGROUND`` / ``SIGNAL_SHORT_RANGE``). A session opens on a
  Zipf-popular item, which fixes the session's category. Each later in-pattern event is one of the
  ``successors_per_item`` items that follow the previous in-pattern item in the category's fixed
  random *ring* order (a per-item successor set), so the last few events predict the next item far
  above popularity. With probability ``noise_prob`` an event is a Zipf-popular noise item instead; the
  pattern resumes after it from the last in-pattern item.
- **Series resumption** (``SIGNAL_SERIES``). The catalogue holds ``num_series`` series of
  ``episodes_per_series`` ordered episodes plus one *hub* (cue) item each. A user watches a series in
  installments: ``[hub, ep_a .. ep_p]`` first, then after a gap ``[hub, ep_{p+1} ..]`` where ``ep_p``
  is the last episode watched. The event right after the resuming hub is the target: knowing where the
  user left off pins the exact episode; without memory only the series (from the cue) is known.
  The first episode ``ep_a`` is uniform over the series (the user joined mid-way), so resumption
  points spread over all episodes: the cue alone cannot narrow the target down to a top-10 list (with
  every user starting at episode 1 and short installments, the first ten episodes would cover almost
  every resumption). Consecutive episodes inside one installment teach the episode-successor map as
  short-range signal.
- **Interest recurrence** (``SIGNAL_RECURRENCE``). Each user has ``niche_interests_per_user`` niche
  categories with ``favourites_per_interest`` personal favourite items each. An intro session
  ``[niche hub, all favourites]`` comes first; later sessions ``[niche hub, one favourite]`` recur.
  The favourite is predictable only from the user's own earlier consumption of it.

Gaps between a thread's sessions are drawn from a mixture: with ``short_gap_fraction`` uniform on
``[short_gap_min, short_gap_max]`` events, otherwise log-uniform on ``[long_gap_min, long_gap_max]``,
truncated to what the user's length leaves room for. So long-range targets exist at many distances,
including short ones (< 200 events) that a windowed model can see raw, for comparison.

Planted items (series episodes, hubs, niche items) never appear as background or noise, so each
target's evidence is unambiguous. ``evidence_distance`` is an *index distance*: for a target at
position ``i`` of its user's history (time order), the evidence is at position
``i - evidence_distance`` (so ``evidence_distance - 1`` events lie strictly between; always >= 1).
For a series target the evidence is the user's last watched episode of that series; for a recurrence
target it is the most recent earlier consumption of the same item. With KSA (chunk ``k``, window
``W`` chunks) the target is predicted by the query at ``i - 1``, which sees the evidence raw iff
``(i - 1) // k - (i - d) // k <= W``; beyond that only through summaries.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

__all__ = [
    "SIGNAL_BACKGROUND",
    "SIGNAL_SHORT_RANGE",
    "SIGNAL_SERIES",
    "SIGNAL_RECURRENCE",
    "LONG_RANGE_SIGNALS",
    "NO_EVIDENCE",
    "SCHEMA",
    "SyntheticConfig",
    "Catalogue",
    "build_catalogue",
    "generate",
    "write",
]

SIGNAL_BACKGROUND = 0
"""No planted evidence: noise items, session openers, hubs, first episodes, intro favourites."""
SIGNAL_SHORT_RANGE = 1
"""Predictable from the last few events: ring successor in a session, or the next episode in a binge."""
SIGNAL_SERIES = 2
"""Long-range: the episode after a resuming series hub (evidence = last watched episode)."""
SIGNAL_RECURRENCE = 3
"""Long-range: a favourite after a niche hub (evidence = its most recent earlier consumption)."""
LONG_RANGE_SIGNALS = (SIGNAL_SERIES, SIGNAL_RECURRENCE)
NO_EVIDENCE = -1
"""``evidence_distance`` of every event whose signal is not long-range."""

SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Utf8(),
    "item_id": pl.Utf8(),
    "timestamp": pl.Int64(),
    "category": pl.Utf8(),
    "evidence_distance": pl.Int64(),
    "signal": pl.Int64(),
}
"""Output columns and dtypes of :func:`generate`, in order."""

PARQUET_METADATA_KEY = b"ksa_rec.synthetic_config"
"""Parquet schema-metadata key under which :func:`write` stores the config (JSON) for provenance."""

# Independent random streams, so that e.g. the catalogue does not change when num_users does.
_STREAM_CATALOGUE, _STREAM_USERS, _STREAM_SERIES, _STREAM_INTERESTS, _STREAM_BACKGROUND = range(5)


@dataclass
class SyntheticConfig:
    """Settings of the synthetic generator; validated on construction (one-line ``ValueError``).

    Lengths and gaps are counted in events. Defaults give 2,000 users of mean ~500 events (the CPU
    demo); see ``datasets/synthetic.md`` for the larger long-range benchmark setting.
    """

    num_users: int = 2000
    """Users to generate."""
    num_items: int = 5000
    """Catalogue size: background items plus the planted series, hub and niche items."""
    num_categories: int = 50
    """Item categories (the ``category`` side feature), niche categories included."""
    min_length: int = 200
    """Shortest user history, in events."""
    max_length: int = 4000
    """Longest user history, in events (the Pareto tail is clipped here)."""
    length_tail: float = 1.5
    """Pareto shape of user lengths (scale ``min_length``, clipped to ``max_length``); smaller = heavier."""
    zipf_exponent: float = 1.1
    """Popularity of background items ~ rank ** -zipf_exponent."""

    # Short-range: background sessions.
    mean_session_length: float = 12.0
    """Mean background session length (geometric)."""
    successors_per_item: int = 3
    """Size of each item's fixed successor set inside its category's session pattern."""
    noise_prob: float = 0.2
    """Chance that a background event is a popular noise item instead of the session pattern."""

    # Long-range A: series resumption.
    num_series: int = 60
    """Series in the catalogue, each with its own hub (cue) item."""
    episodes_per_series: int = 40
    """Ordered episodes of each series."""
    max_binge: int = 3
    """Episodes watched per installment, uniform on 1..max_binge."""
    max_resumptions: int = 3
    """Resumptions per watched series, uniform on 1..max_resumptions (fewer if the user runs out of room)."""

    # Long-range B: interest recurrence.
    num_niche_categories: int = 10
    """Categories reserved for niche items (out of num_categories); the rest hold background and series."""
    niche_items_per_category: int = 60
    """Candidate favourite items in each niche category."""
    niche_interests_per_user: int = 3
    """Niche categories each user returns to."""
    favourites_per_interest: int = 4
    """A user's personal favourite items in each of their niche interests."""

    # Mix and distances.
    long_range_fraction: float = 0.05
    """Targeted share of events that are long-range targets (realised a little lower: room limits)."""
    recurrence_share: float = 0.3
    """Part of the long-range targets that are interest recurrences; the rest are series resumptions."""
    short_gap_fraction: float = 0.2
    """Share of a thread's gaps drawn from the short range (the rest from the long range)."""
    short_gap_min: int = 16
    """Shortest short-range gap between a thread's sessions, in events (uniform up to short_gap_max)."""
    short_gap_max: int = 192
    """Longest short-range gap, in events."""
    long_gap_min: int = 300
    """Shortest long-range gap, in events (log-uniform up to long_gap_max)."""
    long_gap_max: int = 3000
    """Longest long-range gap, in events (cut to what the user's length leaves room for)."""

    # Time.
    start_time: int = 1_577_836_800
    """Earliest user start, unix seconds (2020-01-01 UTC); each user starts up to start_spread_s later."""
    start_spread_s: int = 365 * 86_400
    """Users start uniformly within this many seconds after start_time."""
    session_timeout_s: int = 1_800
    """Gaps inside a session are < this; gaps between sessions are >= this."""
    within_session_gap_s: float = 60.0
    """Mean gap between events of one session (seconds)."""
    between_session_gap_s: float = 86_400.0
    """Mean extra gap between sessions, on top of session_timeout_s (seconds)."""

    seed: int = 0
    """Seed of every random draw (each part of the generator has its own stream of it)."""

    def __post_init__(self) -> None:
        self._check_types()
        self._check_ranges()
        self._check_catalogue_room()

    def _check_types(self) -> None:
        """Reject values of the wrong type (bools and floats where an int is meant)."""
        for f in fields(self):
            value = getattr(self, f.name)
            is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            if f.type in (int, "int") and not is_int:
                raise ValueError(f"SyntheticConfig.{f.name}: expected an int, got {value!r}")
            if f.type in (float, "float") and not (is_int or isinstance(value, (float, np.floating))):
                raise ValueError(f"SyntheticConfig.{f.name}: expected a number, got {value!r}")

    def _check_ranges(self) -> None:
        """Each field within its meaningful range, cross-field orderings included."""
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)!r}: must be {rule}")

        need(self.num_users >= 1, "num_users", ">= 1")
        need(self.min_length >= 32, "min_length", ">= 32")
        need(self.max_length >= self.min_length, "max_length", f">= min_length ({self.min_length})")
        need(self.length_tail > 0, "length_tail", "> 0")
        need(self.zipf_exponent >= 0, "zipf_exponent", ">= 0")
        need(self.mean_session_length >= 1, "mean_session_length", ">= 1")
        need(self.successors_per_item >= 1, "successors_per_item", ">= 1")
        need(0 <= self.noise_prob < 1, "noise_prob", "in [0, 1)")
        need(self.num_series >= 1, "num_series", ">= 1")
        need(self.max_binge >= 1, "max_binge", ">= 1")
        need(self.max_resumptions >= 1, "max_resumptions", ">= 1")
        need(self.episodes_per_series >= (self.max_resumptions + 1) * self.max_binge,
             "episodes_per_series", f">= (max_resumptions + 1) * max_binge = "
             f"{(self.max_resumptions + 1) * self.max_binge}, so no series runs out of episodes")
        need(1 <= self.num_niche_categories < self.num_categories, "num_niche_categories",
             f"in [1, num_categories) = [1, {self.num_categories})")
        need(self.niche_interests_per_user >= 1, "niche_interests_per_user", ">= 1")
        need(self.niche_interests_per_user <= self.num_niche_categories, "niche_interests_per_user",
             f"<= num_niche_categories ({self.num_niche_categories})")
        need(self.favourites_per_interest >= 1, "favourites_per_interest", ">= 1")
        need(self.niche_items_per_category >= self.favourites_per_interest, "niche_items_per_category",
             f">= favourites_per_interest ({self.favourites_per_interest})")
        intro = self.niche_interests_per_user * (1 + self.favourites_per_interest)
        need(intro <= self.min_length // 4, "niche_interests_per_user",
             f"such that the intro sessions (niche_interests_per_user * (1 + favourites_per_interest) "
             f"= {intro} events) fit in min_length // 4 = {self.min_length // 4}")
        need(0 <= self.long_range_fraction <= 0.1, "long_range_fraction", "in [0, 0.1]")
        need(0 <= self.recurrence_share <= 1, "recurrence_share", "in [0, 1]")
        need(0 <= self.short_gap_fraction <= 1, "short_gap_fraction", "in [0, 1]")
        need(self.short_gap_min >= 1, "short_gap_min", ">= 1")
        need(self.short_gap_max >= self.short_gap_min, "short_gap_max",
             f">= short_gap_min ({self.short_gap_min})")
        need(self.long_gap_min >= 1, "long_gap_min", ">= 1")
        need(self.long_gap_max >= self.long_gap_min, "long_gap_max", f">= long_gap_min ({self.long_gap_min})")
        need(self.start_time >= 0, "start_time", ">= 0")
        need(self.start_spread_s >= 0, "start_spread_s", ">= 0")
        need(self.session_timeout_s >= 2, "session_timeout_s", ">= 2")
        need(self.within_session_gap_s >= 0, "within_session_gap_s", ">= 0")
        need(self.between_session_gap_s >= 0, "between_session_gap_s", ">= 0")
        need(self.seed >= 0, "seed", ">= 0")

    def _check_catalogue_room(self) -> None:
        """num_items must hold the series, hubs, niche items and a usable background per category."""
        planted = (self.num_series * (self.episodes_per_series + 1)
                   + self.num_niche_categories * (self.niche_items_per_category + 1))
        main_categories = self.num_categories - self.num_niche_categories
        needed = planted + main_categories * (self.successors_per_item + 1)
        if self.num_items < needed:
            raise ValueError(
                f"SyntheticConfig.num_items={self.num_items}: must be >= {needed} ({planted} series/hub/"
                f"niche items + {self.successors_per_item + 1} background items in each of "
                f"{main_categories} main categories)")


@dataclass(frozen=True)
class Catalogue:
    """The fixed item catalogue of a config. Item ``x`` is external id ``item_names[x]``.

    Roles are assigned to random item numbers, so nothing can be read off the ids. Background items
    are kept in *ring* order: grouped by category (``ring_offset[c]``, ``ring_size[c]``), in a random
    order inside each category; the successors of ring entry ``r`` are the next
    ``successors_per_item`` entries of its category, cyclically.
    """

    category_of: np.ndarray
    """``[num_items]`` category index of every item (the item -> category map)."""
    series_episodes: np.ndarray
    """``[num_series, episodes_per_series]`` item of each episode, in watching order."""
    series_hub: np.ndarray
    """``[num_series]`` cue item of each series."""
    niche_category: np.ndarray
    """``[num_niche_categories]`` category index of each niche category."""
    niche_hub: np.ndarray
    """``[num_niche_categories]`` cue item of each niche category."""
    niche_items: np.ndarray
    """``[num_niche_categories, niche_items_per_category]`` candidate favourites."""
    ring_items: np.ndarray
    """``[R]`` background items in ring order."""
    ring_category: np.ndarray
    """``[R]`` category of each ring entry (non-decreasing)."""
    ring_cdf: np.ndarray
    """``[R]`` cumulative Zipf popularity of the ring entries, ending at 1."""
    ring_offset: np.ndarray
    """``[num_categories]`` first ring entry of each category (meaningless where ring_size is 0)."""
    ring_size: np.ndarray
    """``[num_categories]`` ring entries per category (0 for niche categories)."""
    item_names: np.ndarray
    """``[num_items]`` external item ids, e.g. ``"i000123"``."""
    category_names: np.ndarray
    """``[num_categories]`` external category names, e.g. ``"c07"``."""


def _rng(cfg: SyntheticConfig, stream: int) -> np.random.Generator:
    """Random generator of one named stream of this config's seed."""
    return np.random.default_rng([cfg.seed, stream])


def _names(prefix: str, count: int, min_width: int) -> np.ndarray:
    """``prefix`` + zero-padded numbers 0..count-1, widened only if ``count`` needs more digits."""
    width = max(min_width, len(str(count - 1)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(count)], dtype=object)


def build_catalogue(cfg: SyntheticConfig) -> Catalogue:
    """The item catalogue of ``cfg``; depends only on the catalogue fields and ``seed``."""
    rng = _rng(cfg, _STREAM_CATALOGUE)
    n_main = cfg.num_categories - cfg.num_niche_categories
    order = rng.permutation(cfg.num_items)
    cuts = np.cumsum([cfg.num_series * cfg.episodes_per_series, cfg.num_series, cfg.num_niche_categories,
                      cfg.num_niche_categories * cfg.niche_items_per_category])
    episodes, series_hub, niche_hub, niche_items, background = np.split(order, cuts)
    episodes = episodes.reshape(cfg.num_series, cfg.episodes_per_series)
    niche_items = niche_items.reshape(cfg.num_niche_categories, cfg.niche_items_per_category)
    niche_category = np.arange(n_main, cfg.num_categories)

    category_of = np.empty(cfg.num_items, dtype=np.int64)
    series_category = np.arange(cfg.num_series) % n_main
    category_of[episodes] = series_category[:, None]
    category_of[series_hub] = series_category
    category_of[niche_hub] = niche_category
    category_of[niche_items] = niche_category[:, None]
    # `background` is in popularity-rank order; categories are dealt round-robin (then shuffled) so
    # every main category gets the same number of items, each with its random share of popularity.
    background_category = rng.permutation(np.arange(background.size) % n_main)
    category_of[background] = background_category

    weight = (np.arange(background.size) + 1.0) ** -cfg.zipf_exponent
    ring = np.lexsort((rng.random(background.size), background_category))
    ring_category = background_category[ring]
    ring_cdf = np.cumsum(weight[ring])
    ring_cdf /= ring_cdf[-1]
    ring_size = np.bincount(ring_category, minlength=cfg.num_categories)
    ring_offset = np.concatenate([[0], np.cumsum(ring_size)[:-1]])
    return Catalogue(
        category_of=category_of, series_episodes=episodes, series_hub=series_hub,
        niche_category=niche_category, niche_hub=niche_hub, niche_items=niche_items,
        ring_items=background[ring], ring_category=ring_category, ring_cdf=ring_cdf,
        ring_offset=ring_offset, ring_size=ring_size,
        item_names=_names("i", cfg.num_items, 6), category_names=_names("c", cfg.num_categories, 2))


# ----------------------------------------------------------------------------------------------------
# Small vectorised helpers.


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    """``[0, x0, x0+x1, ...]`` without the grand total (segment start offsets)."""
    out = np.zeros(x.size, dtype=np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _segmented_cumsum(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Inclusive cumsum of ``x`` restarting wherever ``starts`` is True (``starts[0]`` must be True)."""
    total = np.cumsum(x)
    before = (total - x)[starts]
    return total - before[np.cumsum(starts) - 1]


def _rank_in_group(counts: np.ndarray) -> np.ndarray:
    """For groups of the given sizes laid out consecutively: each row's index inside its group."""
    return np.arange(counts.sum()) - np.repeat(_exclusive_cumsum(counts), counts)


def _stochastic_round(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Round to floor or ceil with the fractional part as the chance of ceil (unbiased counts)."""
    low = np.floor(x)
    return (low + (rng.random(x.shape) < x - low)).astype(np.int64)


def _choose_without_replacement(rng: np.random.Generator, rows: int, pool: int, take: int) -> np.ndarray:
    """``[rows, take]`` distinct indices in ``[0, pool)`` per row (first ``take`` of a random order)."""
    return np.argsort(rng.random((rows, pool)), axis=1)[:, :take]


# ----------------------------------------------------------------------------------------------------
# Users and planted long-range threads.


def _user_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """``[num_users]`` history lengths: Pareto(length_tail) scaled by min_length, clipped to max_length."""
    pareto = cfg.min_length * (1.0 - rng.random(cfg.num_users)) ** (-1.0 / cfg.length_tail)
    return np.minimum(np.floor(pareto), cfg.max_length).astype(np.int64)


def _truncated_gaps(cfg: SyntheticConfig, rng: np.random.Generator, cap: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Gap (events) from the short/long mixture conditioned on ``gap <= cap``; and where that is possible.

    Inverse-CDF sampling of the truncated mixture: ``u`` is uniform on ``[0, F(cap)]``, so short users
    get only gaps that fit instead of clipped ones piling up at the cap.
    """
    w = cfg.short_gap_fraction
    s_lo, s_hi = float(cfg.short_gap_min), cfg.short_gap_max + 1.0      # integers in [min, max]
    l_lo, l_hi = float(cfg.long_gap_min), cfg.long_gap_max + 1.0
    top = cap + 1.0
    short_mass = w * np.clip((top - s_lo) / (s_hi - s_lo), 0.0, 1.0)
    long_mass = (1 - w) * np.clip(np.log(np.maximum(top, l_lo) / l_lo) / np.log(l_hi / l_lo), 0.0, 1.0)
    u = rng.random(cap.shape) * (short_mass + long_mass)
    in_short = u < short_mass
    short_quantile = u / w if w > 0 else np.zeros_like(u)                 # only used where in_short
    long_quantile = (u - short_mass) / (1 - w) if w < 1 else np.zeros_like(u)
    short_gap = s_lo + short_quantile * (s_hi - s_lo)
    long_gap = l_lo * np.exp(long_quantile * np.log(l_hi / l_lo))
    gap = np.minimum(np.floor(np.where(in_short, short_gap, long_gap)), cap).astype(np.int64)
    return gap, (short_mass + long_mass) > 0


def _chain_offsets(cfg: SyntheticConfig, rng: np.random.Generator, links: np.ndarray, room: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of chained sessions ``[T, max(links)+1]`` (column 0 is 0) and how many links fit ``[T]``.

    Thread ``t`` wants ``links[t]`` follow-up sessions, each one mixture gap after the previous, all
    within ``room[t]`` events; a link that no longer fits ends the thread early.
    """
    width = int(links.max(initial=0)) + 1
    offsets = np.zeros((links.size, width), dtype=np.int64)
    realised = np.zeros(links.size, dtype=np.int64)
    alive = links > 0
    for j in range(1, width):
        gap, fits = _truncated_gaps(cfg, rng, room - offsets[:, j - 1] - 1)
        alive &= (links >= j) & fits
        offsets[:, j] = offsets[:, j - 1] + np.where(alive, gap, 0)
        realised[alive] = j
    return offsets, realised


def _start_points(rng: np.random.Generator, room: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Uniform start in ``[0, room - span]``, so that something of length ``span`` fits in ``room``."""
    return np.floor(rng.random(room.size) * (room - span + 1)).astype(np.int64)


@dataclass
class _Planted:
    """Planted events in creation order (blocks contiguous, threads' blocks in chain order).

    ``point`` is the insertion point in *planning units* ``[0, length]`` of the user; ``evidence`` is
    the index (in this array) of a target's evidence event, ``-1`` for non-targets.
    """

    user: np.ndarray
    point: np.ndarray
    item: np.ndarray
    signal: np.ndarray
    evidence: np.ndarray
    block_start: np.ndarray

    @staticmethod
    def concat(parts: list[_Planted]) -> _Planted:
        """Join parts, shifting each part's evidence indices by the events before it."""
        shift = _exclusive_cumsum(np.array([p.user.size for p in parts]))
        return _Planted(
            user=np.concatenate([p.user for p in parts]),
            point=np.concatenate([p.point for p in parts]),
            item=np.concatenate([p.item for p in parts]),
            signal=np.concatenate([p.signal for p in parts]),
            evidence=np.concatenate([np.where(p.evidence >= 0, p.evidence + s, NO_EVIDENCE)
                                     for p, s in zip(parts, shift)]),
            block_start=np.concatenate([p.block_start for p in parts]))


def _series_events(cfg: SyntheticConfig, cat: Catalogue, rng: np.random.Generator,
                   lengths: np.ndarray) -> _Planted:
    """Series installments ``[hub, episodes..]``; every installment after the first is a resumption."""
    mean_resumptions = (1 + cfg.max_resumptions) / 2
    wanted = lengths * cfg.long_range_fraction * (1 - cfg.recurrence_share) / mean_resumptions
    threads_per_user = np.minimum(_stochastic_round(rng, wanted), cfg.num_series)
    user = np.repeat(np.arange(cfg.num_users), threads_per_user)
    picks = _choose_without_replacement(rng, cfg.num_users, cfg.num_series, cfg.num_series)
    series = picks[user, _rank_in_group(threads_per_user)]

    links = rng.integers(1, cfg.max_resumptions + 1, user.size)
    binge = rng.integers(1, cfg.max_binge + 1, (user.size, cfg.max_resumptions + 1))
    offsets, resumptions = _chain_offsets(cfg, rng, links, lengths[user])
    start = _start_points(rng, lengths[user], offsets[np.arange(user.size), resumptions])
    watched = np.cumsum(binge, axis=1)                          # episodes seen after each installment
    joined = _start_points(rng, np.full(user.size, cfg.episodes_per_series),
                           watched[np.arange(user.size), resumptions])     # first episode, mid-way in

    # Blocks: installment j of thread t, for j = 0..resumptions[t].
    thread = np.repeat(np.arange(user.size), resumptions + 1)
    j = _rank_in_group(resumptions + 1)
    first_episode = joined[thread] + (watched - binge)[thread, j]
    size = 1 + binge[thread, j]
    block_first_event = _exclusive_cumsum(size)

    block = np.repeat(np.arange(thread.size), size)
    k = _rank_in_group(size)                                   # 0 = hub, 1.. = episodes
    s = series[thread[block]]
    episode = cat.series_episodes[s, np.maximum(first_episode[block] + k - 1, 0)]
    item = np.where(k == 0, cat.series_hub[s], episode)
    is_target = (k == 1) & (j[block] > 0)
    signal = np.select([k == 0, is_target, k == 1], [SIGNAL_BACKGROUND, SIGNAL_SERIES, SIGNAL_BACKGROUND],
                       SIGNAL_SHORT_RANGE)
    # Evidence of a resumption: the last event (last episode) of the thread's previous installment.
    previous_last = block_first_event[np.maximum(block - 1, 0)] + size[np.maximum(block - 1, 0)] - 1
    return _Planted(
        user=user[thread[block]], point=(start[thread] + offsets[thread, j])[block], item=item,
        signal=signal, evidence=np.where(is_target, previous_last, NO_EVIDENCE), block_start=k == 0)


def _interest_events(cfg: SyntheticConfig, cat: Catalogue, rng: np.random.Generator,
                     lengths: np.ndarray) -> _Planted:
    """Per interest an intro ``[hub, favourites..]``, then recurrences ``[hub, one favourite]``.

    Each favourite is its own chain of recurrences starting at the intro, so the distance back to its
    previous consumption follows the gap mixture instead of shrinking with the number of recurrences.
    """
    per_user, fav = cfg.niche_interests_per_user, cfg.favourites_per_interest
    interest_user = np.repeat(np.arange(cfg.num_users), per_user)
    niche = _choose_without_replacement(rng, cfg.num_users, cfg.num_niche_categories, per_user).ravel()
    slots = _choose_without_replacement(rng, interest_user.size, cfg.niche_items_per_category, fav)
    favourites = cat.niche_items[niche[:, None], slots]                     # [I, fav]

    # Recurrences per user, spread at random over the user's favourites (chains).
    recurrences = _stochastic_round(rng, lengths * cfg.long_range_fraction * cfg.recurrence_share)
    chains_per_user = per_user * fav
    draw_user = np.repeat(np.arange(cfg.num_users), recurrences)
    chain = draw_user * chains_per_user + rng.integers(0, chains_per_user, draw_user.size)
    links = np.bincount(chain, minlength=cfg.num_users * chains_per_user)
    chain_user = np.repeat(np.arange(cfg.num_users), chains_per_user)
    offsets, realised = _chain_offsets(cfg, rng, links, lengths[chain_user])
    span = offsets[np.arange(links.size), realised].reshape(-1, fav).max(axis=1)
    start = _start_points(rng, lengths[interest_user], span)

    # Intro blocks: interest i occupies events i*(1+fav) .. ; favourites in a random order.
    intro_order = np.argsort(rng.random(favourites.shape), axis=1)
    intro_items = np.concatenate([cat.niche_hub[niche][:, None],
                                  np.take_along_axis(favourites, intro_order, axis=1)], axis=1)
    intro_slot = np.argsort(intro_order, axis=1)                            # where favourite f sits
    intro_event_of_chain = (np.arange(interest_user.size)[:, None] * (1 + fav) + 1 + intro_slot).ravel()
    intro_size = intro_items.size

    # Recurrence blocks: link j of chain c, events intro_size + 2*b + (0 hub, 1 favourite).
    rec_chain = np.repeat(np.arange(links.size), realised)
    j = _rank_in_group(realised) + 1
    b = np.arange(rec_chain.size)
    evidence = np.where(j == 1, intro_event_of_chain[rec_chain], intro_size + 2 * (b - 1) + 1)
    interest = rec_chain // fav
    rec_items = np.stack([cat.niche_hub[niche[interest]], favourites.ravel()[rec_chain]], axis=1)

    return _Planted(
        user=np.concatenate([np.repeat(interest_user, 1 + fav), np.repeat(chain_user[rec_chain], 2)]),
        point=np.concatenate([np.repeat(start, 1 + fav),
                              np.repeat(start[interest] + offsets[rec_chain, j], 2)]),
        item=np.concatenate([intro_items.ravel(), rec_items.ravel()]),
        signal=np.concatenate([np.full(intro_size, SIGNAL_BACKGROUND),
                               np.tile([SIGNAL_BACKGROUND, SIGNAL_RECURRENCE], b.size)]),
        evidence=np.concatenate([np.full(intro_size, NO_EVIDENCE),
                                 np.stack([np.full(b.size, NO_EVIDENCE), evidence], axis=1).ravel()]),
        block_start=np.concatenate([np.tile(np.arange(1 + fav) == 0, interest_user.size),
                                    np.tile([True, False], b.size)]))


# ----------------------------------------------------------------------------------------------------
# Background sessions, merging, time.


@dataclass
class _Background:
    """Background events of all users, user after user (``[sum n_bg]`` each)."""

    item: np.ndarray
    signal: np.ndarray
    session_start: np.ndarray


def _background(cfg: SyntheticConfig, cat: Catalogue, rng: np.random.Generator,
                counts: np.ndarray) -> _Background:
    """Sessions of ring-successor walks inside one category, with Zipf-popular noise events mixed in."""
    total = int(counts.sum())
    session_start = rng.random(total) < 1.0 / cfg.mean_session_length
    session_start[_exclusive_cumsum(counts)[counts > 0]] = True
    popular = np.searchsorted(cat.ring_cdf, rng.random(total), side="right")   # ring entries
    popular = np.minimum(popular, cat.ring_items.size - 1)                     # guard u*cdf rounding
    in_pattern = rng.random(total) >= cfg.noise_prob

    # The first in-pattern event of a session opens the walk on a popular item (fixing the category);
    # each later one steps 1..successors_per_item ahead of the previous one in the category's ring.
    pattern_count = _segmented_cumsum(in_pattern.astype(np.int64), session_start)
    opener = in_pattern & (pattern_count == 1)
    step = np.where(in_pattern & ~opener, rng.integers(1, cfg.successors_per_item + 1, total), 0)
    walked = _segmented_cumsum(step, session_start)
    session = np.cumsum(session_start) - 1
    session_opener = np.zeros(int(session_start.sum()), dtype=np.int64)   # stays 0 in all-noise sessions
    session_opener[session[opener]] = popular[opener]
    base = session_opener[session]
    category = cat.ring_category[base]
    offset, size = cat.ring_offset[category], cat.ring_size[category]
    walk = offset + (base - offset + walked) % size
    item = cat.ring_items[np.where(in_pattern, walk, popular)]
    signal = np.where(in_pattern & ~opener, SIGNAL_SHORT_RANGE, SIGNAL_BACKGROUND)
    return _Background(item=item, signal=signal, session_start=session_start)


@dataclass
class _Merged:
    """Final rows (user after user, time order): item, signal, evidence distance, session starts."""

    item: np.ndarray
    signal: np.ndarray
    evidence_distance: np.ndarray
    session_start: np.ndarray


def _merge(cfg: SyntheticConfig, cat: Catalogue, rng: np.random.Generator, lengths: np.ndarray,
           planted: _Planted) -> _Merged:
    """Fill each user's remaining length with background and insert planted blocks at session starts.

    A planted event's row = background events before its insertion point + planted events before it;
    a background event's row = its background index + planted events inserted at or before it.
    """
    planted_per_user = np.bincount(planted.user, minlength=cfg.num_users)
    counts = lengths - planted_per_user
    if (counts < lengths // 4).any():
        raise ValueError("SyntheticConfig.long_range_fraction: planted events leave less than a quarter of "
                         "a history for background sessions; lower it or raise min_length")
    background = _background(cfg, cat, rng, counts)
    first_bg = _exclusive_cumsum(counts)

    # Scale planning points to the background and snap them down to a session start (a planted block
    # is a session of its own and never splits one); a point at the very end stays there.
    user = planted.user
    point = planted.point * counts[user] // lengths[user]
    at_end = point >= counts[user]
    starts = np.flatnonzero(background.session_start)
    global_point = first_bg[user] + point
    snapped = starts[np.searchsorted(starts, global_point, side="right") - 1]
    global_point = np.where(at_end, first_bg[user] + counts[user], snapped)

    # "+ user" keeps user u's end-of-history point below user u+1's first point.
    key = global_point + user
    order = np.argsort(key, kind="stable")       # stable: creation order keeps blocks and chains intact
    planted_row = np.empty(user.size, dtype=np.int64)
    planted_row[order] = global_point[order] + np.arange(user.size)
    bg_key = np.arange(background.item.size) + np.repeat(np.arange(cfg.num_users), counts)
    inserted_up_to = np.cumsum(np.bincount(key, minlength=background.item.size + cfg.num_users + 1))
    bg_row = np.arange(background.item.size) + inserted_up_to[bg_key]

    n = int(lengths.sum())
    item = np.empty(n, dtype=np.int64)
    signal = np.empty(n, dtype=np.int64)
    session_start = np.empty(n, dtype=bool)
    item[bg_row], item[planted_row] = background.item, planted.item
    signal[bg_row], signal[planted_row] = background.signal, planted.signal
    session_start[bg_row], session_start[planted_row] = background.session_start, planted.block_start
    evidence_distance = np.full(n, NO_EVIDENCE, dtype=np.int64)
    target = planted.evidence >= 0
    evidence_distance[planted_row[target]] = planted_row[target] - planted_row[planted.evidence[target]]
    return _Merged(item=item, signal=signal, evidence_distance=evidence_distance,
                   session_start=session_start)


def _timestamps(cfg: SyntheticConfig, rng: np.random.Generator, lengths: np.ndarray,
                session_start: np.ndarray) -> np.ndarray:
    """Strictly increasing seconds per user: gaps < session_timeout_s inside, >= it between sessions."""
    n = session_start.size
    within = np.minimum(1 + np.floor(rng.exponential(cfg.within_session_gap_s, n)), cfg.session_timeout_s - 1)
    between = cfg.session_timeout_s + np.floor(rng.exponential(cfg.between_session_gap_s, n))
    gap = np.where(session_start, between, within).astype(np.int64)
    first_row = _exclusive_cumsum(lengths)
    gap[first_row] = 0
    elapsed = np.cumsum(gap)
    user_start = cfg.start_time + rng.integers(0, cfg.start_spread_s + 1, cfg.num_users)
    return np.repeat(user_start - elapsed[first_row], lengths) + elapsed


def generate(cfg: SyntheticConfig) -> pl.DataFrame:
    """The synthetic interaction log of ``cfg``: one row per event, users in order, time order inside.

    Columns and dtypes as in :data:`SCHEMA`. Deterministic: the same config gives the same frame.
    """
    cat = build_catalogue(cfg)
    lengths = _user_lengths(cfg, _rng(cfg, _STREAM_USERS))
    planted = _Planted.concat([_series_events(cfg, cat, _rng(cfg, _STREAM_SERIES), lengths),
                               _interest_events(cfg, cat, _rng(cfg, _STREAM_INTERESTS), lengths)])
    rng = _rng(cfg, _STREAM_BACKGROUND)
    merged = _merge(cfg, cat, rng, lengths, planted)
    timestamp = _timestamps(cfg, rng, lengths, merged.session_start)
    user_names = pl.Series(_names("u", cfg.num_users, 7), dtype=pl.Utf8)
    item_names = pl.Series(cat.item_names, dtype=pl.Utf8)
    category_names = pl.Series(cat.category_names, dtype=pl.Utf8)
    return pl.DataFrame({
        "user_id": user_names.gather(np.repeat(np.arange(cfg.num_users), lengths)),
        "item_id": item_names.gather(merged.item),
        "timestamp": timestamp,
        "category": category_names.gather(cat.category_of[merged.item]),
        "evidence_distance": merged.evidence_distance,
        "signal": merged.signal,
    }, schema=SCHEMA)


def write(cfg: SyntheticConfig, path: str | Path) -> Path:
    """Generate ``cfg`` and write it as parquet at ``path`` atomically (temp file + rename).

    The config is stored as JSON under :data:`PARQUET_METADATA_KEY` in the parquet schema metadata.
    Returns the resolved path.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = generate(cfg).to_arrow()
    metadata = {**(table.schema.metadata or {}), PARQUET_METADATA_KEY: json.dumps(asdict(cfg)).encode()}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")    # same folder: rename is atomic
    try:
        pq.write_table(table.replace_schema_metadata(metadata), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
