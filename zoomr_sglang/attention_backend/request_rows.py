"""The planner's books: per pool row one :class:`RowRecord`, from the row's allocation to its release.

A record holds everything the planner keeps for the request in its row (SGLang's ``Req``, its
settings, its prompt's reasoning and, once it decoded, its :class:`RequestState`), so releasing a
row is one pop. :class:`RowRecords` also keeps the one index by request id and the batch's lookup
(rows, ``Req`` and states in batch order), reused from step to step while no row changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from zoomr_sglang.attention_backend.prompt_reasoning import PromptReasoning
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.config import RequestSettings


@dataclass(slots=True, eq=False)
class RowRecord:
    """The request in one pool row. ``generation`` is the row's ``ReqToTokenPool.req_generation``
    when the request took it: a ``state`` made with another is a former request's (replaced at the
    new request's first decode step)."""

    generation: int
    req: object  # SGLang's Req: rid, tokens (origin_input_ids + output_ids), sampling params
    settings: RequestSettings
    reasoning: Optional[PromptReasoning]  # reasoning its prompt holds (None: it segments its output only)
    state: Optional[RequestState] = None  # made at its first decode step


class RowRecords:
    """Every noted request's :class:`RowRecord` by pool row, and ``rows_by_rid``, kept only here."""

    def __init__(self) -> None:
        self.by_row: Dict[int, RowRecord] = {}
        self.rows_by_rid: Dict[str, int] = {}
        self.epoch = 0  # changes whenever a row's request or state does (see batch)
        self._last_batch: Optional[Tuple] = None  # (epoch, rids, rows, reqs, states) of the last step
        self.states = RowStates(self.by_row)

    def note(self, row: int, record: RowRecord) -> None:
        """A request took ``row``; a state already there stays until the generations tell it apart
        (the same request noted again, as at each prefill chunk, keeps its own)."""
        former = self.by_row.get(row)
        record.state = None if former is None else former.state
        self.by_row[row] = record
        self.rows_by_rid[record.req.rid] = row
        self.epoch += 1

    def take_state(self, row: int) -> Optional[RequestState]:
        """Detach the row's state (None if it has none); its request stays noted."""
        record = self.by_row.get(row)
        self.epoch += 1
        if record is None:
            return None
        state, record.state = record.state, None
        return state

    def pop(self, row: int) -> Optional[RowRecord]:
        """The request in ``row`` left: its record, gone from the books (None if never noted)."""
        record = self.by_row.pop(row, None)
        self.epoch += 1
        if record is not None and self.rows_by_rid.get(record.req.rid) == row:
            del self.rows_by_rid[record.req.rid]
        return record

    def batch(self, rids: Sequence[str]) -> Tuple[List[int], list, List[Optional[RequestState]]]:
        """The batch's rows, their ``Req`` and their states (None: to be made); the last step's
        while the batch and every row's request are the same (``epoch`` counts row changes)."""
        last = self._last_batch
        if last is not None and last[0] == self.epoch and last[1] == rids:
            return last[2], last[3], last[4]
        rows, reqs, states = [], [], []
        for rid in rids:
            row = self.rows_by_rid.get(rid)
            if row is None:
                raise RuntimeError(f"zoomr: decode batch holds request {rid!r}, whose pool row was never noted "
                                   "(the ReqToTokenPool.alloc hook did not run for it)")
            record = self.by_row[row]
            state = record.state
            rows.append(row)
            reqs.append(record.req)
            states.append(state if state is not None and state.generation == record.generation else None)
        return rows, reqs, states

    def keep_batch(self, rids: Sequence[str], rows: List[int], reqs: list,
                   states: List[Optional[RequestState]]) -> None:
        """What :meth:`batch` returns for ``rids`` until a row changes (its states filled in)."""
        self._last_batch = (self.epoch, list(rids), rows, reqs, states)


class RowStates(Mapping):
    """Pool row -> :class:`RequestState` of every noted request that has decoded: a read-only view
    of the records (the controller's counters, the admission hooks and tests read it)."""

    def __init__(self, by_row: Dict[int, RowRecord]) -> None:
        self._by_row = by_row

    def get(self, row: int, default=None):
        record = self._by_row.get(row)
        return default if record is None or record.state is None else record.state

    def __getitem__(self, row: int) -> RequestState:
        state = self.get(row)
        if state is None:
            raise KeyError(row)
        return state

    def __iter__(self) -> Iterator[int]:
        return (row for row, record in self._by_row.items() if record.state is not None)

    def __len__(self) -> int:
        return sum(record.state is not None for record in self._by_row.values())
