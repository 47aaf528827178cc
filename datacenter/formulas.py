"""Cells that a spreadsheet program would run as formulas (CSV injection).

An export puts one ``'`` in front of a cell that begins with ``=``, ``+``, ``-``, ``@``, a tab
or a carriage return, or with ``'`` followed by one of them, so that a spreadsheet shows it as
text; processing takes one such ``'`` away again, so that an export processed back changes
nothing.
"""

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _escaped(value: str) -> bool:
    """Whether `value` starts like a formula, or like a neutralised one."""
    rest = value[1:] if value.startswith("'") else value
    return rest.startswith(FORMULA_STARTS)


def neutralised(value: str) -> str:
    """`value` as an export writes it: behind one ``'`` when a spreadsheet could run it."""
    return f"'{value}" if _escaped(value) else value


def restored(value: str) -> str:
    """The value a cell that an export neutralised stood for: one leading ``'`` less."""
    return value[1:] if value.startswith("'") and _escaped(value[1:]) else value
