//! Loading the XDP program once, pinning it with its maps and per-interface links under the pin
//! dir, and attaching/detaching interfaces. Everything pinned keeps working with no process alive.
//!
//! Pin layout: `<pin>/prog`, `<pin>/maps/<MAP>`, `<pin>/links/<iface>`.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use aya_obj::programs::XdpAttachType;
use filter_common::maps as m;
use serde::Serialize;

/// The XDP program, compiled for BPF by `build.rs`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filter"));
/// Name of the `#[xdp]` entry point.
pub const PROGRAM_NAME: &str = "apifilter";

/// Errors of loading, pinning and attaching.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel rejected the program or a map.
    #[error("loading the XDP program: {0}")]
    Load(String),
    /// Creating or reading the pin dir.
    #[error("pin dir {path}: {source}")]
    PinDir {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The interface does not exist.
    #[error("no such interface {iface:?}")]
    NoInterface {
        /// Name given.
        iface: String,
    },
    /// Attaching failed in every allowed mode.
    #[error("attaching to {iface} ({mode}): {reason}")]
    Attach {
        /// Interface.
        iface: String,
        /// Mode tried.
        mode: AttachMode,
        /// Kernel's answer.
        reason: String,
    },
    /// Pinning or unpinning a link or the program.
    #[error("pinning {path}: {reason}")]
    Pin {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The interface is not attached.
    #[error("{iface} is not attached")]
    NotAttached {
        /// Interface.
        iface: String,
    },
    /// The program is not loaded (no `attach` yet).
    #[error("the filter is not loaded under {pin_dir}; run `apifilter attach <IFACE>` first")]
    NotLoaded {
        /// Pin dir looked at.
        pin_dir: PathBuf,
    },
}

/// How the program is attached to an interface.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to skb mode with a warning.
    #[default]
    Auto,
    /// Native XDP in the driver: the fast path.
    Native,
    /// Generic XDP after the kernel built an skb: works everywhere, slower.
    Skb,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        })
    }
}

/// Map sizes chosen when the program is first loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args, Serialize)]
pub struct Capacities {
    /// Exact IPv4 hosts the blocklist holds (used when the program is first loaded).
    #[arg(long, default_value_t = m::BLOCK_V4_MAX, value_name = "N", value_parser = capacity)]
    pub max_v4_hosts: u32,
    /// Exact IPv6 hosts the blocklist holds.
    #[arg(long, default_value_t = m::BLOCK_V6_MAX, value_name = "N", value_parser = capacity)]
    pub max_v6_hosts: u32,
    /// IPv4 prefixes the blocklist holds.
    #[arg(long, default_value_t = m::BLOCK_NET_V4_MAX, value_name = "N", value_parser = capacity)]
    pub max_v4_prefixes: u32,
    /// IPv6 prefixes the blocklist holds.
    #[arg(long, default_value_t = m::BLOCK_NET_V6_MAX, value_name = "N", value_parser = capacity)]
    pub max_v6_prefixes: u32,
    /// Sources the rate limiter tracks, per address family (least recently seen are evicted).
    #[arg(long, default_value_t = m::RATELIMIT_MAX, value_name = "N", value_parser = capacity)]
    pub max_sources: u32,
}

/// Largest table size accepted (64M entries; the big tables take about 90 bytes an entry).
pub const CAPACITY_MAX: u32 = 1 << 26;

/// Parse a table size: 1 to [`CAPACITY_MAX`].
fn capacity(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=CAPACITY_MAX).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid table size {s:?}: must be 1 to {CAPACITY_MAX}"
        )),
    }
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            max_v4_hosts: m::BLOCK_V4_MAX,
            max_v6_hosts: m::BLOCK_V6_MAX,
            max_v4_prefixes: m::BLOCK_NET_V4_MAX,
            max_v6_prefixes: m::BLOCK_NET_V6_MAX,
            max_sources: m::RATELIMIT_MAX,
        }
    }
}

/// Paths inside a pin dir.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// A pin dir at `root` (not created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The pinned program.
    pub fn prog(&self) -> PathBuf {
        self.root.join("prog")
    }
    /// Directory of pinned maps.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    /// One pinned map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    /// Directory of per-interface links.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// One interface's link.
    pub fn link(&self, iface: &str) -> PathBuf {
        self.links().join(iface)
    }
    /// True when the program is loaded and pinned here.
    pub fn is_loaded(&self) -> bool {
        self.prog().exists()
    }
    /// Interfaces with a pinned link, sorted.
    pub fn attached(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.links())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }
}

fn mkdir(path: &Path) -> Result<(), LoaderError> {
    std::fs::create_dir_all(path).map_err(|source| LoaderError::PinDir {
        path: path.to_owned(),
        source,
    })?;
    // Only root may read or change the filter's maps through the pins.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        LoaderError::PinDir {
            path: path.to_owned(),
            source,
        }
    })
}

/// Load the program and pin it with its maps, unless it is already pinned. Returns true when it
/// was loaded now (so the caller restores state into the fresh maps).
pub fn ensure_loaded(pins: &PinDir, caps: &Capacities) -> Result<bool, LoaderError> {
    if pins.is_loaded() {
        return Ok(false);
    }
    mkdir(pins.root())?;
    mkdir(&pins.maps())?;
    mkdir(&pins.links())?;
    // Map pins without a program are left over from a load that failed half way: aya would reuse
    // them whatever their sizes, so start from nothing.
    remove_map_pins(pins)?;
    load_and_pin(pins, caps).inspect_err(|_| {
        let _ = unload(pins);
    })?;
    Ok(true)
}

fn remove_map_pins(pins: &PinDir) -> Result<(), LoaderError> {
    for entry in std::fs::read_dir(pins.maps())
        .into_iter()
        .flatten()
        .flatten()
    {
        std::fs::remove_file(entry.path()).map_err(|source| LoaderError::PinDir {
            path: entry.path(),
            source,
        })?;
    }
    Ok(())
}

fn load_and_pin(pins: &PinDir, caps: &Capacities) -> Result<(), LoaderError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.maps())
        .map_max_entries(m::MAP_BLOCK_V4, caps.max_v4_hosts)
        .map_max_entries(m::MAP_BLOCK_V6, caps.max_v6_hosts)
        .map_max_entries(m::MAP_BLOCK_NET_V4, caps.max_v4_prefixes)
        .map_max_entries(m::MAP_NET_RULES_V4, caps.max_v4_prefixes.saturating_add(1))
        .map_max_entries(m::MAP_NET_IDS_V4, caps.max_v4_prefixes)
        .map_max_entries(m::MAP_BLOCK_NET_V6, caps.max_v6_prefixes)
        .map_max_entries(m::MAP_RATELIMIT, caps.max_sources)
        .map_max_entries(m::MAP_RATELIMIT_V4, caps.max_sources)
        .load(PROGRAM)
        .map_err(|e| LoaderError::Load(format!("{e:#}")))?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| LoaderError::Load(format!("program {PROGRAM_NAME} missing")))?
        .try_into()
        .map_err(|e| LoaderError::Load(format!("{e}")))?;
    prog.load()
        .map_err(|e| LoaderError::Load(verifier_error(&e)))?;
    prog.pin(pins.prog()).map_err(|e| LoaderError::Pin {
        path: pins.prog(),
        reason: e.to_string(),
    })?;
    Ok(())
}

fn verifier_error(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            format!("{io_error}\nverifier log:\n{verifier_log}")
        }
        other => other.to_string(),
    }
}

/// The pinned program, for attaching or `BPF_PROG_TEST_RUN`.
pub fn pinned_program(pins: &PinDir) -> Result<Xdp, LoaderError> {
    if !pins.is_loaded() {
        return Err(LoaderError::NotLoaded {
            pin_dir: pins.root().to_owned(),
        });
    }
    Xdp::from_pin(pins.prog(), XdpAttachType::Interface).map_err(|e| LoaderError::Pin {
        path: pins.prog(),
        reason: e.to_string(),
    })
}

/// ifindex of an interface, or an error naming it.
pub fn ifindex(iface: &str) -> Result<u32, LoaderError> {
    let c = CString::new(iface).map_err(|_| LoaderError::NoInterface {
        iface: iface.into(),
    })?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(LoaderError::NoInterface {
            iface: iface.into(),
        }),
        i => Ok(i),
    }
}

/// Attach the pinned program to `iface` and pin the link. Returns the mode it ended up in.
/// Attaching an interface that is already attached is a no-op.
pub fn attach(pins: &PinDir, iface: &str, mode: AttachMode) -> Result<AttachMode, LoaderError> {
    ifindex(iface)?;
    let link_path = pins.link(iface);
    if link_path.exists() {
        return Ok(mode);
    }
    let mut prog = pinned_program(pins)?;
    let try_mode = |prog: &mut Xdp, m: AttachMode| {
        let flags = if m == AttachMode::Skb {
            XdpMode::Skb
        } else {
            XdpMode::Driver
        };
        prog.attach(iface, flags).map_err(|e| LoaderError::Attach {
            iface: iface.into(),
            mode: m,
            reason: match &e {
                aya::programs::ProgramError::SyscallError(s) => s.io_error.to_string(),
                other => other.to_string(),
            },
        })
    };
    let (id, used) = match mode {
        AttachMode::Auto => match try_mode(&mut prog, AttachMode::Native) {
            Ok(id) => (id, AttachMode::Native),
            Err(err) => {
                tracing::warn!(%iface, %err, "native XDP unavailable, falling back to skb mode (slower)");
                (try_mode(&mut prog, AttachMode::Skb)?, AttachMode::Skb)
            }
        },
        m => (try_mode(&mut prog, m)?, m),
    };
    let link = prog.take_link(id).map_err(|e| LoaderError::Pin {
        path: link_path.clone(),
        reason: e.to_string(),
    })?;
    let fd_link = FdLink::try_from(link).map_err(|e| LoaderError::Pin {
        path: link_path.clone(),
        reason: format!("kernel did not give a BPF link ({e}); pinning needs Linux 5.9+"),
    })?;
    fd_link.pin(&link_path).map_err(|e| LoaderError::Pin {
        path: link_path.clone(),
        reason: e.to_string(),
    })?;
    Ok(used)
}

/// Remove an interface's link: the program stops running there.
pub fn detach(pins: &PinDir, iface: &str) -> Result<(), LoaderError> {
    let path = pins.link(iface);
    if !path.exists() {
        return Err(LoaderError::NotAttached {
            iface: iface.into(),
        });
    }
    let link = PinnedLink::from_pin(&path).map_err(|e| LoaderError::Pin {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    link.unpin().map_err(|e| LoaderError::Pin {
        path,
        reason: e.to_string(),
    })?;
    Ok(())
}

/// Remove every link, the program and the map pins: the filter is gone from the kernel.
pub fn unload(pins: &PinDir) -> Result<(), LoaderError> {
    for iface in pins.attached() {
        detach(pins, &iface)?;
    }
    let rm = |p: PathBuf| match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LoaderError::PinDir { path: p, source }),
    };
    rm(pins.prog())?;
    for name in std::fs::read_dir(pins.maps())
        .into_iter()
        .flatten()
        .flatten()
    {
        rm(name.path())?;
    }
    for dir in [pins.links(), pins.maps(), pins.root().to_owned()] {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}
