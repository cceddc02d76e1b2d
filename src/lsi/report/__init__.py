"""Report: renders typed records (locate results, steer selections, benchmark runs, run directories), one module
per output format: :mod:`lsi.report.text` (plain-text tables), :mod:`lsi.report.plot` (matplotlib figures) and
:mod:`lsi.report.html` (one self-contained offline HTML page per run directory, or comparing several; opened in
headless Chromium by :mod:`lsi.report.browser`)."""
