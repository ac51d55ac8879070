"""`HTMLView`: the one offline HTML type every kvmem `show()` returns.

circuitsvis's own `RenderedHTML` gives CDN-loading HTML from `str()` and probes the network in
`_repr_html_`; a view built here always holds the self-contained source (circuitsvis's
`local_src`, its JavaScript bundle inlined, or plain HTML), so it renders in a notebook without
network and saves as a page that opens anywhere.
"""

from __future__ import annotations

from pathlib import Path

from kvmem.errors import InvalidArgumentError


class HTMLView:
    """Self-contained HTML: renders in Jupyter offline, `str()` and `.html` give the source,
    `page()` / `save(path)` give it as a complete page."""

    def __init__(self, html: str):
        if not isinstance(html, str):
            raise InvalidArgumentError(f"HTMLView holds an HTML string, got {type(html).__name__}.")
        self.html = html

    @classmethod
    def from_circuitsvis(cls, rendered, heading: str = "") -> "HTMLView":
        """A circuitsvis result (`RenderedHTML`) through its inlined source, never the CDN one;
        `heading` (HTML) goes above it."""
        src = getattr(rendered, "local_src", None)
        if not isinstance(src, str):
            raise InvalidArgumentError(
                f"Expected a circuitsvis RenderedHTML (with local_src), got {type(rendered).__name__}."
            )
        return cls(heading + src)

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        # outside Jupyter (a script, a terminal) this is what a user sees: say how to look at it
        return (f"HTMLView({len(self.html.encode('utf-8')) / 1024:.0f} KB of self-contained HTML: it displays in "
                "Jupyter; elsewhere .save('view.html') writes a page, .open() shows it in a browser)")

    def __html__(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def page(self) -> str:
        """The view as a complete standalone HTML page (what `save` writes)."""
        return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n{self.html}\n</body></html>\n'

    def save(self, path: str | Path) -> Path:
        """Write a standalone page (UTF-8) and return its path."""
        path = Path(path)
        path.write_text(self.page(), encoding="utf-8")
        return path

    def open(self, path: str | Path | None = None) -> Path:
        """Save the page (to `path`, else a new temporary file), open it in the default browser
        where there is one, print where it is, and return the path."""
        import tempfile
        import webbrowser

        if path is None:
            with tempfile.NamedTemporaryFile("w", suffix=".html", prefix="kvmem-view-", delete=False) as fh:
                path = fh.name
        path = self.save(path).resolve()
        opened = webbrowser.open(path.as_uri())
        print(f"kvmem view written to {path}" + ("" if opened else " (no browser here: open that file)"))
        return path


__all__ = ["HTMLView"]
