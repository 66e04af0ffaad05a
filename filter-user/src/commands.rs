//! What each subcommand does. State changes go to SQLite and the kernel maps together: the database
//! transaction commits only after the kernel accepted the change, and a kernel failure undoes what
//! the command already pushed, so a failed command changes nothing.

use std::{
    collections::HashMap,
    io::Read as _,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use filter_common::maps as m;
use serde::Serialize;

use crate::{
    cidr::Prefix,
    cli::{BlockArgs, Cli, Command, ImportArgs, Mode, RatelimitCommand},
    clock,
    control::{self, Change, kernel_expiry},
    formats,
    loader::{self, AttachMode, Capacities, PinDir},
    maps::{List, Maps},
    stats,
    store::{OWNER_CLI, Op, RateLimit, Settings, Store, StoreError, unix_ms},
};

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let pins = PinDir::new(&cli.pin_dir);
    let state = cli.state_dir.as_path();
    match cli.command {
        Command::Attach {
            ifaces,
            mode,
            capacities,
        } => attach(&pins, state, &ifaces, mode, &capacities),
        Command::Detach { ifaces, all } => detach(&pins, state, &ifaces, all),
        Command::Status { json } => status(&pins, state, json),
        Command::Block(args) => block(&pins, state, args),
        Command::Unblock { entries } => release(&pins, state, List::Block, &entries, "unblock"),
        Command::Allow {
            entries,
            comment,
            force,
        } => allow(&pins, state, &entries, comment, force),
        Command::Unallow { entries } => release(&pins, state, List::Allow, &entries, "unallow"),
        Command::List {
            blocked,
            allowed,
            json,
        } => {
            let only = if blocked {
                Some(List::Block)
            } else if allowed {
                Some(List::Allow)
            } else {
                None
            };
            list(&pins, state, only, json)
        }
        Command::Import(args) => import(&pins, state, args),
        Command::Ratelimit(cmd) => ratelimit(&pins, state, cmd),
        Command::Mode { mode } => set_mode(&pins, state, mode),
        Command::Stats { json, watch } => stats::run(&pins, json, watch),
        Command::Run { config } => crate::daemon::run(&pins, state, &config),
        Command::CheckConfig { config } => crate::daemon::check_config(&config),
    }
}

/// Fail clearly unless running as root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "apifilter {what} needs root: it reads and changes the kernel filter (bpffs pins) and the state database"
        );
    }
    Ok(())
}

/// The kernel maps, when the filter is loaded.
fn loaded_maps(pins: &PinDir) -> Option<Maps> {
    Maps::open(pins).ok()
}

/// Set by SIGINT/SIGTERM while [`DeferSignals`] is alive.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// While alive, SIGINT and SIGTERM only raise [`INTERRUPTED`]: a change in progress is undone
/// (or finished) instead of leaving the kernel and the database apart.
struct DeferSignals {
    previous: [(libc::c_int, libc::sighandler_t); 2],
}

impl DeferSignals {
    fn new() -> Self {
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let previous =
            [libc::SIGINT, libc::SIGTERM].map(|sig| (sig, unsafe { libc::signal(sig, handler) }));
        Self { previous }
    }

    fn interrupted(&self) -> bool {
        INTERRUPTED.load(Ordering::Relaxed)
    }
}

impl Drop for DeferSignals {
    fn drop(&mut self) {
        for (sig, handler) in self.previous {
            // SAFETY: restoring the handler that was there before.
            unsafe { libc::signal(sig, handler) };
        }
    }
}

/// Apply `owner`'s claims (or releases), in one transaction (see [`control::apply`]); the audit
/// log names the CLI. SIGINT undoes what was pushed: the command changes nothing.
fn apply(
    pins: &PinDir,
    store: &mut Store,
    (list, owner, comment): (List, &str, Option<&str>),
    plan: impl FnOnce(&mut crate::store::Tx<'_>) -> Result<Vec<(Prefix, Op)>, StoreError>,
    audit: (&str, String),
) -> anyhow::Result<usize> {
    let maps = loaded_maps(pins);
    let signals = DeferSignals::new();
    let changed = control::apply(
        maps.as_ref(),
        store,
        Change {
            list,
            owner,
            comment,
            actor: OWNER_CLI,
            action: audit.0,
            detail: audit.1,
        },
        plan,
        &|| signals.interrupted(),
    )?;
    if maps.is_none() {
        eprintln!(
            "note: the filter is not loaded under {}; the change is stored and applies on `apifilter attach`",
            pins.root().display()
        );
    }
    Ok(changed)
}

/// Bring the kernel in line with the database: the settings, every live entry with its remaining
/// TTL, and nothing else. Runs inside a write transaction, so no other command changes either
/// meanwhile. Returns (entries added or corrected, entries removed).
pub fn reconcile(maps: &Maps, tx: &mut crate::store::Tx<'_>) -> anyhow::Result<(usize, usize)> {
    apply_settings(maps, &tx.read().settings()?)?;
    // A /8–/24 prefix left part linked by a command killed between the writes that add or remove
    // it: take it out in full; below, it comes back in full if the database holds it. The /24s
    // that still led to it go without it for that moment; the others went without it already.
    let unlinked = maps.net24_unlinked()?;
    for prefix in &unlinked {
        maps.remove(List::Block, prefix)?;
    }
    let desired: HashMap<(List, Prefix), Option<i64>> = tx
        .read()
        .live(unix_ms())?
        .into_iter()
        .map(|(list, prefix, exp)| ((list, prefix), exp))
        .collect();
    let actual: HashMap<(List, Prefix), u64> = maps
        .entries()?
        .into_iter()
        .map(|k| ((k.list, k.prefix), k.value.expires_ns))
        .collect();
    let mut updated = 0;
    for (&(list, prefix), &exp) in &desired {
        let want = kernel_expiry(exp);
        // Expiries computed a moment apart differ by the time between; a second is no change.
        let same = actual
            .get(&(list, prefix))
            .is_some_and(|&have| (have == 0) == (want == 0) && have.abs_diff(want) < 1_000_000_000);
        if !same {
            maps.upsert(list, &prefix, want)?;
            updated += 1;
        }
    }
    let mut removed = unlinked
        .iter()
        .filter(|p| !desired.contains_key(&(List::Block, **p)))
        .count();
    for &(list, prefix) in actual.keys() {
        if !desired.contains_key(&(list, prefix)) {
            maps.remove(list, &prefix)?;
            removed += 1;
        }
    }
    Ok((updated, removed))
}

fn check_everything(prefixes: &[Prefix], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    if let Some(p) = prefixes.iter().find(|p| p.is_everything()) {
        bail!("refusing {p}: a /0 prefix matches every source; pass --force if you mean it");
    }
    if let Some((p, addr)) =
        crate::lockout::would_lock_out(prefixes, &crate::lockout::operator_addresses())
    {
        bail!(
            "refusing {p}: it covers {addr}, which an operator is connected from over SSH; \
             allowlist your management addresses, or pass --force if you mean it"
        );
    }
    Ok(())
}

fn attach(
    pins: &PinDir,
    state: &Path,
    ifaces: &[String],
    mode: AttachMode,
    caps: &Capacities,
) -> anyhow::Result<()> {
    require_root("attach")?;
    let mut store = Store::open(state)?;
    let signals = DeferSignals::new();
    attach_ifaces(
        pins,
        &mut store,
        ifaces,
        mode,
        caps,
        OWNER_CLI,
        &|| signals.interrupted(),
        &mut |line| println!("{line}"),
    )
}

/// Load the filter if needed, bring the kernel in line with the database, and attach `ifaces`
/// (those already attached are left alone). All or nothing: on failure, what this call attached
/// is detached again, and a program it loaded is unloaded. `say` gets one line per step.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site each in the CLI and the daemon"
)]
pub fn attach_ifaces(
    pins: &PinDir,
    store: &mut Store,
    ifaces: &[String],
    mode: AttachMode,
    caps: &Capacities,
    actor: &str,
    interrupted: &dyn Fn() -> bool,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<()> {
    // Check every name first, so a typo attaches nothing.
    for iface in ifaces {
        loader::ifindex(iface)?;
    }
    let state = store.path().to_owned();
    let fresh = loader::ensure_loaded(pins, caps)?;
    if !fresh && let Some((old, new)) = loader::upgrade(pins)? {
        say(format!(
            "program upgraded in place: id {old} -> {new}, every attached interface switched atomically"
        ));
    }
    let maps = Maps::open(pins)?;
    let mut attached_now = Vec::new();
    let result = store.write(|tx| {
        let (updated, removed) = reconcile(&maps, tx)?;
        if updated + removed > 0 {
            say(format!(
                "kernel synced with {}: {updated} entries restored or corrected, {removed} removed",
                state.display()
            ));
        }
        let recorded = tx.read().interfaces()?;
        for iface in ifaces {
            if interrupted() {
                bail!("interrupted; nothing was changed");
            }
            let ifindex = loader::ifindex(iface)?;
            if pins.link(iface).exists() {
                let was = recorded.iter().find(|(n, _, _)| n == iface).map(|(_, _, i)| *i);
                if was.is_none_or(|was| was == ifindex) {
                    say(format!("{iface}: already attached"));
                    continue;
                }
                // Deleting an interface detaches its XDP link; the pin outlives it. A new
                // interface of the same name needs a link of its own.
                tracing::warn!(%iface, "the interface was recreated since it was attached; attaching again");
                loader::detach(pins, iface)?;
            }
            let used = loader::attach(pins, iface, mode)?;
            attached_now.push(iface.clone());
            maps.assign_slot(ifindex)?;
            tx.set_interface(iface, &used.to_string(), ifindex)?;
            tx.audit(actor, "attach", &format!("{iface} mode={used}"))?;
            say(format!("{iface}: attached ({used} mode)"));
        }
        Ok::<_, anyhow::Error>(())
    });
    if let Err(err) = result {
        // Leave things as they were: no half-attached command, no program loaded for nothing.
        for iface in &attached_now {
            let _ = loader::detach(pins, iface);
        }
        if fresh {
            let _ = loader::unload(pins);
        }
        return Err(err);
    }
    Ok(())
}

/// Push the mode and rate limit to the kernel.
pub fn apply_settings(maps: &Maps, s: &Settings) -> anyhow::Result<()> {
    let mut ports: &[u16] = &[];
    maps.update_config(|c| {
        c.flags &= !(m::CFG_MONITOR | m::CFG_RL_ENABLED | m::CFG_RL_PORTS | m::CFG_RL_SYN_ONLY);
        if s.monitor {
            c.flags |= m::CFG_MONITOR;
        }
        if let Some(rl) = &s.ratelimit {
            c.flags |= m::CFG_RL_ENABLED;
            if rl.syn_only {
                c.flags |= m::CFG_RL_SYN_ONLY;
            }
            if !rl.ports.is_empty() {
                c.flags |= m::CFG_RL_PORTS;
            }
            // Round up: the configured rate is a ceiling.
            let interval = 1_000_000_000u64.div_ceil(rl.pps).max(1);
            c.rl_interval_ns = interval;
            c.rl_tolerance_ns = interval
                .saturating_mul(rl.burst.saturating_sub(1))
                .max(clock::coarse_tick_ns());
            c.rl_v6_prefix = u32::from(rl.v6_prefix);
            c.rl_v6_mask = m::v6_mask(u32::from(rl.v6_prefix));
            ports = &rl.ports;
        }
    })?;
    // Ports first would briefly scope an old limit to new ports; after is harmless either way
    // because the scope flag and the port table change within one command.
    maps.set_rl_ports(ports)?;
    Ok(())
}

fn detach(pins: &PinDir, state: &Path, ifaces: &[String], all: bool) -> anyhow::Result<()> {
    require_root("detach")?;
    let mut store = Store::open(state)?;
    if all {
        let attached = pins.attached();
        loader::unload(pins)?;
        store.write(|tx| {
            tx.remove_interface(None)?;
            tx.audit(OWNER_CLI, "detach", "--all")
        })?;
        println!(
            "detached from {} interface(s) and unloaded the filter; state is kept in {}",
            attached.len(),
            state.display()
        );
        return Ok(());
    }
    for iface in ifaces {
        if !pins.link(iface).exists() {
            bail!(
                "{iface} is not attached (attached: {})",
                list_or_none(&pins.attached())
            );
        }
    }
    let maps = loaded_maps(pins);
    for iface in ifaces {
        loader::detach(pins, iface)?;
        if let (Some(maps), Ok(ifindex)) = (&maps, loader::ifindex(iface)) {
            maps.release_slot(ifindex)?;
        }
        store.write(|tx| {
            tx.remove_interface(Some(iface))?;
            tx.audit(OWNER_CLI, "detach", iface)
        })?;
        println!("{iface}: detached");
    }
    Ok(())
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn block(pins: &PinDir, state: &Path, args: BlockArgs) -> anyhow::Result<()> {
    require_root("block")?;
    check_everything(&args.entries, args.force)?;
    let mut store = Store::open(state)?;
    warn_allowlisted(&store, &args.entries)?;
    let expires = args.ttl.map(|t| unix_ms() + t.as_millis() as i64);
    let comment = args.comment.as_deref();
    let detail = describe(&args.entries, args.ttl, comment);
    apply(
        pins,
        &mut store,
        (List::Block, OWNER_CLI, comment),
        |_| Ok(ops(&args.entries, Op::Claim(expires))),
        ("block", detail),
    )?;
    println!(
        "blocked {} entr{}{}",
        args.entries.len(),
        if args.entries.len() == 1 { "y" } else { "ies" },
        args.ttl
            .map(|t| format!(" for {}", humantime::format_duration(t)))
            .unwrap_or_default()
    );
    Ok(())
}

/// What makes a source hold exactly `listed` (sorted as stored, distinct), each claim with
/// `expires`, when it holds `held`: claims for the entries it does not hold with that expiry, then
/// releases for those it no longer lists. Entries it already holds as listed are left alone.
fn replace_plan(
    listed: Vec<Prefix>,
    held: &mut [(Prefix, Option<i64>)],
    expires: Option<i64>,
) -> Vec<(Prefix, Op)> {
    use crate::store::cmp_as_stored;
    crate::store::sort_as_stored(held, |(p, _)| *p);
    let mut plan = Vec::with_capacity(listed.len());
    let mut stale = Vec::new();
    let mut held = held.iter().peekable();
    for p in listed {
        while let Some((h, _)) = held.next_if(|(h, _)| cmp_as_stored(h, &p).is_lt()) {
            stale.push((*h, Op::Release));
        }
        match held.next_if(|(h, _)| *h == p) {
            Some((_, have)) if *have == expires => {}
            _ => plan.push((p, Op::Claim(expires))),
        }
    }
    stale.extend(held.map(|(h, _)| (*h, Op::Release)));
    plan.extend(stale);
    plan
}

/// The same op on each entry, each entry once.
fn ops(entries: &[Prefix], op: Op) -> Vec<(Prefix, Op)> {
    let mut seen = std::collections::HashSet::new();
    entries
        .iter()
        .filter(|p| seen.insert(**p))
        .map(|p| (*p, op))
        .collect()
}

fn describe(entries: &[Prefix], ttl: Option<Duration>, comment: Option<&str>) -> String {
    let mut s = entries
        .iter()
        .take(20)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    if entries.len() > 20 {
        s.push_str(&format!(" (+{} more)", entries.len() - 20));
    }
    if let Some(t) = ttl {
        s.push_str(&format!(" ttl={}", humantime::format_duration(t)));
    }
    if let Some(c) = comment {
        s.push_str(&format!(" comment={c:?}"));
    }
    s
}

fn warn_allowlisted(store: &Store, entries: &[Prefix]) -> anyhow::Result<()> {
    let allow = store.entries(Some(List::Allow))?;
    for e in entries {
        if let Some(a) = allow
            .iter()
            .find(|a| a.prefix.contains(e) || e.contains(&a.prefix))
        {
            tracing::warn!(entry = %e, allowlisted = %a.prefix, "overlaps the allowlist; the allowlist wins for the overlapping sources");
        }
    }
    Ok(())
}

fn release(
    pins: &PinDir,
    state: &Path,
    list: List,
    entries: &[Prefix],
    verb: &str,
) -> anyhow::Result<()> {
    require_root(verb)?;
    let mut store = Store::open(state)?;
    let mut missing = Vec::new();
    store.write(|tx| {
        for p in entries {
            if !tx.has_claim(list, p, OWNER_CLI)? {
                missing.push(*p);
            }
        }
        Ok::<_, StoreError>(())
    })?;
    if !missing.is_empty() {
        let stored = store.entries(Some(list))?;
        let why: Vec<String> = missing
            .iter()
            .map(|p| match stored.iter().find(|e| e.prefix == *p) {
                Some(e) => format!(
                    "{p} (added by {}; those sources remove their own entries)",
                    e.claims
                        .iter()
                        .map(|c| c.owner.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => format!("{p} (not in the {}list)", list.as_str()),
            })
            .collect();
        bail!(
            "nothing changed: not {}ed from the command line: {}",
            list.as_str(),
            why.join("; ")
        );
    }
    apply(
        pins,
        &mut store,
        (list, OWNER_CLI, None),
        |_| Ok(ops(entries, Op::Release)),
        (verb, describe(entries, None, None)),
    )?;
    let remaining = store.entries(Some(list))?;
    for p in entries {
        if let Some(e) = remaining.iter().find(|e| e.prefix == *p) {
            let owners: Vec<_> = e.claims.iter().map(|c| c.owner.as_str()).collect();
            println!("{p}: still {}ed by {}", list.as_str(), owners.join(", "));
        } else {
            println!("{p}: removed");
        }
    }
    Ok(())
}

fn allow(
    pins: &PinDir,
    state: &Path,
    entries: &[Prefix],
    comment: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    require_root("allow")?;
    check_everything(entries, force)?;
    let mut store = Store::open(state)?;
    let detail = describe(entries, None, comment.as_deref());
    apply(
        pins,
        &mut store,
        (List::Allow, OWNER_CLI, comment.as_deref()),
        |_| Ok(ops(entries, Op::Claim(None))),
        ("allow", detail),
    )?;
    println!(
        "allowed {} entr{}",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" }
    );
    Ok(())
}

#[derive(Serialize)]
struct ListRow {
    list: List,
    entry: Prefix,
    owners: Vec<String>,
    /// RFC 3339, or null for permanent.
    expires: Option<String>,
    expires_in_secs: Option<i64>,
    hits: Option<u64>,
    comment: Option<String>,
    in_kernel: bool,
}

fn list(pins: &PinDir, state: &Path, only: Option<List>, json: bool) -> anyhow::Result<()> {
    require_root("list")?;
    let store = Store::open(state)?;
    let kernel: Option<std::collections::HashMap<(List, Prefix), crate::maps::KernelEntry>> =
        match loaded_maps(pins) {
            Some(maps) => Some(
                maps.entries()?
                    .into_iter()
                    .map(|k| ((k.list, k.prefix), k))
                    .collect(),
            ),
            None => None,
        };
    let now = unix_ms();
    let rows: Vec<ListRow> = store
        .entries(only)?
        .into_iter()
        .filter(|e| e.effective_expiry_ms().is_none_or(|t| t > now))
        .map(|e| {
            let k = kernel.as_ref().and_then(|k| k.get(&(e.list, e.prefix)));
            let exp = e.effective_expiry_ms();
            ListRow {
                list: e.list,
                entry: e.prefix,
                owners: e.claims.iter().map(|c| c.owner.clone()).collect(),
                expires: exp.map(clock::rfc3339_ms),
                expires_in_secs: exp.map(|t| (t - now) / 1000),
                hits: k.map(|k| k.value.hits),
                comment: e.claims.iter().find_map(|c| c.comment.clone()),
                in_kernel: k.is_some(),
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no entries");
        return Ok(());
    }
    let mut t =
        crate::table::Table::new(["LIST", "ENTRY", "OWNERS", "EXPIRES IN", "HITS", "COMMENT"]);
    for r in &rows {
        t.row([
            r.list.as_str().to_string(),
            r.entry.to_string(),
            r.owners.join(","),
            r.expires_in_secs
                .map(|s| {
                    humantime::format_duration(Duration::from_secs(s.max(0) as u64)).to_string()
                })
                .unwrap_or_else(|| "never".into()),
            match (r.hits, r.in_kernel) {
                (Some(h), _) => h.to_string(),
                (None, false) if kernel.is_some() => "not loaded!".into(),
                _ => "-".into(),
            },
            r.comment.clone().unwrap_or_default(),
        ]);
    }
    print!("{t}");
    Ok(())
}

fn import(pins: &PinDir, state: &Path, args: ImportArgs) -> anyhow::Result<()> {
    require_root("import")?;
    if args.source.is_empty()
        || args.source == OWNER_CLI
        || args.source.chars().any(|c| c.is_whitespace())
    {
        bail!(
            "invalid --source {:?}: a name without spaces, other than \"cli\"",
            args.source
        );
    }
    let name = args.file.display().to_string();
    let mut text = String::new();
    if name == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
    } else {
        text = std::fs::read_to_string(&args.file).with_context(|| format!("reading {name}"))?;
    }
    let mut prefixes = formats::parse_all(args.format, &name, &text, 10).map_err(|errs| {
        anyhow::anyhow!(
            "{} has invalid lines; nothing was imported:\n  {}",
            name,
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  ")
        )
    })?;
    drop(text);
    // In the database's order: the writes walk its B-trees once instead of seeking per entry.
    crate::store::sort_as_stored(&mut prefixes, |p| *p);
    prefixes.dedup();
    check_everything(&prefixes, args.force)?;
    let mut store = Store::open(state)?;
    let expires = args.ttl.map(|t| unix_ms() + t.as_millis() as i64);
    let source = args.source.clone();
    let detail = format!(
        "{} entries from {name} as {source}{}",
        prefixes.len(),
        if args.replace { " (replace)" } else { "" }
    );
    if args.replace && prefixes.is_empty() {
        bail!(
            "{name} lists no entries: refusing to replace everything source {source:?} holds with nothing \
             (a failed download looks like this); use `apifilter import` without --replace to keep them"
        );
    }
    // Adds first, then releases, in one transaction: nothing the new list keeps blinks out, and a
    // concurrent import of the same source waits for this one.
    let adds = prefixes.len();
    let mut released = 0;
    apply(
        pins,
        &mut store,
        (List::Block, &source, None),
        |tx| {
            if !args.replace {
                return Ok(prefixes
                    .into_iter()
                    .map(|p| (p, Op::Claim(expires)))
                    .collect());
            }
            let mut held = tx.read().owned_expiry(List::Block, &source)?;
            let plan = replace_plan(prefixes, &mut held, expires);
            released = plan.iter().filter(|(_, op)| *op == Op::Release).count();
            Ok(plan)
        },
        ("import", detail),
    )?;
    println!(
        "imported {adds} entries from {name} as source {source:?}{}",
        if args.replace {
            format!("; released {released} it no longer lists")
        } else {
            String::new()
        }
    );
    Ok(())
}

fn ratelimit(pins: &PinDir, state: &Path, cmd: RatelimitCommand) -> anyhow::Result<()> {
    if let RatelimitCommand::Show { json } = cmd {
        require_root("ratelimit show")?;
        let s = Store::open(state)?.settings()?;
        if json {
            println!("{}", serde_json::to_string_pretty(&s.ratelimit)?);
        } else {
            println!("{}", describe_ratelimit(s.ratelimit.as_ref()));
        }
        return Ok(());
    }
    require_root("ratelimit")?;
    let rl = match cmd {
        RatelimitCommand::Set {
            pps,
            burst,
            mut ports,
            v6_prefix,
            syn_only,
        } => {
            if ports.contains(&0) {
                bail!("invalid --ports: port 0 is not a destination port");
            }
            ports.sort_unstable();
            ports.dedup();
            Some(RateLimit {
                pps,
                burst,
                ports,
                v6_prefix,
                syn_only,
            })
        }
        _ => None,
    };
    let mut store = Store::open(state)?;
    let detail = describe_ratelimit(rl.as_ref());
    change_settings(pins, &mut store, "ratelimit", detail.clone(), |s| {
        s.ratelimit = rl
    })?;
    println!("{detail}");
    Ok(())
}

fn describe_ratelimit(rl: Option<&RateLimit>) -> String {
    match rl {
        None => "rate limit: off".into(),
        Some(rl) => format!(
            "rate limit: {} pps, burst {} per source (IPv4 /32, IPv6 /{}); scope: {}{}",
            rl.pps,
            rl.burst,
            rl.v6_prefix,
            if rl.ports.is_empty() {
                "all traffic".to_string()
            } else {
                format!(
                    "ports {}",
                    rl.ports
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            },
            if rl.syn_only { ", TCP SYN only" } else { "" }
        ),
    }
}

/// Change the kernel settings: read, changed and written inside one transaction, so two commands
/// changing different settings at once both keep their change.
fn change_settings(
    pins: &PinDir,
    store: &mut Store,
    action: &str,
    detail: String,
    change: impl FnOnce(&mut Settings),
) -> anyhow::Result<()> {
    let maps = loaded_maps(pins);
    store.write(|tx| {
        let mut settings = tx.read().settings()?;
        change(&mut settings);
        tx.set_settings(&settings)?;
        tx.audit(OWNER_CLI, action, &detail)?;
        if let Some(maps) = &maps {
            apply_settings(maps, &settings)?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    if maps.is_none() {
        eprintln!(
            "note: the filter is not loaded; the setting is stored and applies on `apifilter attach`"
        );
    }
    Ok(())
}

fn set_mode(pins: &PinDir, state: &Path, mode: Mode) -> anyhow::Result<()> {
    require_root("mode")?;
    let mut store = Store::open(state)?;
    let monitor = mode == Mode::Monitor;
    let name = if monitor { "monitor" } else { "enforce" };
    change_settings(pins, &mut store, "mode", name.into(), |s| {
        s.monitor = monitor
    })?;
    println!(
        "mode: {name}{}",
        if monitor {
            " (nothing is dropped; would-be drops are counted as monitor_would_drop_*)"
        } else {
            ""
        }
    );
    Ok(())
}

#[derive(Serialize)]
struct Status {
    loaded: bool,
    pin_dir: String,
    program_id: Option<u32>,
    mode: &'static str,
    interfaces: Vec<IfaceStatus>,
    ratelimit: Option<RateLimit>,
    maps: Vec<MapFill>,
}

#[derive(Serialize)]
struct IfaceStatus {
    name: String,
    mode: String,
    ifindex: Option<u32>,
    /// The interface was deleted or recreated since it was attached: `attach` it again.
    stale: bool,
}

#[derive(Serialize)]
struct MapFill {
    name: &'static str,
    entries: usize,
    capacity: u32,
}

fn status(pins: &PinDir, state: &Path, json: bool) -> anyhow::Result<()> {
    require_root("status")?;
    let store = Store::open(state)?;
    let settings = store.settings()?;
    let modes = store.interfaces()?;
    let loaded = pins.is_loaded();
    let program_id = if loaded {
        loader::pinned_program(pins)?.info().ok().map(|i| i.id())
    } else {
        None
    };
    let interfaces = pins
        .attached()
        .into_iter()
        .map(|name| {
            let recorded = modes.iter().find(|(n, _, _)| *n == name);
            let ifindex = loader::ifindex(&name).ok();
            // A link whose interface was deleted (and maybe recreated) no longer filters.
            let stale = recorded.is_some_and(|(_, _, was)| Some(*was) != ifindex);
            IfaceStatus {
                mode: recorded
                    .map(|(_, m, _)| m.clone())
                    .unwrap_or_else(|| "?".into()),
                ifindex,
                stale,
                name,
            }
        })
        .collect();
    let mut fills = Vec::new();
    if let Some(maps) = loaded_maps(pins) {
        for name in crate::maps::RULE_TABLES {
            fills.push(MapFill {
                name,
                entries: maps.table_len(name)?,
                capacity: maps.capacity(name)?,
            });
        }
        fills.push(MapFill {
            name: m::MAP_RATELIMIT,
            entries: maps.rate_sources()?,
            capacity: maps.capacity(m::MAP_RATELIMIT_V4)? + maps.capacity(m::MAP_RATELIMIT)?,
        });
    }
    let s = Status {
        loaded,
        pin_dir: pins.root().display().to_string(),
        program_id,
        mode: if settings.monitor {
            "monitor"
        } else {
            "enforce"
        },
        interfaces,
        ratelimit: settings.ratelimit.clone(),
        maps: fills,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    if !loaded {
        println!(
            "filter: not loaded (pin dir {}); `apifilter attach <IFACE>` loads it",
            s.pin_dir
        );
        return Ok(());
    }
    println!(
        "filter: loaded, program id {}, pinned at {}",
        s.program_id
            .map(|i| i.to_string())
            .unwrap_or_else(|| "?".into()),
        s.pin_dir
    );
    println!("mode: {}", s.mode);
    println!("{}", describe_ratelimit(s.ratelimit.as_ref()));
    if s.interfaces.is_empty() {
        println!("interfaces: none attached");
    } else {
        let mut t = crate::table::Table::new(["INTERFACE", "IFINDEX", "XDP MODE", "STATE"]);
        for i in &s.interfaces {
            t.row([
                i.name.clone(),
                i.ifindex
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "gone".into()),
                i.mode.clone(),
                if i.stale {
                    "not filtering: interface recreated, run `apifilter attach`".into()
                } else {
                    "filtering".into()
                },
            ]);
        }
        print!("{t}");
    }
    let mut t = crate::table::Table::new(["MAP", "ENTRIES", "CAPACITY", "FILL"]);
    for f in &s.maps {
        t.row([
            f.name.to_string(),
            f.entries.to_string(),
            f.capacity.to_string(),
            format!(
                "{:.1}%",
                100.0 * f.entries as f64 / f64::from(f.capacity.max(1))
            ),
        ]);
    }
    print!("{t}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_plan_claims_what_changed_then_releases() {
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let mut listed = vec![
            p("10.0.0.1"),
            p("10.0.0.2"),
            p("10.0.0.3"),
            p("2001:db8::1"),
        ];
        crate::store::sort_as_stored(&mut listed, |p| *p);
        let mut held = vec![
            (p("10.0.0.9"), None),
            (p("10.0.0.2"), None),
            (p("10.0.0.3"), Some(5)),
            (p("1.1.1.1"), None),
            (p("2001:db8::1"), None),
        ];
        let plan = replace_plan(listed, &mut held, None);
        assert_eq!(
            plan,
            vec![
                // New, and held with another expiry; the unchanged ones are left alone.
                (p("10.0.0.1"), Op::Claim(None)),
                (p("10.0.0.3"), Op::Claim(None)),
                // No longer listed, after every claim.
                (p("1.1.1.1"), Op::Release),
                (p("10.0.0.9"), Op::Release),
            ]
        );
    }
}
