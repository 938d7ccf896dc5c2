"""CSV records with their exact physical lines and bytes, found by a vectorised scan.

A CSV row (a record) may span several physical lines (a quoted field holding a line break), and
a file may hold blank lines; pyarrow numbers neither (``InvalidRow.number`` counts the rows it
parsed, not the lines of the file). So the bytes are scanned here, in blocks, with numpy:
a line break ends a record when it is outside quotes, and "outside" is the parity of the
quote characters before it. The quoting rules are pyarrow's (and RFC 4180's): a quote opens a
quoted field only at the start of a field; inside one, ``""`` is a literal quote and a lone
quote closes it; a quote anywhere else (``12" screen``) is a literal character. The parity
scan is exact when every quote is an opening, closing or escaped one; a block holding a literal
quote is classified quote by quote instead (a loop over its quotes, not its bytes).

Line breaks are ``\\n``, ``\\r\\n`` and a lone ``\\r`` (pyarrow ends a row at each; inside a
quoted field they belong to the value but still start a new physical line).

``scan_records`` yields the header record alone, then chunks of ``chunk_rows`` records: their
bytes, each record's byte span, first physical line and field count. The caller hands pyarrow
only the well-formed records, so pyarrow never has to report a line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

QUOTE, LF, CR = 0x22, 0x0A, 0x0D
BOM = b"\xef\xbb\xbf"
BLOCK_BYTES = 1 << 22
# a record larger than this is an unterminated quote, not data: stop instead of buffering the
# rest of the file (the record's first line is named)
MAX_RECORD_BYTES = 1 << 28


class RecordTooLong(ValueError):
    """A record runs over ``MAX_RECORD_BYTES``; ``line`` is its first physical line."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


@dataclass
class Records:
    """Consecutive records of a CSV file, as bytes with their spans."""

    data: bytes  # the records' bytes, terminators included
    starts: np.ndarray  # int64: offset in ``data`` of each record's first byte
    ends: np.ndarray  # int64: offset just past each record's last byte (terminator excluded)
    lines: np.ndarray  # int64: physical line of each record's first byte (the file's first: 1)
    fields: np.ndarray  # int64: delimiters outside quotes + 1
    unterminated: bool = False  # the last record ends inside a quoted field (end of the file)

    def __len__(self) -> int:
        return len(self.starts)

    def raw(self, i: int) -> str:
        """Record ``i`` exactly as in the file (its line breaks included), decoded leniently."""
        return self.data[self.starts[i] : self.ends[i]].decode("utf-8", errors="replace")

    def blank(self) -> np.ndarray:
        """Records with no data: an empty line, or delimiters only (a spreadsheet's empty row).
        Every byte of such a record is a delimiter outside quotes."""
        return (self.ends - self.starts) == (self.fields - 1)

    def select(self, keep: np.ndarray) -> bytes:
        """The bytes of the kept records, in order, each with its own terminator."""
        if keep.all():
            return self.data
        spans = np.diff(np.append(self.starts, len(self.data)))
        return np.frombuffer(self.data, np.uint8)[np.repeat(keep, spans)].tobytes()


@dataclass
class _State:
    """What a block's scan needs from the bytes before it."""

    inq: bool = False  # inside a quoted field
    prev: int = LF  # the previous byte (LF at the start: a field starts)
    prev_closer: bool = False  # the previous byte is a quote that closed a quoted field
    line: int = 1  # physical line of the next byte
    rec_line: int = 1  # physical line where the unfinished record starts
    rec_delims: int = 0  # delimiters outside quotes in the unfinished record so far


def _structural_quotes(seg: np.ndarray, q: np.ndarray, st: _State, delim: int) -> np.ndarray:
    """The quotes of ``seg`` (positions ``q``) that open or close a quoted field."""
    if not len(q):
        return q
    outside = (np.arange(len(q)) % 2 == 0) != st.inq  # before each quote, were all structural
    prev = np.where(q > 0, seg[np.maximum(q - 1, 0)], st.prev)
    at_start = (prev == delim) | (prev == LF) | (prev == CR)
    # an opening quote right after a closing one is the second half of an escaped "" pair
    after_close = np.where(q > 0, prev == QUOTE, st.prev_closer)
    if bool(np.all(~outside | at_start | after_close)):
        return q
    return _structural_quotes_slow(seg.tobytes(), q, st, delim)


def _structural_quotes_slow(seg: bytes, q: np.ndarray, st: _State, delim: int) -> np.ndarray:
    """``_structural_quotes`` quote by quote, for a block holding a literal quote."""
    keep = []
    inq = st.inq
    last_close = -1 if st.prev_closer else -2  # -1: the byte before the block
    for p in q.tolist():
        if inq:
            keep.append(p)
            inq, last_close = False, p
            continue
        prev = seg[p - 1] if p > 0 else st.prev
        if prev in (delim, LF, CR) or (prev == QUOTE and last_close == p - 1):
            keep.append(p)
            inq = True
    return np.asarray(keep, np.int64)


def _scan(raw: bytes, base: int, st: _State, delim: int, rec_start: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The records that end in ``raw`` (at buffer offset ``base``): starts, ends, lines and
    field counts in buffer offsets, and where the unfinished record starts. ``st`` moves on to
    the end of ``raw``. A CR at the end of ``raw`` is a lone line break: the reader scans a CR
    that ends its buffer only once the next byte is known."""
    seg = np.frombuffer(raw, np.uint8)
    n = len(seg)
    # bytes' memchr-fast membership tests first: most blocks have no quote, no CR
    quotes = _structural_quotes(seg, np.flatnonzero(seg == QUOTE) if b'"' in raw
                                else np.zeros(0, np.int64), st, delim)
    if len(quotes):
        # the parity of the quotes up to each byte, as runs between quotes (np.repeat: a
        # memory fill, several times faster than a running sum over the bytes)
        bounds = np.concatenate([[0], quotes, [n]])
        parity = np.repeat((np.arange(len(bounds) - 1) % 2).astype(np.uint8), np.diff(bounds))

        def inside(pos: np.ndarray) -> np.ndarray:  # pos never holds a quote
            return (parity[pos] == 1) != st.inq
    else:
        def inside(pos: np.ndarray) -> np.ndarray:
            return np.full(len(pos), st.inq)

    lf = np.flatnonzero(seg == LF)
    cr = np.flatnonzero(seg == CR) if b"\r" in raw else np.zeros(0, np.int64)
    lone_cr = cr[(cr + 1 >= n) | (seg[np.minimum(cr + 1, n - 1)] != LF)]
    breaks = np.sort(np.concatenate([lf, lone_cr])) if len(lone_cr) else lf
    terms = breaks[~inside(breaks)]
    delims = np.flatnonzero(seg == delim)
    delims = delims[~inside(delims)]

    prev_byte = np.where(terms > 0, seg[np.maximum(terms - 1, 0)], st.prev)
    crlf = (seg[terms] == LF) & (prev_byte == CR)
    ends = terms - crlf.astype(np.int64) + base
    starts = np.concatenate([[rec_start], terms[:-1] + 1 + base]).astype(np.int64)
    lines = np.concatenate([[st.rec_line],
                            st.line + np.searchsorted(breaks, terms[:-1], side="right")])
    before = np.searchsorted(delims, terms)
    fields = np.diff(np.concatenate([[0], before])) + 1
    if len(terms):
        fields[0] += st.rec_delims
        rec_start = int(terms[-1]) + 1 + base
        st.rec_line = st.line + int(np.searchsorted(breaks, terms[-1], side="right"))
        st.rec_delims = len(delims) - int(before[-1])
    else:
        starts, lines = starts[:0], lines[:0]
        st.rec_delims += len(delims)
    st.line += len(breaks)
    st.inq = st.inq != (len(quotes) % 2 == 1)
    if n:
        st.prev = int(seg[-1])
        st.prev_closer = bool(len(quotes)) and int(quotes[-1]) == n - 1 and not st.inq
    return starts, ends.astype(np.int64), lines.astype(np.int64), fields.astype(np.int64), \
        rec_start


def scan_records(read: Callable[[int], bytes], delimiter: str, chunk_rows: int,
                 block_bytes: int = BLOCK_BYTES) -> Iterator[Records]:
    """The header record alone, then the data records in chunks of ``chunk_rows`` (the last
    may be shorter), read from ``read(n)`` (a binary file's ``read``). A UTF-8 byte-order mark
    is dropped. Raises ``RecordTooLong`` for a record over ``MAX_RECORD_BYTES``."""
    delim = ord(delimiter)
    st = _State()
    buf = bytearray()
    scanned = rec_start = 0
    pend = [np.zeros(0, np.int64) for _ in range(4)]  # starts, ends, lines, fields
    want = 1  # the header goes alone
    first = True
    while True:
        block = read(block_bytes)
        eof = not block
        buf += block
        if first:  # the mark may come in pieces when blocks are tiny
            if len(buf) < len(BOM) and not eof:
                continue
            if buf.startswith(BOM):
                del buf[: len(BOM)]
            first = False
        # a CR at the end of a block may be the first half of a CRLF: scan it with the next
        stop = len(buf) - 1 if not eof and buf.endswith(b"\r") else len(buf)
        if stop > scanned:
            # a copy: a lasting view would pin the bytearray (it could not grow or shrink)
            with memoryview(buf) as view:
                raw = view[scanned:stop].tobytes()
            *new, rec_start = _scan(raw, scanned, st, delim, rec_start)
            pend = [np.concatenate([p, x]) for p, x in zip(pend, new, strict=True)]
            scanned = stop
        unterminated = False
        if eof and rec_start < len(buf):  # the last record, without a line break
            tail = ([rec_start], [len(buf)], [st.rec_line], [st.rec_delims + 1])
            pend = [np.concatenate([p, np.asarray(x, np.int64)])
                    for p, x in zip(pend, tail, strict=True)]
            unterminated, rec_start = st.inq, len(buf)
        elif scanned - rec_start > MAX_RECORD_BYTES:
            raise RecordTooLong(st.rec_line)
        while len(pend[0]) >= want or (eof and len(pend[0])):
            k = min(want, len(pend[0]))
            cut = int(pend[0][k]) if k < len(pend[0]) else rec_start
            last = eof and k == len(pend[0])
            starts, ends, lines, fields = (p[:k] for p in pend)
            with memoryview(buf) as view:
                data = view[:cut].tobytes()
            yield Records(data, starts, ends, lines, fields, unterminated and last)
            del buf[:cut]
            scanned, rec_start = scanned - cut, rec_start - cut
            pend = [pend[0][k:] - cut, pend[1][k:] - cut, pend[2][k:], pend[3][k:]]
            want = chunk_rows
        if eof:
            return
