"""Where an index lives: the catalog URL and the FAISS files that go with it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    """$LOUPE_HOME when set, else the platform's user data dir (XDG_DATA_HOME/loupe on Linux)."""
    env = os.environ.get("LOUPE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("loupe", appauthor=False))


@dataclass(frozen=True)
class Location:
    """A catalog URL and the folder + file prefix of the vector files bound to it."""

    url: str
    vector_dir: Path
    prefix: str

    def vector_file(self, kind: str) -> Path:
        """The FAISS file holding vectors of `kind` ('image' or 'text')."""
        return self.vector_dir / f"{self.prefix}{kind}s.faiss"

    def ondisk_dir(self, kind: str) -> Path:
        """The folder of the on-disk IVF index of `kind` (`loupe build-index`), beside its FAISS file."""
        return self.vector_dir / f"{self.prefix}{kind}s.ondisk"

    def own_paths(self) -> list[Path]:
        """Folders that hold the index's own files, which indexing must never walk into."""
        return [self.vector_dir]


def resolve_location(home: str | Path | None = None, db: str | None = None) -> Location:
    """Turn --home/--db (or their env vars) into concrete paths.

    SQLite (the default) keeps `catalog.db` and the FAISS files together in the home folder.
    A SQLite URL elsewhere keeps its FAISS files beside the database file; any other
    SQLAlchemy URL (PostgreSQL...) keeps them in the home folder under a name derived from the URL.
    """
    home_dir = Path(home).expanduser() if home else default_home()
    db = db or os.environ.get("LOUPE_DB") or None
    if not db:
        return Location(url=f"sqlite:///{(home_dir / 'catalog.db').resolve()}", vector_dir=home_dir.resolve(), prefix="")
    if db.startswith("sqlite:///") and db != "sqlite:///:memory:":
        db_file = Path(db[len("sqlite:///") :].split("?", 1)[0]).expanduser().resolve()
        return Location(url=db, vector_dir=db_file.parent, prefix=f"{db_file.stem}.")
    tag = hashlib.sha1(db.encode()).hexdigest()[:12]
    return Location(url=db, vector_dir=home_dir.resolve(), prefix=f"db-{tag}.")


def redact_url(url: str) -> str:
    """A database URL without its password (`postgresql://user:***@host/db`): shown, never the secret."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:***@{hostport}" if parts.password is not None else f"{user}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))
