//! Durable state in SQLite (`<state dir>/state.db`): every entry with its owners, expiry and
//! comment, the settings the kernel must get back after a reboot, and an audit log. The kernel maps
//! are a cache of this.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension as _, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::{cidr::Prefix, maps::List};

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Creating the state dir.
    #[error("state dir {path}: {source}")]
    Dir {
        /// The dir.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// SQLite failed.
    #[error("state database {path}: {source}")]
    Db {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A stored value did not parse (the file was edited by hand or is corrupt).
    #[error("state database {path}: bad stored value {value:?}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
    },
}

/// Owner name of entries added from the command line.
pub const OWNER_CLI: &str = "cli";

/// Wall-clock milliseconds since the epoch.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One owner's claim on an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Claim {
    /// Who added it (`cli`, a feed name, `proxy`, ...).
    pub owner: String,
    /// Wall-clock expiry in ms since the epoch; `None` = permanent.
    pub expires_at_ms: Option<i64>,
    /// Free text.
    pub comment: Option<String>,
    /// When it was added (ms since the epoch).
    pub created_at_ms: i64,
}

/// An entry with all its claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredEntry {
    /// Which list.
    pub list: List,
    /// The prefix.
    pub prefix: Prefix,
    /// Every owner's claim.
    pub claims: Vec<Claim>,
}

impl StoredEntry {
    /// The expiry the kernel gets: the latest of the owners' (permanent wins).
    pub fn effective_expiry_ms(&self) -> Option<i64> {
        effective(self.claims.iter().map(|c| c.expires_at_ms))
    }
}

fn effective(expiries: impl Iterator<Item = Option<i64>>) -> Option<i64> {
    let mut latest = Some(i64::MIN);
    for e in expiries {
        latest = match (latest, e) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) => Some(a.max(b)),
        };
    }
    latest
}

/// The kernel-side rate limit and mode, kept so they survive a reboot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Monitor mode: count would-be drops, drop nothing.
    pub monitor: bool,
    /// The rate limit, when on.
    pub ratelimit: Option<RateLimit>,
}

/// Rate limit settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Packets per second per source.
    pub pps: u64,
    /// Packets a source may send at once.
    pub burst: u64,
    /// Destination ports in scope (empty = all traffic).
    pub ports: Vec<u16>,
    /// IPv6 sources are keyed by this prefix length.
    pub v6_prefix: u8,
    /// Only TCP SYNs count.
    pub syn_only: bool,
}

/// The state database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    list        TEXT    NOT NULL CHECK (list IN ('block', 'allow')),
    prefix      TEXT    NOT NULL,
    owner       TEXT    NOT NULL,
    expires_at  INTEGER,            -- ms since the epoch; NULL = permanent
    comment     TEXT,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (list, prefix, owner)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_owner ON entries (owner);
-- Every change purges expired claims first; this keeps that cheap on a big table.
CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,       -- ms since the epoch
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    detail  TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS interfaces (
    name         TEXT PRIMARY KEY,
    mode         TEXT    NOT NULL,
    ifindex      INTEGER NOT NULL,  -- a different ifindex now means the interface was recreated
    attached_at  INTEGER NOT NULL
);
-- Where each source left off (a feed's ETag, the CrowdSec stream position), committed in the same
-- transaction as the entries it produced, so a restart never half-applies a refresh.
CREATE TABLE IF NOT EXISTS cursors (
    key         TEXT PRIMARY KEY,
    value       TEXT    NOT NULL,
    updated_at  INTEGER NOT NULL
);
";

/// An audit record.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    /// ms since the epoch.
    pub at_ms: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// Details.
    pub detail: String,
}

impl Store {
    /// Open (creating if needed) `<dir>/state.db`. The dir is made 0700 and the file 0600: only
    /// root reads or changes the filter's state.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir_err = |source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
        let path = dir.join("state.db");
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(dir_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(Self { conn, path })
    }

    /// Run `f` in one write transaction (IMMEDIATE, so concurrent writers queue instead of failing).
    pub fn write<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let mut tx = Tx {
            tx,
            path: path.clone(),
        };
        let out = f(&mut tx)?;
        tx.tx.commit().map_err(db)?;
        Ok(out)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read queries on the database (outside any write transaction).
    pub fn read(&self) -> Reader<'_> {
        Reader {
            conn: &self.conn,
            path: &self.path,
        }
    }

    /// Every entry with its claims, sorted by list then prefix.
    pub fn entries(&self, list: Option<List>) -> Result<Vec<StoredEntry>, StoreError> {
        self.read().entries(list)
    }

    /// Entries still live at `now_ms` with their effective expiry.
    pub fn live(&self, now_ms: i64) -> Result<Vec<(List, Prefix, Option<i64>)>, StoreError> {
        self.read().live(now_ms)
    }

    /// Kernel settings (defaults when never set).
    pub fn settings(&self) -> Result<Settings, StoreError> {
        self.read().settings()
    }

    /// Interfaces recorded as attached: name, mode, ifindex at attach time.
    pub fn interfaces(&self) -> Result<Vec<(String, String, u32)>, StoreError> {
        self.read().interfaces()
    }

    /// The most recent audit records, newest last.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.read().audit(limit)
    }
}

/// Read queries, on the database or inside a write transaction.
pub struct Reader<'a> {
    conn: &'a Connection,
    path: &'a Path,
}

impl Reader<'_> {
    fn db(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Db {
            path: self.path.to_owned(),
            source,
        }
    }

    /// Every entry with its claims, sorted by list then prefix.
    pub fn entries(&self, list: Option<List>) -> Result<Vec<StoredEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT list, prefix, owner, expires_at, comment, created_at FROM entries
                 WHERE ?1 IS NULL OR list = ?1 ORDER BY list, prefix, owner",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![list.map(List::as_str)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    Claim {
                        owner: r.get(2)?,
                        expires_at_ms: r.get(3)?,
                        comment: r.get(4)?,
                        created_at_ms: r.get(5)?,
                    },
                ))
            })
            .map_err(self.db())?;
        let mut out: Vec<StoredEntry> = Vec::new();
        for row in rows {
            let (list, prefix, claim) = row.map_err(self.db())?;
            let list = parse_list(&list).ok_or_else(|| self.corrupt(&list))?;
            let prefix: Prefix = prefix.parse().map_err(|_| self.corrupt(&prefix))?;
            match out.last_mut() {
                Some(e) if e.list == list && e.prefix == prefix => e.claims.push(claim),
                _ => out.push(StoredEntry {
                    list,
                    prefix,
                    claims: vec![claim],
                }),
            }
        }
        out.sort_by_key(|e| (e.list, e.prefix));
        Ok(out)
    }

    /// The prefixes `owner` has a claim on in `list`.
    pub fn owned(&self, list: List, owner: &str) -> Result<Vec<Prefix>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT prefix FROM entries WHERE list = ?1 AND owner = ?2")
            .map_err(self.db())?;
        let rows: Vec<String> = stmt
            .query_map(params![list.as_str(), owner], |r| r.get(0))
            .map_err(self.db())?
            .collect::<Result<_, _>>()
            .map_err(self.db())?;
        rows.iter()
            .map(|p| p.parse().map_err(|_| self.corrupt(p)))
            .collect()
    }

    /// `owner`'s claims in `list` with their expiry (ms since the epoch; `None` = permanent).
    pub fn owned_expiry(
        &self,
        list: List,
        owner: &str,
    ) -> Result<Vec<(Prefix, Option<i64>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT prefix, expires_at FROM entries WHERE list = ?1 AND owner = ?2")
            .map_err(self.db())?;
        let rows: Vec<(String, Option<i64>)> = stmt
            .query_map(params![list.as_str(), owner], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(self.db())?
            .collect::<Result<_, _>>()
            .map_err(self.db())?;
        rows.into_iter()
            .map(|(p, e)| Ok((p.parse().map_err(|_| self.corrupt(&p))?, e)))
            .collect()
    }

    /// Every owner that holds at least one claim, with its claim count.
    pub fn owners(&self) -> Result<Vec<(String, usize)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT owner, COUNT(*) FROM entries GROUP BY owner ORDER BY owner")
            .map_err(self.db())?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))
            .map_err(self.db())?
            .collect::<Result<_, _>>()
            .map_err(self.db())
    }

    /// A stored cursor (see [`Tx::set_cursor`]).
    pub fn cursor(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT value FROM cursors WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())
    }

    /// Entries still live at `now_ms` with their effective expiry, for restoring the kernel maps.
    pub fn live(&self, now_ms: i64) -> Result<Vec<(List, Prefix, Option<i64>)>, StoreError> {
        Ok(self
            .entries(None)?
            .into_iter()
            .filter_map(|e| {
                let live: Vec<_> = e
                    .claims
                    .iter()
                    .filter(|c| c.expires_at_ms.is_none_or(|t| t > now_ms))
                    .map(|c| c.expires_at_ms)
                    .collect();
                (!live.is_empty()).then(|| (e.list, e.prefix, effective(live.into_iter())))
            })
            .collect())
    }

    /// Kernel settings (defaults when never set).
    pub fn settings(&self) -> Result<Settings, StoreError> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM settings WHERE key = 'kernel'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.db())?;
        match v {
            None => Ok(Settings::default()),
            Some(v) => serde_json::from_str(&v).map_err(|_| self.corrupt(&v)),
        }
    }

    /// Interfaces recorded as attached: name, mode, ifindex at attach time.
    pub fn interfaces(&self) -> Result<Vec<(String, String, u32)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, mode, ifindex FROM interfaces ORDER BY name")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    /// The most recent audit records, newest last.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT at, actor, action, detail FROM
                   (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![limit as i64], |r| {
                Ok(AuditRecord {
                    at_ms: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    detail: r.get(3)?,
                })
            })
            .map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    fn corrupt(&self, value: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.to_owned(),
            value: value.to_owned(),
        }
    }
}

fn parse_list(s: &str) -> Option<List> {
    match s {
        "block" => Some(List::Block),
        "allow" => Some(List::Allow),
        _ => None,
    }
}

/// A write transaction.
pub struct Tx<'a> {
    tx: Transaction<'a>,
    path: PathBuf,
}

impl Tx<'_> {
    /// Read queries inside this transaction.
    pub fn read(&self) -> Reader<'_> {
        Reader {
            conn: &self.tx,
            path: &self.path,
        }
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Add or refresh `owner`'s claim on an entry; returns the entry's new effective expiry.
    pub fn claim(
        &mut self,
        list: List,
        prefix: &Prefix,
        owner: &str,
        expires_at_ms: Option<i64>,
        comment: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO entries (list, prefix, owner, expires_at, comment, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (list, prefix, owner) DO UPDATE SET
                   expires_at = excluded.expires_at,
                   comment = COALESCE(excluded.comment, entries.comment)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    list.as_str(),
                    prefix.to_string(),
                    owner,
                    expires_at_ms,
                    comment,
                    unix_ms()
                ])
            })
            .map_err(self.db())?;
        Ok(self.effective(list, prefix)?.flatten())
    }

    /// Drop `owner`'s claim. Returns `None` when no owner is left (the entry leaves the kernel),
    /// otherwise the remaining owners' effective expiry.
    pub fn release(
        &mut self,
        list: List,
        prefix: &Prefix,
        owner: &str,
    ) -> Result<Option<Option<i64>>, StoreError> {
        self.tx
            .prepare_cached("DELETE FROM entries WHERE list = ?1 AND prefix = ?2 AND owner = ?3")
            .and_then(|mut s| s.execute(params![list.as_str(), prefix.to_string(), owner]))
            .map_err(self.db())?;
        self.effective(list, prefix)
    }

    /// Whether `owner` has a claim on the entry.
    pub fn has_claim(
        &mut self,
        list: List,
        prefix: &Prefix,
        owner: &str,
    ) -> Result<bool, StoreError> {
        self.tx
            .prepare_cached("SELECT 1 FROM entries WHERE list = ?1 AND prefix = ?2 AND owner = ?3")
            .and_then(|mut s| s.exists(params![list.as_str(), prefix.to_string(), owner]))
            .map_err(self.db())
    }

    /// `None` when nobody owns the entry, else `Some(effective expiry)`.
    pub fn effective(
        &mut self,
        list: List,
        prefix: &Prefix,
    ) -> Result<Option<Option<i64>>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT expires_at FROM entries WHERE list = ?1 AND prefix = ?2")
            .map_err(self.db())?;
        let exp: Vec<Option<i64>> = stmt
            .query_map(params![list.as_str(), prefix.to_string()], |r| r.get(0))
            .map_err(self.db())?
            .collect::<Result<_, _>>()
            .map_err(self.db())?;
        Ok((!exp.is_empty()).then(|| effective(exp.into_iter())))
    }

    /// Replace the kernel settings.
    pub fn set_settings(&mut self, s: &Settings) -> Result<(), StoreError> {
        let json = serde_json::to_string(s).expect("settings serialize");
        self.tx
            .execute(
                "INSERT INTO settings (key, value) VALUES ('kernel', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![json],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Record an interface as attached.
    pub fn set_interface(
        &mut self,
        name: &str,
        mode: &str,
        ifindex: u32,
    ) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO interfaces (name, mode, ifindex, attached_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET mode = excluded.mode, ifindex = excluded.ifindex",
                params![name, mode, ifindex, unix_ms()],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Forget an interface (`None` = all).
    pub fn remove_interface(&mut self, name: Option<&str>) -> Result<(), StoreError> {
        self.tx
            .execute(
                "DELETE FROM interfaces WHERE ?1 IS NULL OR name = ?1",
                params![name],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Delete claims that expired at or before `now_ms`; returns the entries they belonged to, so
    /// the caller can bring the kernel in line.
    pub fn purge_expired(&mut self, now_ms: i64) -> Result<Vec<(List, Prefix)>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "DELETE FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?1 RETURNING list, prefix",
            )
            .map_err(self.db())?;
        let rows: Vec<(String, String)> = stmt
            .query_map(params![now_ms], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.db())?
            .collect::<Result<_, _>>()
            .map_err(self.db())?;
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (list, prefix) in rows {
            let corrupt = || StoreError::Corrupt {
                path: self.path.clone(),
                value: format!("{list} {prefix}"),
            };
            let entry = (
                parse_list(&list).ok_or_else(corrupt)?,
                prefix.parse().map_err(|_| corrupt())?,
            );
            if seen.insert(entry) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Store where a source left off; `None` forgets it.
    pub fn set_cursor(&mut self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.tx.execute(
                "INSERT INTO cursors (key, value, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                params![key, v, unix_ms()],
            ),
            None => self
                .tx
                .execute("DELETE FROM cursors WHERE key = ?1", params![key]),
        }
        .map_err(self.db())?;
        Ok(())
    }

    /// Append to the audit log.
    pub fn audit(&mut self, actor: &str, action: &str, detail: &str) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("INSERT INTO audit (at, actor, action, detail) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut s| s.execute(params![unix_ms(), actor, action, detail]))
            .map_err(self.db())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn temp() -> (tempdir::Dir, Store) {
        let dir = tempdir::Dir::new();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    /// Minimal self-deleting temp dir (keeps the dependency list short).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("apifilter-store-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn entry_leaves_only_with_its_last_owner() {
        let (_d, mut s) = temp();
        let e = p("198.18.0.0/24");
        s.write(|tx| {
            assert_eq!(
                tx.claim(List::Block, &e, "cli", Some(1_000), Some("x"))?,
                Some(1_000)
            );
            // A permanent claim from another owner wins over the expiry.
            assert_eq!(tx.claim(List::Block, &e, "feed", None, None)?, None);
            assert_eq!(tx.release(List::Block, &e, "feed")?, Some(Some(1_000)));
            assert_eq!(tx.release(List::Block, &e, "cli")?, None);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert!(s.entries(None).unwrap().is_empty());
    }

    #[test]
    fn latest_expiry_wins_and_live_skips_expired() {
        let (_d, mut s) = temp();
        s.write(|tx| {
            tx.claim(List::Block, &p("198.18.0.1"), "a", Some(5_000), None)?;
            tx.claim(List::Block, &p("198.18.0.1"), "b", Some(9_000), None)?;
            tx.claim(List::Block, &p("198.18.0.2"), "a", Some(2_000), None)?;
            tx.claim(
                List::Allow,
                &p("198.18.1.0/24"),
                "cli",
                None,
                Some("office"),
            )?;
            Ok::<_, StoreError>(())
        })
        .unwrap();
        let live = s.live(3_000).unwrap();
        assert_eq!(
            live,
            vec![
                (List::Block, p("198.18.0.1"), Some(9_000)),
                (List::Allow, p("198.18.1.0/24"), None)
            ]
        );
        let purged = s.write(|tx| tx.purge_expired(3_000)).unwrap();
        assert_eq!(purged, vec![(List::Block, p("198.18.0.2"))]);
        assert_eq!(s.entries(None).unwrap().len(), 2);
    }

    #[test]
    fn settings_and_audit_round_trip_and_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let (d, mut s) = temp();
        let want = Settings {
            monitor: true,
            ratelimit: Some(RateLimit {
                pps: 10,
                burst: 5,
                ports: vec![443],
                v6_prefix: 64,
                syn_only: false,
            }),
        };
        s.write(|tx| {
            tx.set_settings(&want)?;
            tx.audit("cli", "mode", "monitor")
        })
        .unwrap();
        assert_eq!(s.settings().unwrap(), want);
        let audit = s.audit(10).unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].action, "mode");
        let mode = std::fs::metadata(d.path().join("state.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
