"""Moved to `nso_hf.flatness.report`; this module keeps the 0.1 import path."""

from nso_hf.flatness.report import REPORT_KEYS, ReportSettings, flatness_report, grid

__all__ = ["REPORT_KEYS", "ReportSettings", "flatness_report", "grid"]
