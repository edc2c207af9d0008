"""Reports: report.md (figures as PNG files) and a self-contained report.html from results.json."""
from .render import build_blocks, render_html, render_markdown, write_report

__all__ = ["build_blocks", "render_html", "render_markdown", "write_report"]
