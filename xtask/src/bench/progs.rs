//! The bench's own two XDP programs, a few lines of C compiled with Debian's clang at bench
//! time, the test frames, and the address plan.
//!
//! - `bench_count`: bumps one per-CPU counter and drops: the floor of any XDP program.
//! - `bench_gen`: the flood generator. Run by BPF_PROG_TEST_RUN in live-frames mode on the
//!   generator's veth, it rewrites the source address (a random blocklisted host, or now and then
//!   the legitimate source), fixes the IPv4 checksum and returns XDP_TX, which sends the frame to
//!   the receiver's veth.
//! - `bench_touch`: the least a source filter does: reads the frame's IPv4 source, passes the
//!   legitimate source and drops the rest. The flood's floor: the first read of a frame's
//!   headers is a cache miss that `bench_count` never pays.
//!
//! Traffic only flows inside the bench's namespaces, from 198.18.0.0/15.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use super::sys::run;

/// The clang the programs are built with (Debian package `clang-19`).
pub const CLANG: &str = "clang-19";

/// The receiver's address (where the flood and the legitimate stream go).
pub const RX_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
/// The generator's / sender's address on the veth.
pub const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// A legitimate source: in no table.
pub const LEGIT_SRC: Ipv4Addr = Ipv4Addr::new(198, 19, 254, 1);
/// A source the kernel section puts in the allowlist.
pub const ALLOWED_SRC: Ipv4Addr = Ipv4Addr::new(198, 19, 252, 1);
/// A source the kernel section rate-limits.
pub const LIMITED_SRC: Ipv4Addr = Ipv4Addr::new(198, 19, 253, 1);
/// A blocked exact host (the first of the flood blocklist).
pub const BLOCKED_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// A blocked prefix.
pub const BLOCKED_PREFIX: &str = "198.19.240.0/24";
/// A source inside [`BLOCKED_PREFIX`].
pub const PREFIX_SRC: Ipv4Addr = Ipv4Addr::new(198, 19, 240, 7);

/// First address of the flood blocklist: hosts `FLOOD_BASE + i`, `i < FLOOD_ENTRIES`.
pub const FLOOD_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Entries of the flood blocklist (apifilter, nftables and ipset hold all of them).
pub const FLOOD_ENTRIES: u32 = 100_000;
/// The flood's sources are drawn from the first this many entries: xdp-filter's IPv4 table holds
/// at most 10,000, and every filter must see the same traffic.
pub const FLOOD_SOURCES: u32 = 10_000;
/// One frame in this many comes from the legitimate source.
pub const LEGIT_EVERY: u32 = 16;

/// MAC of the generator's veth end.
pub const GEN_MAC: [u8; 6] = [0x02, 0xaf, 0xbe, 0x00, 0x00, 0x01];
/// MAC of the receiver's veth end.
pub const RX_MAC: [u8; 6] = [0x02, 0xaf, 0xbe, 0x00, 0x00, 0x02];

/// Destination UDP port of every frame (nothing listens there).
pub const DST_PORT: u16 = 9;

const COUNT_C: &str = r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} bench_counter SEC(".maps");

SEC("xdp")
int bench_count(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *n = bpf_map_lookup_elem(&bench_counter, &key);
    if (n)
        *n += 1;
    return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
"#;

const TOUCH_C: &str = r#"
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} bench_counter SEC(".maps");

SEC("xdp")
int bench_touch(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    if (ip->saddr == bpf_htonl(LEGIT_SRC))
        return XDP_PASS;
    __u32 key = 0;
    __u64 *n = bpf_map_lookup_elem(&bench_counter, &key);
    if (n)
        *n += 1;
    return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
"#;

const GEN_C: &str = r#"
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

SEC("xdp")
int bench_gen(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > end)
        return XDP_ABORTED;
    __u32 r = bpf_get_prandom_u32();
    __u32 src = LEGIT_SRC;
    if (LEGIT_EVERY == 0 || r % LEGIT_EVERY != 0)
        src = FLOOD_BASE + (r >> 8) % FLOOD_SOURCES;
    ip->saddr = bpf_htonl(src);
    ip->check = 0;
    __u16 *w = (__u16 *)ip;
    __u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip->check = ~sum;
    return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
"#;

/// The compiled programs.
pub struct Objects {
    /// `bench_count`.
    pub count: PathBuf,
    /// `bench_touch`.
    pub touch: PathBuf,
    /// `bench_gen`.
    pub generator: PathBuf,
    /// The generator with a single blocklisted source ([`BLOCKED_HOST`]).
    pub generator_one: PathBuf,
}

/// Compiles the programs into `dir`. `legit_every` = 0 sends only blocklisted sources; 1 only
/// the legitimate one.
pub fn compile(dir: &Path, legit_every: u32) -> Result<Objects> {
    let count = build(dir, "count", COUNT_C, &[])?;
    let touch = build(
        dir,
        "touch",
        TOUCH_C,
        &[format!("-DLEGIT_SRC={}u", u32::from(LEGIT_SRC))],
    )?;
    let defines = |base: Ipv4Addr, sources: u32| {
        [
            format!("-DLEGIT_SRC={}u", u32::from(LEGIT_SRC)),
            format!("-DLEGIT_EVERY={legit_every}u"),
            format!("-DFLOOD_BASE={}u", u32::from(base)),
            format!("-DFLOOD_SOURCES={sources}u"),
        ]
    };
    let generator = build(dir, "gen", GEN_C, &defines(FLOOD_BASE, FLOOD_SOURCES))?;
    let generator_one = build(dir, "gen-one", GEN_C, &defines(BLOCKED_HOST, 1))?;
    Ok(Objects {
        count,
        touch,
        generator,
        generator_one,
    })
}

fn build(dir: &Path, name: &str, src: &str, defines: &[String]) -> Result<PathBuf> {
    let c = dir.join(format!("{name}.c"));
    let o = dir.join(format!("{name}.o"));
    fs::write(&c, src).with_context(|| format!("writing {}", c.display()))?;
    let arch = std::env::consts::ARCH;
    run(Command::new(CLANG)
        .args(["-O2", "-g", "-target", "bpf", "-Wall"])
        .arg(format!("-I/usr/include/{arch}-linux-gnu"))
        .args(defines)
        .arg("-c")
        .arg(&c)
        .arg("-o")
        .arg(&o))
    .with_context(|| format!("compiling the bench's {name} program (is {CLANG} installed?)"))?;
    Ok(o)
}

/// An Ethernet + IPv4 + UDP frame of 64 bytes (60 + the FCS a NIC would add), checksummed (UDP
/// checksum 0, as IPv4 allows).
pub fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    const LEN: usize = 60;
    let mut f = Vec::with_capacity(LEN);
    f.extend_from_slice(&RX_MAC);
    f.extend_from_slice(&GEN_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (LEN - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let csum = checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    let udp_len = ip_len - 20;
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&DST_PORT.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(LEN, 0);
    f
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `FLOOD_BASE + i`.
pub fn flood_host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FLOOD_BASE) + i)
}

/// The bulk list: `hosts` exact hosts counting up from 100.64.0.0 (no traffic is ever sent to or
/// from them; they only fill tables) and `prefixes` /24s counting up from 20.0.0.0.
pub fn bulk_entries(hosts: u32, prefixes: u32) -> Vec<String> {
    let host0 = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    let net0 = u32::from(Ipv4Addr::new(20, 0, 0, 0));
    let mut out = Vec::with_capacity((hosts + prefixes) as usize);
    out.extend((0..hosts).map(|i| Ipv4Addr::from(host0 + i).to_string()));
    out.extend((0..prefixes).map(|i| format!("{}/24", Ipv4Addr::from(net0 + (i << 8)))));
    out
}

/// A delta list disjoint from [`bulk_entries`]: `n` hosts counting up from 100.120.0.0.
pub fn delta_entries(n: u32) -> Vec<String> {
    let base = u32::from(Ipv4Addr::new(100, 120, 0, 0));
    (0..n)
        .map(|i| Ipv4Addr::from(base + i).to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_checksum_verifies() {
        let f = udp_frame(LEGIT_SRC, RX_ADDR);
        assert_eq!(f.len(), 60);
        assert_eq!(checksum(&f[14..34]), 0);
    }

    #[test]
    fn lists_are_disjoint_and_sized() {
        let bulk = bulk_entries(900_000, 100_000);
        assert_eq!(bulk.len(), 1_000_000);
        assert_eq!(bulk[899_999], "100.77.187.159");
        assert_eq!(bulk[999_999], "21.134.159.0/24");
        assert_eq!(delta_entries(10_000)[9_999], "100.120.39.15");
        assert!(u32::from(flood_host(FLOOD_ENTRIES - 1)) < u32::from(PREFIX_SRC));
    }
}
