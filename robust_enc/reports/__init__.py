"""The report: read results files and run folders (``inputs``), build the Table 3 view, the leaderboard and the GBR
correlation (``tables``), render them (``render``), draw the plots (``plots``) and write them with an ``index.md``
(``report``).

Imports of pandas / matplotlib are deferred to the functions: the CLI imports this package to build its parser.
"""

from robust_enc.reports.inputs import load_inputs, merge_rows
from robust_enc.reports.report import (
    DEFAULT_FORMATS,
    TABLES,
    Report,
    build_report,
    check_formats,
    check_out_dir,
    make_report,
    write_report,
)

__all__ = ["DEFAULT_FORMATS", "TABLES", "Report", "build_report", "check_formats", "check_out_dir", "load_inputs",
           "make_report", "merge_rows", "write_report"]
