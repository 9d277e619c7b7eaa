"""The SQLite schema and its migrations.

A new gallery is created by the version-1 DDL followed by every migration, so
the migration path is exercised on every gallery ever made. To change the
schema append one function ``(connection) -> None`` to ``MIGRATIONS``; it runs
inside the transaction that also records the new version.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable

from gallery.errors import SchemaTooNew

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    gallery_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id      TEXT NOT NULL UNIQUE,
    subject_id    TEXT NOT NULL,
    syndrome_id   TEXT NOT NULL,
    syndrome_name TEXT NOT NULL,
    omim_id       TEXT,
    genes         TEXT NOT NULL DEFAULT '[]',
    source        TEXT NOT NULL DEFAULT '',
    encoder_id    TEXT NOT NULL,
    view_scheme   TEXT NOT NULL,
    view_dims     TEXT NOT NULL,
    embedding     BLOB NOT NULL,
    crop_png      BLOB,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_subject ON records(subject_id);
CREATE INDEX IF NOT EXISTS records_syndrome ON records(syndrome_id);
"""


def content_hash(
    image_id: str,
    subject_id: str,
    syndrome_id: str,
    syndrome_name: str,
    omim_id: str | None,
    genes: list[str] | tuple[str, ...],
    encoder_id: str,
    view_scheme: str,
    embedding: bytes,
) -> str:
    """Identity of a record's content: labels and embedding, not source, crop or timestamps."""
    labels = json.dumps(
        [image_id, subject_id, syndrome_id, syndrome_name, omim_id, list(genes), encoder_id, view_scheme],
        ensure_ascii=True,
    )
    return hashlib.sha256(labels.encode() + b"\0" + embedding).hexdigest()


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """Adds the content hash (idempotent re-imports) and free-form provenance."""
    conn.execute("ALTER TABLE records ADD COLUMN content_hash TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE records ADD COLUMN provenance TEXT NOT NULL DEFAULT '{}'")
    rows = conn.execute(
        "SELECT gallery_id, image_id, subject_id, syndrome_id, syndrome_name, omim_id, genes,"
        " encoder_id, view_scheme, embedding FROM records"
    ).fetchall()
    for row in rows:
        digest = content_hash(*row[1:6], json.loads(row[6]), row[7], row[8], row[9])
        conn.execute("UPDATE records SET content_hash = ? WHERE gallery_id = ?", (digest, row[0]))


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1_to_v2]
SCHEMA_VERSION = 1 + len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT value FROM meta WHERE key = 'schema_version'"
    ).fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> int:
    """Create or upgrade the schema to SCHEMA_VERSION; returns the version found before."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA_V1.split(";"):
            if statement.strip():
                conn.execute(statement)
        found = schema_version(conn)
        if found == 0:
            conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
            conn.execute("INSERT INTO meta VALUES ('gallery_version', '0')")
            current = 1
        else:
            current = found
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"gallery schema version {current} is newer than this PhenoLens ({SCHEMA_VERSION})"
            )
        while current < SCHEMA_VERSION:
            MIGRATIONS[current - 1](conn)
            current += 1
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(current),)
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found
