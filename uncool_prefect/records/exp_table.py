"""The table of ``uncool exp show``: a rich Table, and the same table laid out in one pass.

:func:`render_table` builds a rich table, one row per run: rich lays it out cell
by cell (measure, wrap, justify, crop, ~50 us a cell), a second for a thousand
runs of twenty columns. :func:`render_table_fast` prints the same text and
styles in ~0.04 s: :class:`OneLineTable` knows that every cell is one line of
plain text, so each column's width is one ``max`` over its cells and each row
is a handful of segments. Where that shortcut would print something else (a
cell that is not one plain line; a console narrower than the table, where rows
wrap together) it hands over to rich's table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderableType, RenderResult
from rich.measure import Measurement
from rich.padding import Padding
from rich.segment import Segment
from rich.style import Style, StyleType
from rich.table import Table
from rich.text import Text, TextType

from .experiments import ExpTable, format_metric, format_value, short, utc_iso

# NOTE: rich's Text strips some control characters, expands tabs and breaks
# lines where str.splitlines does (newlines, and the line and paragraph
# separators); a cell holding any of these is left to rich's own table.
_NOT_ONE_PLAIN_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_JUSTIFIED = ("left", "center", "right")
# NOTE: wide enough that no header is clamped while measuring its natural width.
_UNBOUNDED = 1 << 30


def _table_frame(table: ExpTable) -> Table:
    """The columns, title and caption of ``exp show``, no rows yet."""
    out = Table(title="experiments", caption=f"baseline: {short(table.baseline)}; times in UTC",
                show_header=True)
    for name in ("run", "started", "flow", "trigger", "data"):
        out.add_column(name, no_wrap=True)
    for key in table.config_keys:
        out.add_column(key, style="yellow")
    for metric in table.metric_names:
        out.add_column(metric, justify="right", style="cyan")
    out.add_column("model", justify="right")
    out.add_column("champion")
    return out


def _cells(table: ExpTable) -> Iterator[list[str]]:
    """Each row's cells as text, in the order of :func:`_table_frame`'s columns."""
    for row in table.rows:
        run = short(row.run_id) + (" (base)" if row.run_id == table.baseline else "")
        yield [run, utc_iso(row.started).replace("T", " ")[:16], row.flow, row.trigger,
               short(row.data, 12),
               *(format_value(row.config[k]) if k in row.config else "" for k in table.config_keys),
               *(format_metric(row.metrics.get(m)) for m in table.metric_names),
               f"v{row.model_version}" if row.model_version else "",
               "champion" if row.champion else ""]


def _add_rows(frame: Table, rows: Iterable[Sequence[str]]) -> Table:
    # NOTE: Text, not str: a value is printed as it is, never read as markup or emoji.
    for cells in rows:
        frame.add_row(*(Text(cell) for cell in cells))
    return frame


def render_table(table: ExpTable) -> Table:
    """The rows as a rich table, one table row per run; the baseline run is marked ``(base)``.

    Cells are plain text: a value is never read as rich markup.
    """
    return _add_rows(_table_frame(table), _cells(table))


def render_table_fast(table: ExpTable) -> RenderableType:
    """What :func:`render_table` prints, laid out in one pass (see :class:`OneLineTable`).

    Falls back to :func:`render_table` when a cell is more than one plain line.
    """
    frame, rows = _table_frame(table), list(_cells(table))
    if not is_one_plain_line(cell for cells in rows for cell in cells):
        return _add_rows(frame, rows)
    return OneLineTable(frame, rows)


def is_one_plain_line(texts: Iterable[str]) -> bool:
    """True when no text has a newline, a tab or another control character."""
    return _NOT_ONE_PLAIN_LINE.search("".join(texts)) is None


def _width(text: str) -> int:
    """Terminal cells of ``text``; one per character for printable ASCII."""
    return len(text) if text.isascii() else cell_len(text)


class OneLineTable:
    """A rich :class:`Table` of one-line plain-text cells, laid out in one pass.

    Prints what ``frame`` with each row added as :class:`~rich.text.Text` cells
    prints, style for style and segment for segment, except that neighbouring
    unstyled segments (borders, padding, cells of unstyled columns) come as one.
    Each column is as wide as its widest cell or header, padded, as rich sizes
    it; every row is then one line. When the console is narrower than that,
    rich would wrap cells: then (measuring and printing alike) this is rich's
    table, with the rows added to ``frame``.

    Args:
        frame: The columns, title and caption; no rows. Only what ``exp show``
            uses is supported: a box with edges, a header, no footer, cell padding
            on the left and right only, no row styles, no fixed widths, and
            columns justified left, center or right.
        rows: Each row's cells, one per column, each one line of plain text
            (see :func:`is_one_plain_line`).

    Raises:
        ValueError: ``frame`` uses something not supported, or a row does not fit it.
    """

    def __init__(self, frame: Table, rows: list[list[str]]) -> None:
        _check_supported(frame)
        if any(len(cells) != len(frame.columns) for cells in rows):
            raise ValueError(f"every row needs {len(frame.columns)} cells")
        if not is_one_plain_line(cell for cells in rows for cell in cells):
            raise ValueError("every cell must be one line of plain text")
        self.frame = frame
        self.rows = rows
        self._columns: list[tuple[str, ...]] = (list(zip(*rows, strict=True)) if rows
                                                else [() for _ in frame.columns])
        self._text_widths = [max(map(_width, cells), default=0) for cells in self._columns]
        self._min_text_widths: list[int] | None = None
        self._by_rows: Table | None = None

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        headers = self._header_measures(console, options)
        natural = sum(self._column_widths(headers)) + self._border_width
        if natural > options.max_width:
            return self._row_by_row().__rich_measure__(console, options)
        # NOTE: what rich's table measures: the sum of the columns' minimum
        # (longest word) and maximum (longest line) widths, plus the borders.
        return Measurement(sum(self._column_minimums(headers)) + self._border_width, natural)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths = self._column_widths(self._header_measures(console, options))
        table_width = sum(widths) + self._border_width
        if table_width > options.max_width:
            yield self._row_by_row()
            return
        frame = self.frame
        render_options = options.update(width=table_width, highlight=frame.highlight, height=None)
        if frame.title:
            yield from self._annotation(console, render_options, frame.title,
                                        Style.pick_first(frame.title_style, "table.title"),
                                        frame.title_justify)
        yield from self._lines(console, render_options, widths)
        if frame.caption:
            yield from self._annotation(console, render_options, frame.caption,
                                        Style.pick_first(frame.caption_style, "table.caption"),
                                        frame.caption_justify)

    def _row_by_row(self) -> Table:
        """rich's table of these rows, made once: for consoles too narrow for one line a row."""
        if self._by_rows is None:
            self._by_rows = _add_rows(self.frame, self.rows)
        return self._by_rows

    @property
    def _padding_width(self) -> int:
        _top, right, _bottom, left = self.frame.padding
        return left + right

    @property
    def _border_width(self) -> int:
        """The box's vertical lines: both edges and one between columns."""
        return len(self.frame.columns) + 1

    def _header_measures(self, console: Console, options: ConsoleOptions) -> list[Measurement]:
        # NOTE: a header is a str, which rich reads as markup (and emoji) with
        # the console's settings: rich measures it, and renders it below.
        unbounded = options.update_width(_UNBOUNDED)
        return [Measurement.get(console, unbounded, Padding(column.header, self.frame.padding))
                for column in self.frame.columns]

    def _column_widths(self, headers: list[Measurement]) -> list[int]:
        """Each column's width, padding included, borders not: rich's natural widths."""
        padding = self._padding_width
        return [max(header.maximum, text + padding) or 1
                for header, text in zip(headers, self._text_widths, strict=True)]

    def _column_minimums(self, headers: list[Measurement]) -> list[int]:
        """Each column's narrowest width (its longest word), padding included."""
        if self._min_text_widths is None:
            self._min_text_widths = [_min_text_width(cells) for cells in self._columns]
        if not self.rows:
            return [header.minimum for header in headers]
        padding = self._padding_width
        return [max(header.minimum, text + padding)
                for header, text in zip(headers, self._min_text_widths, strict=True)]

    def _annotation(self, console: Console, options: ConsoleOptions, text: TextType,
                    style: StyleType, justify: JustifyMethod) -> RenderResult:
        """The title or caption, as rich's table renders it."""
        renderable = (console.render_str(text, style=style, highlight=False) if isinstance(text, str)
                      else text)
        return console.render(renderable, options=options.update(justify=justify))

    def _lines(self, console: Console, options: ConsoleOptions, widths: list[int]) -> list[Segment]:
        """The box, the header and one line per row, as rich's ``Table._render`` yields them."""
        frame = self.frame
        assert frame.box is not None  # checked by _check_supported
        box = frame.box.substitute(options, safe=console.safe_box if frame.safe_box is None
                                   else frame.safe_box)
        border = console.get_style(frame.style or "") + console.get_style(frame.border_style or "")
        new_line = Segment.line()
        lines = [Segment(box.get_top(widths), border), new_line,
                 *self._header_line(console, options, widths,
                                    (box.head_left, box.head_vertical, box.head_right), border),
                 new_line, Segment(box.get_row(widths, "head", edge=True), border), new_line]
        _top, pad_right, _bottom, pad_left = frame.padding
        columns = [_BodyColumn.make(width - pad_left - pad_right, str(column.justify),
                                    console.get_style(column.style or ""), pad_left, pad_right)
                   for width, column in zip(widths, frame.columns, strict=True)]
        lines += _body_lines(self.rows, columns, (box.mid_left, box.mid_vertical, box.mid_right),
                             (box.foot_left, box.foot_vertical, box.foot_right), border)
        lines += (Segment(box.get_bottom(widths), border), new_line)
        return lines

    def _header_line(self, console: Console, options: ConsoleOptions, widths: list[int],
                     edges: tuple[str, str, str], border: Style) -> Iterator[Segment]:
        """The header row, each cell rendered by rich (a header may be markup)."""
        frame = self.frame
        left, divider, right = edges
        header_style = console.get_style(frame.header_style or "")
        yield Segment(left, border)
        for index, (width, column) in enumerate(zip(widths, frame.columns, strict=True)):
            if index:
                yield Segment(divider, border)
            cell_options = options.update(width=width, justify=column.justify, no_wrap=column.no_wrap,
                                          overflow=column.overflow, height=None,
                                          highlight=column.highlight)
            style = header_style + console.get_style(column.header_style)
            lines = console.render_lines(Padding(column.header, frame.padding), cell_options,
                                         style=style)
            yield from lines[0]
        yield Segment(right, border)


class _BodyColumn(NamedTuple):
    """How one column lays out its cells: text width, justification, style and padding."""

    width: int
    justify: str
    style: Style
    pad_left: str
    pad_right: str
    left_pad: Segment  # the padding, as segments in the column's style
    right_pad: Segment

    @classmethod
    def make(cls, width: int, justify: str, style: Style, pad_left: int, pad_right: int) -> _BodyColumn:
        return cls(width, justify, style, " " * pad_left, " " * pad_right,
                   Segment(" " * pad_left, style), Segment(" " * pad_right, style))


def _body_lines(rows: list[list[str]], columns: list[_BodyColumn], edges: tuple[str, str, str],
                last_edges: tuple[str, str, str], border: Style) -> list[Segment]:
    """The rows, one line each: cells justified as rich's Text does, padded and styled as its table does.

    NOTE: rich yields a cell as three segments (left padding, text, right
    padding), each in the column's style; kept so, since styles are rendered
    segment by segment (``export_text`` too). Neighbouring unstyled segments
    (borders, padding and cells of unstyled columns) are joined: the same text,
    and the same (no) style. The loop is the layout's hot path: a thousand
    runs of twenty columns are 20,000 cells.
    """
    unstyled = Style.null() if border else border
    new_line = Segment.line()
    out: list[Segment] = []
    append = out.append
    last = len(rows) - 1
    for index, cells in enumerate(rows):
        left, divider, right = last_edges if index == last else edges
        plain = ""  # the unstyled run so far
        edge = left
        for cell, (width, justify, style, pad_left, pad_right, left_pad, right_pad) in zip(
                cells, columns, strict=True):
            if border:
                if plain:
                    append(Segment(plain, unstyled))
                    plain = ""
                append(Segment(edge, border))
            else:
                plain += edge
            edge = divider
            # NOTE: rich strips trailing spaces before it centers or right-justifies.
            text = cell if justify == "left" else cell.rstrip()
            spare = width - (len(text) if text.isascii() else cell_len(text))
            if justify == "left":
                text += " " * spare
            elif justify == "right":
                text = " " * spare + text
            else:
                text = " " * (spare // 2) + text + " " * (spare - spare // 2)
            if style:
                if plain:
                    append(Segment(plain, unstyled))
                    plain = ""
                append(left_pad)
                append(Segment(text, style))
                append(right_pad)
            else:
                plain += pad_left + text + pad_right
        if border:
            if plain:
                append(Segment(plain, unstyled))
            append(Segment(right, border))
        else:
            append(Segment(plain + right, unstyled))
        append(new_line)
    return out


def _min_text_width(cells: Sequence[str]) -> int:
    """The longest word (or blank cell) of a column: the narrowest rich's Text can wrap it to."""
    words = " ".join(cells).split()
    blank = [_width(cell) for cell in cells if not cell.strip()]
    return max(max(map(_width, words), default=0), max(blank, default=0))


def _check_supported(frame: Table) -> None:
    """Raise ValueError if ``frame`` uses what :class:`OneLineTable` does not lay out."""
    unsupported = [name for name, used in (
        ("no box", frame.box is None), ("show_edge=False", not frame.show_edge),
        ("show_header=False", not frame.show_header), ("a footer", frame.show_footer),
        ("show_lines", frame.show_lines), ("leading", bool(frame.leading)),
        ("expand", frame.expand), ("min_width", frame.min_width is not None),
        ("vertical padding", frame.padding[0] or frame.padding[2]),
        ("pad_edge=False", not frame.pad_edge), ("collapse_padding", frame.collapse_padding),
        ("row styles", bool(frame.row_styles)), ("rows", bool(frame.rows)),
        ("fixed column widths", any(c.width is not None or c.min_width is not None
                                    or c.max_width is not None or c.ratio is not None
                                    for c in frame.columns)),
        ("justify other than left, center or right",
         any(c.justify not in _JUSTIFIED for c in frame.columns)),
    ) if used]
    if unsupported:
        raise ValueError(f"OneLineTable does not lay out: {', '.join(unsupported)}")
