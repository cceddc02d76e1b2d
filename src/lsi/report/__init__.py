"""Report: renders typed records (locate results, steer selections, benchmark runs), one module per output format:
:mod:`lsi.report.text` (plain-text tables) and :mod:`lsi.report.plot` (matplotlib figures)."""
