"""Text from events (subjects, namespaces, GPU models, meter names) is tenant-controlled: it is
neutralised before it reaches a spreadsheet or a terminal. (HTML output escapes it instead.)"""

from __future__ import annotations

import unicodedata

# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets (OWASP's
# CSV-injection list); a leading quote makes it text and is not shown.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def terminal_text(text: str) -> str:
    """Control and format characters (ESC sequences, bidi overrides) shown as escapes, not obeyed."""
    if text.isprintable():
        return text
    return "".join(
        char if unicodedata.category(char) not in {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"} else _escaped(char)
        for char in text
    )


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
