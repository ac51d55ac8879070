"""Data the way a user gets it: a file the data folder lacks is downloaded once from its public
source into kvmem's cache, checked against its pin, atomically; offline, a clear error. The
downloads go to a local HTTP server (`$KVMEM_DATA_URL`) serving a copy of the data layout."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from conftest import forbid_network, shared_data
from kvmem.data import load_known_facts, read_corpus
from kvmem.datafiles import data_path
from kvmem.downloads import SOURCES, URL_ENV, cache_path, source_url
from kvmem.errors import DataChecksumError, MissingDataError

KNOWN = "known_1000.json"


class _Server:
    """http.server on a free local port, serving `root`, counting GET requests per path."""

    def __init__(self, root: Path):
        hits = self.hits = {}

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                hits[self.path] = hits.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args):  # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user's set-up: no data folder, an empty kvmem cache, no network beyond this machine."""
    monkeypatch.delenv("KVMEM_DATA", raising=False)
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    forbid_network(monkeypatch)
    return tmp_path


def test_the_pins_are_the_project_copies():
    """The pinned hashes and sizes are those of the shared data (byte-identical to the sources,
    docs/data.md); a changed pin or file shows here."""
    for name, source in SOURCES.items():
        if source.sha256 is None:
            assert source.n_records and name == "counterfact/counterfact.json"
            continue
        path = shared_data(*name.split("/"))
        assert path.stat().st_size == source.size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == source.sha256
    assert source_url(SOURCES[KNOWN]) == "https://rome.baulab.info/data/dsets/known_1000.json"


def test_download_once_then_from_the_cache(user, monkeypatch):
    served = shared_data(KNOWN).parent
    with _Server(served) as server:
        monkeypatch.setenv(URL_ENV, server.url)
        facts = load_known_facts(KNOWN)
        assert len(facts) == 1209 and facts[0].target_true == "Antarctica"
        cached = cache_path(KNOWN)
        assert data_path(KNOWN) == cached and cached.read_bytes() == (served / KNOWN).read_bytes()
        assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temporary left
        assert server.hits == {f"/{KNOWN}": 1}
        load_known_facts(KNOWN, limit=3)
    # the server is gone: the cache answers, without the network
    assert len(load_known_facts(KNOWN, limit=3)) == 3


def test_a_wrong_file_is_refused_and_not_kept(user, monkeypatch):
    root = user / "mirror"
    root.mkdir()
    records = json.loads(shared_data(KNOWN).read_text())
    records[0]["attribute"] = "Atlantis"
    (root / KNOWN).write_text(json.dumps(records))
    with _Server(root) as server:
        monkeypatch.setenv(URL_ENV, server.url)
        with pytest.raises(DataChecksumError, match="not the expected file") as e:
            load_known_facts(KNOWN)
        assert f"{server.url}/{KNOWN}" in str(e.value) and "sha256" in str(e.value)
    folder = cache_path(KNOWN).parent
    assert not cache_path(KNOWN).exists() and not any(folder.iterdir())


def test_offline_says_what_to_set_and_which_url(user, monkeypatch):
    # a port nobody listens on: the connection is refused at once
    with _Server(user) as server:
        url = server.url
    monkeypatch.setenv(URL_ENV, url)
    with pytest.raises(MissingDataError) as e:
        load_known_facts(KNOWN)
    msg = str(e.value)
    assert msg.startswith(f"No such facts file: {KNOWN}") and "KVMEM_DATA" in msg and f"{url}/{KNOWN}" in msg
    assert not cache_path(KNOWN).exists()
    # without the override it names the canonical source (the guard refuses the connection)
    monkeypatch.delenv(URL_ENV)
    with pytest.raises(MissingDataError, match="https://rome.baulab.info/data/dsets/known_1000.json"):
        load_known_facts(KNOWN)
    # a file with no download says so as before
    with pytest.raises(MissingDataError, match="KVMEM_DATA is not set"):
        list(read_corpus("corpus/brown.txt"))


def test_the_data_folder_comes_first(user, monkeypatch):
    folder = user / "data"
    folder.mkdir()
    (folder / KNOWN).write_text(json.dumps(json.loads(shared_data(KNOWN).read_text())[:2]))
    monkeypatch.setenv("KVMEM_DATA", str(folder))
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9")  # never asked
    assert data_path(KNOWN) == folder / KNOWN and len(load_known_facts(KNOWN)) == 2


def test_an_unwritable_cache_says_so_not_offline(user, monkeypatch):
    # the cache folder cannot be made (a file is in the way): the error names KVMEM_CACHE, and does
    # not send the user looking for a network problem
    (user / "blocker").write_text("a file, not a folder")
    monkeypatch.setenv("KVMEM_CACHE", str(user / "blocker" / "cache"))
    with _Server(shared_data(KNOWN).parent) as server:
        monkeypatch.setenv(URL_ENV, server.url)
        with pytest.raises(MissingDataError, match="KVMEM_CACHE to a writable folder") as e:
            load_known_facts(KNOWN)
        assert "Could not download" not in str(e.value) and server.hits == {}
