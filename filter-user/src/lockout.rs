//! Guards against locking the operator out: a block that covers an address the operator is
//! connected from (this SSH session, or any established SSH session to this host) is refused
//! unless forced. `/0` and the allowlist have their own guards in the commands.

use std::net::IpAddr;

use crate::cidr::Prefix;

/// Port whose established sessions count as an operator's (sshd).
const SSH_PORT: u16 = 22;

/// Addresses operators are connected from: `SSH_CONNECTION` / `SSH_CLIENT` of this process, and
/// the peers of established TCP sessions to local port 22 in this network namespace.
pub fn operator_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for var in ["SSH_CONNECTION", "SSH_CLIENT"] {
        if let Some(ip) = std::env::var(var)
            .ok()
            .and_then(|v| v.split_whitespace().next().and_then(|a| a.parse().ok()))
        {
            out.push(ip);
        }
    }
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            out.extend(ssh_peers(&text));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Peers of ESTABLISHED sessions to local port 22, from `/proc/net/tcp{,6}` text.
pub fn ssh_peers(proc_net_tcp: &str) -> Vec<IpAddr> {
    const ESTABLISHED: &str = "01";
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (f.get(1)?, f.get(2)?, f.get(3)?);
            if *state != ESTABLISHED {
                return None;
            }
            let (_, lport) = parse_endpoint(local)?;
            if lport != SSH_PORT {
                return None;
            }
            Some(parse_endpoint(remote)?.0)
        })
        .collect()
}

/// `0100007F:0016` (IPv4, each 32-bit word in host byte order) or the 32-hex-digit IPv6 form.
fn parse_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let ip = match words.as_slice() {
        [w] => IpAddr::from(w.to_ne_bytes()),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some((ip, port))
}

/// The first entry that would cut off an operator address, with that address.
pub fn would_lock_out(entries: &[Prefix], operators: &[IpAddr]) -> Option<(Prefix, IpAddr)> {
    entries.iter().find_map(|p| {
        operators
            .iter()
            .find(|a| p.contains(&Prefix::host(**a)))
            .map(|a| (*p, *a))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_ssh_peers_from_proc_net_tcp() {
        // 198.18.1.2:40000 → 198.18.1.1:22 established; a listener; a session to port 80.
        let v4 = "  sl  local_address rem_address   st\n\
           0: 00000000:0016 00000000:0000 0A 0\n\
           1: 010112C6:0016 020112C6:9C40 01 0\n\
           2: 010112C6:0050 030112C6:9C41 01 0\n";
        assert_eq!(ssh_peers(v4), vec!["198.18.1.2".parse::<IpAddr>().unwrap()]);
        // 2001:db8::2 → 2001:db8::1 port 22, as the kernel prints it (words in host order).
        let v6 = "  sl  local_address remote_address st\n\
           0: B80D0120000000000000000001000000:0016 B80D0120000000000000000002000000:C350 01 0\n";
        assert_eq!(
            ssh_peers(v6),
            vec!["2001:db8::2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn a_block_covering_the_operator_is_found() {
        let ops: Vec<IpAddr> = vec!["198.18.1.2".parse().unwrap()];
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        assert_eq!(
            would_lock_out(&[p("198.18.2.0/24"), p("198.18.0.0/16")], &ops),
            Some((p("198.18.0.0/16"), ops[0]))
        );
        assert_eq!(would_lock_out(&[p("198.18.2.0/24")], &ops), None);
    }
}
