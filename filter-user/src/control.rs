//! Changing what the filter blocks and allows. Every owner of entries (the CLI, a feed, the
//! CrowdSec bouncer, the proxy's bans) goes through here, so SQLite and the kernel maps move
//! together: a transaction commits only after the kernel accepted every change in it, and a kernel
//! failure (a full table) or an interruption puts back what was already pushed.

use std::{
    collections::HashMap,
    io::IsTerminal as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::{
    cidr::Prefix,
    clock,
    loader::{LoaderError, PinDir},
    maps::{List, Maps, MapsError},
    store::{Store, StoreError, Tx, unix_ms},
};

/// Why a change did not happen. Nothing was changed in any case.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The kernel refused an update (e.g. a full table).
    #[error(transparent)]
    Kernel(#[from] MapsError),
    /// Opening the pinned maps failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// SIGINT or SIGTERM arrived while the change was in progress.
    #[error("interrupted; nothing was changed")]
    Interrupted,
}

/// Kernel expiry (boot-time ns) for a wall-clock expiry; `None` (permanent) is 0.
pub fn kernel_expiry(expires_at_ms: Option<i64>) -> u64 {
    match expires_at_ms {
        None => 0,
        Some(at) => clock::boot_ns_at_unix_ms(at).max(1),
    }
}

/// Make the kernel hold an entry's effective state (`None` = no owner left: remove it).
pub fn push(
    maps: &Maps,
    list: List,
    prefix: &Prefix,
    effective: Option<Option<i64>>,
) -> Result<(), MapsError> {
    match effective {
        None => maps.remove(list, prefix),
        Some(exp) => maps.upsert(list, prefix, kernel_expiry(exp)),
    }
}

/// One change to apply with [`apply`].
pub struct Change<'a> {
    /// The list it changes.
    pub list: List,
    /// Who makes it, for the audit log.
    pub actor: &'a str,
    /// Audit action (`block`, `import`, `feed`, ...).
    pub action: &'a str,
    /// Audit detail.
    pub detail: String,
}

/// Apply claims or releases in one transaction, pushing each entry's new state to the kernel (when
/// it is loaded). `plan` lists the prefixes to change, read inside the transaction; `change`
/// changes one and returns its new effective state. On any failure, or when `interrupted` says so,
/// the kernel entries already pushed go back to their previous state and the transaction rolls
/// back. Returns how many prefixes the plan held.
pub fn apply(
    maps: Option<&Maps>,
    store: &mut Store,
    change: Change<'_>,
    plan: impl FnOnce(&mut Tx<'_>) -> Result<Vec<Prefix>, StoreError>,
    mut each: impl FnMut(&mut Tx<'_>, &Prefix) -> Result<Option<Option<i64>>, StoreError>,
    interrupted: &dyn Fn() -> bool,
) -> Result<usize, ControlError> {
    expire(maps, store)?;
    let list = change.list;
    let mut pushed: Vec<(Prefix, Option<Option<i64>>)> = Vec::new();
    let mut bar = None;
    let result = store.write(|tx| {
        let prefixes = plan(tx)?;
        bar = progress(prefixes.len());
        for prefix in &prefixes {
            if interrupted() {
                return Err(ControlError::Interrupted);
            }
            let before = tx.effective(list, prefix)?;
            let after = each(tx, prefix)?;
            // Pushed even when the database did not change, so a kernel entry lost to an
            // earlier failure comes back.
            if let Some(maps) = maps {
                pushed.push((*prefix, before));
                push(maps, list, prefix, after)?;
            }
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
        tx.audit(change.actor, change.action, &change.detail)?;
        Ok(prefixes.len())
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result.inspect_err(|_| {
        if let Some(maps) = maps {
            undo(maps, list, &pushed);
        }
    })
}

fn undo(maps: &Maps, list: List, pushed: &[(Prefix, Option<Option<i64>>)]) {
    for (prefix, before) in pushed.iter().rev() {
        if let Err(err) = push(maps, list, prefix, *before) {
            tracing::error!(%prefix, %err, "could not undo a kernel change; `apifilter attach` resyncs the kernel with the database");
        }
    }
}

/// Drop claims whose TTL ran out and remove entries left without a live owner from the kernel
/// (which already ignores them; this keeps the tables and `list` tidy).
pub fn expire(maps: Option<&Maps>, store: &mut Store) -> Result<usize, ControlError> {
    store.write(|tx| {
        let gone = tx.purge_expired(unix_ms())?;
        for (list, prefix) in &gone {
            let effective = tx.effective(*list, prefix)?;
            if let Some(maps) = maps {
                push(maps, *list, prefix, effective)?;
            }
        }
        Ok(gone.len())
    })
}

fn progress(len: usize) -> Option<indicatif::ProgressBar> {
    if len < 10_000 || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:40}] {pos}/{len} entries ({per_sec}, {eta} left)",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    Some(bar)
}

/// What [`Control::replace`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replaced {
    /// Entries the owner did not hold before.
    pub added: usize,
    /// Entries whose expiry was extended.
    pub refreshed: usize,
    /// Entries the owner no longer holds.
    pub removed: usize,
    /// Entries held before and now, unchanged.
    pub kept: usize,
}

/// A long-lived handle for a daemon's owners of entries. Cheap to share (`Arc<Control>`); the
/// calls block (SQLite and the bpf syscall), so async code runs them with `spawn_blocking`.
pub struct Control {
    pins: PinDir,
    state_dir: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    store: Store,
    maps: Option<Maps>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("pins", &self.pins.root())
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Open the state database and, when the filter is loaded, its pinned maps.
    pub fn open(pins: PinDir, state_dir: &Path) -> Result<Self, ControlError> {
        let store = Store::open(state_dir)?;
        let maps = Maps::open(&pins).ok();
        Ok(Self {
            pins,
            state_dir: state_dir.to_owned(),
            inner: Mutex::new(Inner { store, maps }),
        })
    }

    /// The pin dir.
    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// The state dir.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Store, Option<&Maps>) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.maps.is_none() {
            inner.maps = Maps::open(&self.pins).ok();
        }
        let Inner { store, maps } = &mut *inner;
        f(store, maps.as_ref())
    }

    /// Run read queries on the state database.
    pub fn read<T>(
        &self,
        f: impl FnOnce(crate::store::Reader<'_>) -> Result<T, StoreError>,
    ) -> Result<T, ControlError> {
        self.with(|store, _| Ok(f(store.read())?))
    }

    /// Run `f` with the kernel maps (`None` when the filter is not loaded).
    pub fn with_maps<T>(&self, f: impl FnOnce(Option<&Maps>) -> T) -> T {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.maps.is_none() {
            inner.maps = Maps::open(&self.pins).ok();
        }
        f(inner.maps.as_ref())
    }

    /// Add or refresh `owner`'s claims (expiry in ms since the epoch, `None` = permanent).
    pub fn claim(
        &self,
        list: List,
        owner: &str,
        entries: &[(Prefix, Option<i64>)],
        comment: Option<&str>,
    ) -> Result<usize, ControlError> {
        let by_prefix: HashMap<Prefix, Option<i64>> = entries.iter().copied().collect();
        let detail = describe(entries.iter().map(|(p, _)| p), comment);
        self.with(|store, maps| {
            apply(
                maps,
                store,
                Change {
                    list,
                    actor: owner,
                    action: verb(list, true),
                    detail,
                },
                |_| Ok(entries.iter().map(|(p, _)| *p).collect()),
                |tx, p| tx.claim(list, p, owner, by_prefix[p], comment).map(Some),
                &|| false,
            )
        })
    }

    /// Drop `owner`'s claims; an entry leaves the kernel when its last owner lets go.
    pub fn release(
        &self,
        list: List,
        owner: &str,
        prefixes: &[Prefix],
    ) -> Result<usize, ControlError> {
        let detail = describe(prefixes.iter(), None);
        self.with(|store, maps| {
            apply(
                maps,
                store,
                Change {
                    list,
                    actor: owner,
                    action: verb(list, false),
                    detail,
                },
                |_| Ok(prefixes.to_vec()),
                |tx, p| tx.release(list, p, owner),
                &|| false,
            )
        })
    }

    /// Make `owner`'s claims in `list` exactly `desired`, in one transaction: new entries are
    /// added before stale ones are released, so nothing kept blinks out, and `cursor` (key, value)
    /// is stored with them, so a crash never leaves a half-applied refresh. A held entry's expiry is
    /// rewritten only when less than half of its new lifetime is left, which keeps a periodic
    /// refresh of a big list cheap.
    pub fn replace(
        &self,
        list: List,
        owner: &str,
        desired: &[(Prefix, Option<i64>)],
        cursor: Option<(&str, &str)>,
    ) -> Result<Replaced, ControlError> {
        let now = unix_ms();
        let mut stats = Replaced::default();
        let want: HashMap<Prefix, Option<i64>> = desired.iter().copied().collect();
        let todo: std::cell::RefCell<HashMap<Prefix, Option<Option<i64>>>> = Default::default();
        self.with(|store, maps| {
            apply(
                maps,
                store,
                Change {
                    list,
                    actor: owner,
                    action: "replace",
                    detail: String::new(),
                },
                |tx| {
                    let held: HashMap<Prefix, Option<i64>> =
                        tx.read().owned_expiry(list, owner)?.into_iter().collect();
                    let mut plan = Vec::new();
                    let mut todo = todo.borrow_mut();
                    for (p, &exp) in &want {
                        match held.get(p) {
                            None => {
                                stats.added += 1;
                                todo.insert(*p, Some(exp));
                                plan.push(*p);
                            }
                            Some(&have) if stale(have, exp, now) => {
                                stats.refreshed += 1;
                                todo.insert(*p, Some(exp));
                                plan.push(*p);
                            }
                            Some(_) => stats.kept += 1,
                        }
                    }
                    for p in held.keys().filter(|p| !want.contains_key(p)) {
                        stats.removed += 1;
                        todo.insert(*p, None);
                        plan.push(*p);
                    }
                    // Adds and refreshes first, releases last.
                    plan.sort_by_key(|p| todo[p].is_none());
                    if let Some((key, value)) = cursor {
                        tx.set_cursor(key, Some(value))?;
                    }
                    Ok(plan)
                },
                |tx, p| match todo.borrow()[p] {
                    Some(exp) => tx.claim(list, p, owner, exp, None).map(Some),
                    None => tx.release(list, p, owner),
                },
                &|| false,
            )
        })?;
        if stats.added + stats.removed + stats.refreshed > 0 {
            tracing::debug!(owner, ?stats, "replaced entries");
        }
        Ok(stats)
    }

    /// The prefixes `owner` holds in `list`, with their expiry.
    pub fn owned(
        &self,
        list: List,
        owner: &str,
    ) -> Result<Vec<(Prefix, Option<i64>)>, ControlError> {
        self.read(|r| r.owned_expiry(list, owner))
    }

    /// The allowlist as stored.
    pub fn allowlist(&self) -> Result<Vec<Prefix>, ControlError> {
        self.read(|r| {
            Ok(r.entries(Some(List::Allow))?
                .into_iter()
                .map(|e| e.prefix)
                .collect())
        })
    }

    /// A stored cursor.
    pub fn cursor(&self, key: &str) -> Result<Option<String>, ControlError> {
        self.read(|r| r.cursor(key))
    }

    /// Store (or with `None` forget) a cursor on its own.
    pub fn set_cursor(&self, key: &str, value: Option<&str>) -> Result<(), ControlError> {
        self.with(|store, _| Ok(store.write(|tx| tx.set_cursor(key, value))?))
    }

    /// Purge expired claims; returns how many.
    pub fn expire(&self) -> Result<usize, ControlError> {
        self.with(|store, maps| expire(maps, store))
    }
}

/// Whether a held expiry should be rewritten to `want`.
fn stale(have: Option<i64>, want: Option<i64>, now: i64) -> bool {
    match (have, want) {
        (None, None) => false,
        (Some(have), Some(want)) => {
            // Shortened, or less than half of the new lifetime left.
            have > want || have - now < (want - now) / 2
        }
        _ => true,
    }
}

fn verb(list: List, add: bool) -> &'static str {
    match (list, add) {
        (List::Block, true) => "block",
        (List::Block, false) => "unblock",
        (List::Allow, true) => "allow",
        (List::Allow, false) => "unallow",
    }
}

/// A short audit description of a set of prefixes.
pub fn describe<'a>(
    entries: impl ExactSizeIterator<Item = &'a Prefix>,
    comment: Option<&str>,
) -> String {
    let n = entries.len();
    let mut s = entries
        .take(20)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    if n > 20 {
        s.push_str(&format!(" (+{} more)", n - 20));
    }
    if let Some(c) = comment {
        s.push_str(&format!(" comment={c:?}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_only_when_half_the_lifetime_is_gone() {
        let now = 1_000_000;
        assert!(!stale(None, None, now));
        assert!(stale(None, Some(now + 10), now), "permanent to expiring");
        assert!(stale(Some(now + 10), None, now), "expiring to permanent");
        assert!(!stale(Some(now + 900), Some(now + 1000), now));
        assert!(stale(Some(now + 400), Some(now + 1000), now));
        assert!(stale(Some(now + 2000), Some(now + 1000), now), "shortened");
    }

    #[test]
    fn replace_adds_refreshes_and_releases_in_the_store() {
        let dir = std::env::temp_dir().join(format!("apifilter-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ctl = Control::open(PinDir::new(dir.join("no-pins")), &dir.join("state")).unwrap();
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let first = [(p("198.18.0.1"), None), (p("198.18.1.0/24"), None)];
        let r = ctl
            .replace(List::Block, "feed:a", &first, Some(("feed:a", "etag-1")))
            .unwrap();
        assert_eq!(
            r,
            Replaced {
                added: 2,
                ..Default::default()
            }
        );
        ctl.claim(List::Block, "cli", &[(p("198.18.0.1"), None)], None)
            .unwrap();
        let second = [(p("198.18.1.0/24"), None), (p("2001:db8::/48"), None)];
        let r = ctl
            .replace(List::Block, "feed:a", &second, Some(("feed:a", "etag-2")))
            .unwrap();
        assert_eq!(
            r,
            Replaced {
                added: 1,
                removed: 1,
                kept: 1,
                refreshed: 0
            }
        );
        let mut held: Vec<_> = ctl
            .owned(List::Block, "feed:a")
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        held.sort();
        assert_eq!(held, vec![p("198.18.1.0/24"), p("2001:db8::/48")]);
        // The CLI's claim on the released entry survives the feed letting go.
        assert_eq!(ctl.owned(List::Block, "cli").unwrap().len(), 1);
        assert_eq!(ctl.cursor("feed:a").unwrap().as_deref(), Some("etag-2"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
