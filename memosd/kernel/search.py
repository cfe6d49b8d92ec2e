"""Hybrid search over one or more mounts.

Each mount sees its base revision plus its own staged changes. Committed items
come from the cube's indexes, which hold every version ever committed; a
version is accepted only if it is alive at the mount's base, not overridden by
the mount's staging, and passes the filters. Staged items (few) are scored
directly. The dense lists of all mounts are merged by cosine similarity, the
lexical lists by BM25, and the two merged lists are fused once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from memosd.kernel import validate
from memosd.kernel.conversation import SessionOrder
from memosd.kernel.kernel import Kernel
from memosd.kernel.memory_text import memory_text
from memosd.kernel.ports import FusedHitLike, Ranker, Scored
from memosd.kernel.session_match import Signature, TermCache, TurnTerms, merge, session_scores, turn_terms
from memosd.kernel.state import CubeState, MountState, staged_view, view_of
from memosd.kernel.timeref import Period, query_periods
from memosd.kernel.turn_rank import LIFT_DEPTH, MATCH_WEIGHT, lift
from memosd.kernel.types import ItemView, MountHeader, SearchFilter, SearchHit, SearchResult
from memosd.store.records import StagedRecord

MODES = ("hybrid", "dense", "lexical")
# How much a hybrid hit gains when its event time is in a period the query names ("in May 2023"; see _lift):
# its fused score times 1 + PERIOD_BOOST, and then PERIOD_LIFT added (search.period_lift).
PERIOD_BOOST = 0.5
PERIOD_LIFT = 0.2


@dataclass(frozen=True)
class SearchSettings:
    depth: int = 100  # candidates fetched from each list before fusing
    exact_below: int = 2048  # brute-force dense search when a tag filter leaves fewer versions
    session_match_weight: float = MATCH_WEIGHT  # hybrid: kernel/session_match.py; 0 turns it off
    period_lift: float = PERIOD_LIFT  # hybrid: added to a hit in a period the query names; 0 turns it off


@dataclass(frozen=True)
class _Lifted:
    """A hybrid hit after kernel/turn_rank.py's lifts (a FusedHitLike); the list scores and ranks are the
    fused hit's, zero for a reply that entered by its lift alone."""

    key: int
    score: float
    dense_score: float
    lexical_score: float
    dense_rank: int
    lexical_rank: int


def _ranks(hit: FusedHitLike) -> tuple[float, float, int, int]:
    return hit.dense_score, hit.lexical_score, hit.dense_rank, hit.lexical_rank


@dataclass
class _Candidate:
    mount: MountState
    cube: CubeState
    vkey: int = 0  # committed version, or
    staged_id: str = ""  # a staged item


class Searcher:
    def __init__(self, kernel: Kernel, rank: Ranker, settings: SearchSettings) -> None:
        self.kernel = kernel
        self.rank = rank
        self.settings = settings
        self._terms = TermCache()

    def search(self, mount_ids: Sequence[str], query: str, k: int, filt: SearchFilter, mode: str,
               context_turns: int = 0) -> SearchResult:
        started = time.perf_counter_ns()
        k = validate.search(mount_ids, query, k, mode, MODES, filt.speakers, filt.session_ids, context_turns,
                            self.kernel.limits)
        mounts = [self.kernel.mount_state(mid) for mid in dict.fromkeys(mount_ids)]
        cubes = [self.kernel.cube_of(m) for m in mounts]

        embed_ns = 0
        qvec: np.ndarray | None = None
        if mode != "lexical":
            t0 = time.perf_counter_ns()
            qvec = self.kernel.embedder.embed([query])[0]
            embed_ns = time.perf_counter_ns() - t0

        depth = max(k, self.settings.depth) if mode == "hybrid" else k
        candidates: list[_Candidate] = []
        keys: dict[tuple[str, int], int] = {}  # (mount, vkey) -> index into candidates
        seen: dict[str, tuple[int, dict[str, StagedRecord]]] = {}  # mount -> the base and staging searched
        dense: Scored = []
        lexical: Scored = []
        now = time.time_ns()  # archived and expired items are left out (kernel/catalog.py VersionMeta.hidden)
        for mount, cube in zip(mounts, cubes, strict=True):
            with mount.lock:
                staging = dict(mount.staging)
                vectors = dict(mount.vectors)
                base = mount.record.base
            seen[mount.mount_id] = (base, staging)
            catalog = cube.catalog

            def accept(vkey: int, catalog=catalog, base=base, staging=staging) -> bool:  # type: ignore[no-untyped-def]
                meta = catalog.by_vkey.get(vkey)
                return (meta is not None and meta.alive_at(base) and meta.item_id not in staging
                        and not meta.hidden(now, filt.include_archived)
                        and filt.matches(meta.tags, meta.event_ns, meta.speaker, meta.session_id))

            def key_of(vkey: int, mount=mount, cube=cube) -> int:  # type: ignore[no-untyped-def]
                key = keys.get((mount.mount_id, vkey))
                if key is None:
                    key = keys[(mount.mount_id, vkey)] = len(candidates)
                    candidates.append(_Candidate(mount, cube, vkey=vkey))
                return key

            if qvec is not None:
                dense += [(key_of(v), s) for v, s in self._dense(cube, qvec, depth, accept, filt)]
            if mode != "dense":
                lexical += [(key_of(v), s) for v, s in cube.index.lexical_search(query, depth, accept)]
            self._staged(mount, cube, staging, vectors, query, qvec, depth, filt, mode, candidates, dense, lexical)

        dense.sort(key=lambda ks: (-ks[1], ks[0]))
        lexical.sort(key=lambda ks: (-ks[1], ks[0]))
        orders = {m.mount_id: SessionOrder(self.kernel.store, c, *seen[m.mount_id], hidden_at=now,
                                           include_archived=filt.include_archived)
                  for m, c in zip(mounts, cubes, strict=True)}
        if mode == "hybrid":  # every candidate fused, then conversation structure (kernel/turn_rank.py)
            fused: Sequence[FusedHitLike] = self._lift(
                self.rank(dense[:depth], lexical[:depth], len(candidates), mode), candidates, keys, orders,
                filt, now, k, query_periods(query), query)
        else:
            fused = self.rank(dense[:depth], lexical[:depth], k, mode)
        hits = self._turns(self._materialize(fused, candidates), orders, context_turns)
        headers = [MountHeader(c.cube_id, c.head, m.record.base) for m, c in zip(mounts, cubes, strict=True)]
        took = time.perf_counter_ns() - started
        return SearchResult(hits, headers, took // 1000, embed_ns // 1000)

    def _dense(self, cube: CubeState, qvec: np.ndarray, depth: int, accept, filt: SearchFilter) -> Scored:  # type: ignore[no-untyped-def]
        """HNSW with a filter by oversampling; exact over the few matches of a selective tag, speaker or
        session filter."""
        with cube.lock:
            tagged = cube.catalog.vkeys_with_tags(filt.all_of, filt.any_of, filt.speakers, filt.session_ids)
        if tagged is not None and len(tagged) <= self.settings.exact_below:
            keys = np.fromiter((v for v in tagged if accept(v)), dtype=np.uint64)
            return cube.index.dense_exact(qvec, keys)[:depth] if len(keys) else []
        return cube.index.dense_search(qvec, depth, accept)

    def _staged(self, mount: MountState, cube: CubeState, staging: dict, vectors: dict,  # type: ignore[type-arg]
                query: str, qvec: np.ndarray | None, depth: int, filt: SearchFilter, mode: str,
                candidates: list[_Candidate], dense: Scored, lexical: Scored) -> None:
        now = time.time_ns()
        staged = [s for s in staging.values()
                  if s.kind != "forget" and not 0 < s.expire_ns <= now
                  and filt.matches(set(s.tags), s.event_ns, s.speaker, s.session_id)]
        if not staged:
            return
        base_index = len(candidates)
        candidates.extend(_Candidate(mount, cube, staged_id=s.item_id) for s in staged)
        if qvec is not None:
            matrix = np.stack([vectors[s.item_id] for s in staged])
            sims = matrix @ qvec
            dense += [(base_index + i, float(sims[i])) for i in np.argsort(-sims)[:depth]]
        if mode != "dense":
            docs = [(base_index + i, memory_text(s.text, s.speaker, s.event_ns)) for i, s in enumerate(staged)]
            lexical += cube.index.lexical_staged(query, docs, depth)

    def _lift(self, fused: Sequence[FusedHitLike], candidates: list[_Candidate],
              keys: dict[tuple[str, int], int], orders: dict[str, SessionOrder], filt: SearchFilter, now: int,
              k: int, periods: Sequence[Period], query: str) -> list[FusedHitLike]:
        """The top ``k`` of ``fused`` (every candidate, best first) after the time boost and the reply and
        session lifts.

        A candidate whose event time falls in one of the ``periods`` the query names scores
        ``1 + PERIOD_BOOST`` times its fused score (a soft filter: a turn that tells of May in June still
        competes), and after the lifts gains ``settings.period_lift`` (0.2) more. Why both: the factor
        helps only a turn the lists already rank well, while a session held on the day the query names
        ("on 3 June, 2023") often has no such turn. Its turns carry the session's date as their time, so
        the constant lifts all of them among the candidates together, as a session match would. A reply
        lifted in that was not a candidate becomes one, if the search's filters let it through."""
        staged_keys = {(c.mount.mount_id, c.staged_id): i for i, c in enumerate(candidates) if c.staged_id}
        sessions: dict[int, tuple[str, str]] = {}
        next_of: dict[int, int] = {}
        for rank, hit in enumerate(fused):
            cand = candidates[hit.key]
            turn = self._turn_of(cand)
            if turn is None:
                continue
            session_id, item_id = turn
            sessions[hit.key] = (cand.mount.mount_id, session_id)
            if rank >= LIFT_DEPTH:
                continue
            nxt = orders[cand.mount.mount_id].next_turn(session_id, item_id)
            nkey = self._reply_key(nxt, cand, candidates, keys, staged_keys, filt, now) if nxt else None
            if nkey is not None:
                next_of[hit.key] = nkey
                sessions[nkey] = (cand.mount.mount_id, session_id)
        by_key = {hit.key: hit for hit in fused}
        scores = {hit.key: hit.score for hit in fused}
        in_period: set[int] = set()
        if periods:
            in_period = {key for key in [*scores, *next_of.values()] if self._in(candidates[key], periods)}
            for key in in_period & scores.keys():
                scores[key] *= 1.0 + PERIOD_BOOST
        match = (self._session_match(query, set(sessions.values()), orders)
                 if self.settings.session_match_weight else None)
        scores = lift(scores, sessions, next_of, session_match=match,
                      match_weight=self.settings.session_match_weight)
        if self.settings.period_lift:
            for key in in_period:  # the lifted-in replies too
                scores[key] += self.settings.period_lift
        ranked = sorted(scores, key=lambda key: (-scores[key], key))[:k]
        return [_Lifted(key, scores[key], *(_ranks(by_key[key]) if key in by_key else (0.0, 0.0, 0, 0)))
                for key in ranked]

    def _session_match(self, query: str, sessions: set[tuple[str, str]],
                       orders: dict[str, SessionOrder]) -> dict[tuple[str, str], float]:
        """kernel/session_match.py's score of each (mount, session) among the candidates: its turns as the
        mount sees them. A session's committed turns come merged from the cache while they are the same
        turns; else each turn's terms from the cache or, for versions not in it, read in one batch per cube
        and analyzed once. Staged turns are analyzed each time (a mount stages few)."""
        docs: dict[tuple[str, str], list[TurnTerms]] = {}
        stale: dict[tuple[str, str], tuple[str, Signature]] = {}
        for session in sessions:
            order = orders[session[0]]
            cube_id = order.cube.cube_id
            committed: list[tuple[int, str, int]] = []
            found: list[TurnTerms] = []
            for item_id, born, vkey, staged in order.turns(session[1]):
                if staged is None:
                    committed.append((vkey, item_id, born))
                else:
                    found.append(turn_terms(memory_text(staged.text, staged.speaker, staged.event_ns)))
            signature = tuple(committed)
            merged = self._terms.session(cube_id, session[1], signature)
            if merged is not None:
                found.append(merged)
            elif signature:
                stale[session] = (cube_id, signature)
            docs[session] = found
        if stale:
            missing: dict[str, dict[tuple[str, int], int]] = {}  # cube -> (item id, born) -> vkey
            for cube_id, signature in stale.values():
                for vkey, item_id, born in signature:
                    if self._terms.get(cube_id, vkey, item_id, born) is None:
                        missing.setdefault(cube_id, {})[(item_id, born)] = vkey
            for cube_id, refs in missing.items():
                ordered = list(refs)
                for (item_id, born), record in zip(ordered, self.kernel.store.get_versions(cube_id, ordered),
                                                   strict=True):
                    if record is not None:  # purged meanwhile: no words
                        self._terms.put(cube_id, refs[(item_id, born)], item_id, born,
                                        turn_terms(memory_text(record.text, record.speaker, record.event_ns)))
            for session, (cube_id, signature) in stale.items():
                turns = [self._terms.get(cube_id, vkey, item_id, born) for vkey, item_id, born in signature]
                merged = merge([t for t in turns if t is not None])
                self._terms.put_session(cube_id, session[1], signature, merged)
                docs[session].append(merged)
        return session_scores(query, docs)

    @staticmethod
    def _turn_of(cand: _Candidate) -> tuple[str, str] | None:
        """(session id, item id) of a candidate that is a conversation turn, else None."""
        if cand.staged_id:
            staged = cand.mount.staging.get(cand.staged_id)
            return (staged.session_id, staged.item_id) if staged is not None and staged.session_id else None
        meta = cand.cube.catalog.by_vkey.get(cand.vkey)
        return (meta.session_id, meta.item_id) if meta is not None and meta.session_id else None

    @classmethod
    def _in(cls, cand: _Candidate, periods: Sequence[Period]) -> bool:
        when = cls._event_ns(cand)
        return bool(when) and any(p.contains(when) for p in periods)

    @staticmethod
    def _event_ns(cand: _Candidate) -> int:
        if cand.staged_id:
            staged = cand.mount.staging.get(cand.staged_id)
            return staged.event_ns if staged is not None else 0
        meta = cand.cube.catalog.by_vkey.get(cand.vkey)
        return meta.event_ns if meta is not None else 0

    @staticmethod
    def _reply_key(nxt: tuple[str, int, StagedRecord | None], cand: _Candidate, candidates: list[_Candidate],
                   keys: dict[tuple[str, int], int], staged_keys: dict[tuple[str, str], int],
                   filt: SearchFilter, now: int) -> int | None:
        """The candidate key of the turn after ``cand`` (added to ``candidates`` when new), or None when the
        search's filters leave it out."""
        item_id, born, staged = nxt
        mount_id = cand.mount.mount_id
        if staged is not None:
            if not filt.matches(set(staged.tags), staged.event_ns, staged.speaker, staged.session_id):
                return None
            key = staged_keys.get((mount_id, item_id))
            if key is None:
                key = staged_keys[(mount_id, item_id)] = len(candidates)
                candidates.append(_Candidate(cand.mount, cand.cube, staged_id=item_id))
            return key
        meta = next((m for m in cand.cube.catalog.by_item.get(item_id, ()) if m.born == born), None)
        if meta is None or meta.hidden(now, filt.include_archived) or not filt.matches(
                meta.tags, meta.event_ns, meta.speaker, meta.session_id):
            return None
        key = keys.get((mount_id, meta.vkey))
        if key is None:
            key = keys[(mount_id, meta.vkey)] = len(candidates)
            candidates.append(_Candidate(cand.mount, cand.cube, vkey=meta.vkey))
        return key

    def _turns(self, hits: list[SearchHit], orders: dict[str, SessionOrder],
               context_turns: int) -> list[SearchHit]:
        """Conversation turns among the hits get their previous and next turns and, with ``context_turns``,
        their neighbours; as each hit's mount saw its session when this search read its staging. Turns
        Search leaves out (expired; archived unless asked for) are neither neighbours nor context."""
        if not any(h.item.session_id for h in hits):
            return hits
        out = [replace(h, item=orders[h.mount_id].link(h.item)) for h in hits]
        if context_turns:
            for mount_id, order in orders.items():  # one store read per mount
                mine = [i for i, h in enumerate(out) if h.mount_id == mount_id and h.item.session_id]
                around = order.context([out[i].item for i in mine], context_turns)
                for i, (before, after) in zip(mine, around, strict=True):
                    out[i] = replace(out[i], context_before=before, context_after=after)
        return out

    def _materialize(self, fused: Sequence[FusedHitLike], candidates: list[_Candidate]) -> list[SearchHit]:
        views: dict[int, ItemView] = {}
        by_cube: dict[str, list[tuple[int, str, int]]] = {}
        for hit in fused:
            cand = candidates[hit.key]
            if cand.staged_id:
                staged = cand.mount.staging.get(cand.staged_id)
                if staged is not None and staged.kind != "forget":
                    views[hit.key] = staged_view(staged)
                continue
            meta = cand.cube.catalog.by_vkey.get(cand.vkey)
            if meta is None:  # purged while we searched
                continue
            by_cube.setdefault(cand.cube.cube_id, []).append((hit.key, meta.item_id, meta.born))
        for cube_id, refs in by_cube.items():
            records = self.kernel.store.get_versions(cube_id, [(i, b) for _, i, b in refs])
            for (key, _, _), record in zip(refs, records, strict=True):
                if record is not None:
                    views[key] = view_of(record)
        hits = []
        for hit in fused:
            view = views.get(hit.key)
            if view is None:  # committed away or unstaged while we searched
                continue
            cand = candidates[hit.key]
            hits.append(SearchHit(view, cand.mount.mount_id, cand.cube.cube_id, hit.score, hit.dense_score,
                                  hit.lexical_score, hit.dense_rank, hit.lexical_rank))
        return hits

