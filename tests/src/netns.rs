//! RAII network namespaces and veth pairs for the end-to-end tests, and the traffic that runs
//! inside them.
//!
//! Every guard cleans up in `Drop`, so a failing (panicking) test leaves no namespace or link
//! behind. Traffic only ever flows between namespaces a test created, with addresses from
//! 198.18.0.0/15 and 2001:db8::/32.
//!
//! - [`Netns`]: `ip netns add/del`, running closures inside it (a thread that `setns`es), and
//!   commands inside it through `nsenter --net=` (not `ip netns exec`, which remounts `/sys` and
//!   hides the bpffs pins).
//! - [`VethPair`]: a veth between two namespaces, with fixed MACs.
//! - [`Topology`]: a `server` namespace (veth ends `s0`, `s1`, …, where apifilter attaches) and a
//!   `client` namespace (`c0`, `c1`, …) holding several source addresses per subnet.
//! - [`Sink`]: a UDP and a TCP receiver in a namespace that count what arrived per source address.
//! - [`send_udp`], [`send_udp_paced`], [`tcp_connect_from`]: senders bound to one source address.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::Instance;

/// A name unique to this process and call: `<prefix><pid>x<counter>`, at most 15 characters (the
/// kernel's interface-name limit, so the name is safe wherever it ends up).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id());
    assert!(
        name.len() <= 15,
        "name {name:?} is longer than 15 characters; use a shorter prefix"
    );
    name
}

/// Run `cmd`, panicking with its output unless it succeeds; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Move the calling thread into the network namespace mounted at `path`.
fn enter(path: &std::path::Path) {
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: a valid namespace fd; setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns({}): {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create a fresh namespace named `<prefix><pid>x<n>` with loopback up.
    pub fn new(prefix: &str) -> Self {
        crate::require_root();
        let name = unique_name(prefix);
        // A namespace left over from an earlier process with the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, for `setns` and `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Run `ip -n NAME ARGS`, panicking unless it succeeds; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Add an address to an interface; IPv6 addresses get `nodad` so they are usable at once.
    pub fn add_addr(&self, iface: &str, cidr: &str) {
        let mut args = vec!["addr", "add", cidr, "dev", iface];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args);
    }

    /// Wait (up to 5 s) until `iface` is up with carrier and has no tentative global address.
    pub fn wait_ready(&self, iface: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let link = self.ip(&["-o", "link", "show", "dev", iface]);
            let tentative = self.ip(&[
                "-6",
                "addr",
                "show",
                "dev",
                iface,
                "scope",
                "global",
                "tentative",
            ]);
            if link.contains("LOWER_UP") && link.contains("state UP") && tentative.trim().is_empty()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{iface} in {} not ready:\n{link}\n{tentative}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `f` on a thread inside this namespace and return its result (a panic inside `f` is
    /// re-raised here). Sockets `f` creates belong to the namespace.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&path);
                f()
            })
            .join()
        })
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Start `f` on a background thread inside this namespace.
    pub fn spawn<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// `nsenter --net=/run/netns/NAME PROGRAM`: a command that runs inside this namespace but
    /// keeps the caller's mounts (so bpffs pins under /sys/fs/bpf stay visible).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }

    /// `apifilter` with `inst`'s pin and state dirs, run inside this namespace (interface names
    /// and ifindexes resolve here).
    pub fn apifilter(&self, inst: &Instance) -> Command {
        let base = inst.cmd();
        let mut c = self.command(base.get_program());
        for (key, value) in base.get_envs() {
            match value {
                Some(v) => c.env(key, v),
                None => c.env_remove(key),
            };
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// A veth pair with one end in each of two namespaces, links up; deleted on drop.
#[derive(Debug)]
pub struct VethPair {
    /// Namespace of end `a`.
    ns_a: String,
    /// Interface name of end `a` (inside `ns_a`).
    pub a: String,
    /// Interface name of end `b` (inside the other namespace).
    pub b: String,
}

impl VethPair {
    /// Create `a_if` (MAC `a_mac`) in `a` and its peer `b_if` (MAC `b_mac`) in `b`, both up.
    /// The ends are created directly inside the namespaces, so their names never meet the
    /// root namespace's interfaces.
    pub fn new(a: &Netns, a_if: &str, a_mac: &str, b: &Netns, b_if: &str, b_mac: &str) -> Self {
        run_ok(Command::new("ip").args([
            "link",
            "add",
            a_if,
            "address",
            a_mac,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "address",
            b_mac,
            "netns",
            b.name(),
        ]));
        let pair = Self {
            ns_a: a.name().to_owned(),
            a: a_if.to_owned(),
            b: b_if.to_owned(),
        };
        a.ip(&["link", "set", a_if, "up"]);
        b.ip(&["link", "set", b_if, "up"]);
        pair
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end deletes both; the namespace may already be gone, which is fine.
        let _ = Command::new("ip")
            .args(["-n", &self.ns_a, "link", "del", &self.a])
            .output();
    }
}

/// `198.18.<subnet>.<host>`.
pub fn v4(subnet: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, subnet, host))
}

/// `2001:db8:<subnet>::<host>` (the subnet's main /64).
pub fn v6(subnet: u8, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        u16::from(subnet),
        0,
        0,
        0,
        0,
        host,
    ))
}

/// `2001:db8:<subnet>:1::<host>`: a second /64 on the same link, outside [`v6`]'s.
pub fn v6_other(subnet: u8, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        u16::from(subnet),
        1,
        0,
        0,
        0,
        host,
    ))
}

/// Client hosts on each IPv4 subnet: `198.18.<subnet>.2` to `.9`.
pub const CLIENT_V4_HOSTS: std::ops::RangeInclusive<u8> = 2..=9;
/// Client hosts in each IPv6 /64: `::2` to `::5`.
pub const CLIENT_V6_HOSTS: std::ops::RangeInclusive<u16> = 2..=5;

/// One link of a [`Topology`]: server end, client end and the subnet number used in addresses.
#[derive(Debug)]
pub struct Link {
    /// Server-side interface (where apifilter attaches), e.g. `s0`.
    pub server_if: String,
    /// Client-side interface, e.g. `c0`.
    pub client_if: String,
    /// Subnet number: addresses are `198.18.<subnet>.x/24`, `2001:db8:<subnet>::x/64` and
    /// `2001:db8:<subnet>:1::x/64`; the server is host 1 in each.
    pub subnet: u8,
    _veth: VethPair,
}

/// A `server` namespace and a `client` namespace joined by one or more veth pairs.
///
/// For link `i` on subnet `k`: the server has `s<i>` with 198.18.k.1/24, 2001:db8:k::1/64 and
/// 2001:db8:k:1::1/64; the client has `c<i>` with 198.18.k.2–9/24, 2001:db8:k::2–5/64 and
/// 2001:db8:k:1::2–3/64. Neighbour entries are static both ways, so no ARP/ND exchange (which the
/// filter might drop for a blocked source) is needed before traffic flows.
#[derive(Debug)]
pub struct Topology {
    /// Links, dropped first.
    pub links: Vec<Link>,
    /// The client namespace (traffic sources).
    pub client: Netns,
    /// The server namespace (apifilter attaches here).
    pub server: Netns,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    /// Both namespaces and link `s0`/`c0` on subnet 1.
    pub fn new() -> Self {
        let server = Netns::new("afs");
        let client = Netns::new("afc");
        let mut t = Self {
            links: Vec::new(),
            client,
            server,
        };
        t.add_link(1);
        t
    }

    /// Add link `s<i>`/`c<i>` on subnet `subnet` (see the type's docs); returns its index.
    pub fn add_link(&mut self, subnet: u8) -> usize {
        let i = self.links.len();
        let (s_if, c_if) = (format!("s{i}"), format!("c{i}"));
        let (s_mac, c_mac) = (
            format!("02:af:00:00:{i:02x}:01"),
            format!("02:af:00:00:{i:02x}:02"),
        );
        let veth = VethPair::new(&self.server, &s_if, &s_mac, &self.client, &c_if, &c_mac);
        let server_addrs = [
            (v4(subnet, 1), 24),
            (v6(subnet, 1), 64),
            (v6_other(subnet, 1), 64),
        ];
        let mut client_addrs: Vec<(IpAddr, u8)> =
            CLIENT_V4_HOSTS.map(|h| (v4(subnet, h), 24)).collect();
        client_addrs.extend(CLIENT_V6_HOSTS.map(|h| (v6(subnet, h), 64)));
        client_addrs.extend((2..=3).map(|h| (v6_other(subnet, h), 64)));
        for (addr, len) in server_addrs {
            self.server.add_addr(&s_if, &format!("{addr}/{len}"));
            self.client.ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &s_mac,
                "dev",
                &c_if,
                "nud",
                "permanent",
            ]);
        }
        for (addr, len) in &client_addrs {
            self.client.add_addr(&c_if, &format!("{addr}/{len}"));
            self.server.ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &c_mac,
                "dev",
                &s_if,
                "nud",
                "permanent",
            ]);
        }
        self.server.wait_ready(&s_if);
        self.client.wait_ready(&c_if);
        self.links.push(Link {
            server_if: s_if,
            client_if: c_if,
            subnet,
            _veth: veth,
        });
        i
    }

    /// The server's address on link `i` in the same family (and, for IPv6, the same /64 as
    /// [`v6`] or [`v6_other`]) as `src`.
    pub fn server_addr_for(&self, i: usize, src: IpAddr) -> IpAddr {
        let k = self.links[i].subnet;
        match src {
            IpAddr::V4(_) => v4(k, 1),
            IpAddr::V6(a) if a.segments()[3] == 1 => v6_other(k, 1),
            IpAddr::V6(_) => v6(k, 1),
        }
    }
}

/// Per-source counts, shared with a receiver thread.
type Counts = Arc<Mutex<HashMap<IpAddr, u64>>>;

/// A UDP socket and a TCP listener (both dual-stack, ephemeral ports) in a namespace, counting
/// datagrams and accepted connections per source address until dropped.
#[derive(Debug)]
pub struct Sink {
    /// UDP port.
    pub udp_port: u16,
    /// TCP port.
    pub tcp_port: u16,
    udp: Counts,
    tcp: Counts,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Ask for a 4 MiB receive buffer so bursts are never lost in the socket (root may exceed
/// `rmem_max` with `SO_RCVBUFFORCE`).
fn big_rcvbuf(fd: i32) {
    let size: libc::c_int = 4 << 20;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given length.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Sink {
    /// Bind both sockets inside `ns` and start counting.
    pub fn start(ns: &Netns) -> Self {
        let (udp, tcp): (Counts, Counts) = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<(bool, u16)>();

        let (counts, stop2, tx2) = (udp.clone(), stop.clone(), tx.clone());
        let udp_thread = ns.spawn(move || {
            let sock = UdpSocket::bind("[::]:0").expect("bind UDP sink");
            big_rcvbuf(sock.as_raw_fd());
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("read timeout");
            tx2.send((true, sock.local_addr().expect("local addr").port()))
                .expect("report port");
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    *counts
                        .lock()
                        .expect("counts")
                        .entry(from.ip().to_canonical())
                        .or_default() += 1;
                }
            }
        });
        let (counts, stop2) = (tcp.clone(), stop.clone());
        let tcp_thread = ns.spawn(move || {
            let listener = TcpListener::bind("[::]:0").expect("bind TCP sink");
            listener.set_nonblocking(true).expect("nonblocking");
            tx.send((false, listener.local_addr().expect("local addr").port()))
                .expect("report port");
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((_stream, from)) => {
                        *counts
                            .lock()
                            .expect("counts")
                            .entry(from.ip().to_canonical())
                            .or_default() += 1;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let (mut udp_port, mut tcp_port) = (0, 0);
        for _ in 0..2 {
            match rx
                .recv_timeout(Duration::from_secs(5))
                .expect("sink did not start")
            {
                (true, p) => udp_port = p,
                (false, p) => tcp_port = p,
            }
        }
        Self {
            udp_port,
            tcp_port,
            udp,
            tcp,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// Datagrams received so far from `src`.
    pub fn udp_from(&self, src: IpAddr) -> u64 {
        self.udp
            .lock()
            .expect("counts")
            .get(&src)
            .copied()
            .unwrap_or(0)
    }

    /// Connections accepted so far from `src`.
    pub fn tcp_from(&self, src: IpAddr) -> u64 {
        self.tcp
            .lock()
            .expect("counts")
            .get(&src)
            .copied()
            .unwrap_or(0)
    }

    /// Wait until no datagram has arrived for 150 ms (at most 5 s), so counts are final.
    pub fn settle(&self) {
        let total = || self.udp.lock().expect("counts").values().sum::<u64>();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = total();
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let now = total();
            if now == last || Instant::now() > deadline {
                return;
            }
            last = now;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A small recognisable payload.
const PAYLOAD: &[u8] = b"apifilter-e2e-datagram-0123456789";

/// From inside `ns`, send `n` UDP datagrams from `src` to `dst`, paced gently (20 per 0.5 ms)
/// so no queue on the way (veth ring, socket buffers) overflows. Returns how many the kernel
/// accepted from the socket.
pub fn send_udp(ns: &Netns, src: IpAddr, dst: SocketAddr, n: u64) -> u64 {
    ns.run(move || {
        let sock =
            UdpSocket::bind(SocketAddr::new(src, 0)).unwrap_or_else(|e| panic!("bind {src}: {e}"));
        let mut sent = 0;
        for i in 0..n {
            if sock.send_to(PAYLOAD, dst).is_ok() {
                sent += 1;
            }
            if i % 20 == 19 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        sent
    })
}

/// From inside `ns`, send UDP datagrams from `src` to `dst` at `pps` for `duration`, paced
/// evenly (checked every 100 µs). Returns how many the kernel accepted from the socket.
pub fn send_udp_paced(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    pps: u64,
    duration: Duration,
) -> u64 {
    ns.run(move || {
        let sock =
            UdpSocket::bind(SocketAddr::new(src, 0)).unwrap_or_else(|e| panic!("bind {src}: {e}"));
        let start = Instant::now();
        let (mut attempted, mut sent) = (0u64, 0u64);
        loop {
            let elapsed = start.elapsed();
            if elapsed >= duration {
                break;
            }
            let due = (elapsed.as_secs_f64() * pps as f64) as u64;
            while attempted < due {
                attempted += 1;
                if sock.send_to(PAYLOAD, dst).is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        sent
    })
}

/// A `sockaddr_storage` holding `addr`, and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned for any sockaddr.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Open a TCP connection from `src` (bound before connecting, which `std` cannot do) to `dst`,
/// giving up after `timeout` with `ErrorKind::TimedOut`. Call it inside a namespace
/// ([`Netns::run`]). The connection is closed again at once.
pub fn tcp_connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<()> {
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (sa, len) = sockaddr(SocketAddr::new(src, 0));
    // SAFETY: `sa` is a valid sockaddr of length `len`.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (sa, len) = sockaddr(dst);
    // SAFETY: as above.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect {src} -> {dst} timed out"),
            ));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n > 0 {
            break;
        }
    }
    let mut so_error: libc::c_int = 0;
    let mut optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, pointers to a c_int and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut so_error).cast(),
            &mut optlen,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if so_error != 0 {
        return Err(io::Error::from_raw_os_error(so_error));
    }
    Ok(())
}
