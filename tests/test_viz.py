"""kvmem.viz: the offline HTML view every show() returns."""

from __future__ import annotations


def test_html_view_tells_a_script_how_to_see_it(tmp_path, monkeypatch, capsys):
    """Outside Jupyter a view's repr says how to look at it; open() saves a page and says where."""
    import webbrowser

    from kvmem.viz import HTMLView

    view = HTMLView("<p>hello</p>")
    assert "save(" in repr(view) and "open()" in repr(view) and "Jupyter" in repr(view)
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda uri: opened.append(uri) or False)
    path = view.open(tmp_path / "v.html")
    assert path.read_text(encoding="utf-8") == view.page() and opened == [path.as_uri()]
    assert str(path) in capsys.readouterr().out
