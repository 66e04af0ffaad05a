//! IP addresses and CIDR prefixes as the operator writes them (`198.51.100.7`, `203.0.113.0/24`,
//! `2001:db8::/32`), parsed strictly with errors that name the input.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// Why a prefix did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    /// Not an address at all.
    #[error("invalid IP address or CIDR {input:?}")]
    Address {
        /// What was given.
        input: String,
    },
    /// The part after `/` is not a number in range.
    #[error("invalid prefix length in {input:?}: must be 0..={max}")]
    Length {
        /// What was given.
        input: String,
        /// 32 or 128.
        max: u8,
    },
    /// Bits set below the prefix length.
    #[error("{input:?} has host bits set; did you mean {suggestion}?")]
    HostBits {
        /// What was given.
        input: String,
        /// The network it probably meant.
        suggestion: Prefix,
    },
}

/// An IPv4 or IPv6 network: address with every bit below `len` zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// Build a prefix, zeroing the host bits.
    pub fn new_truncating(addr: IpAddr, len: u8) -> Self {
        let len = len.min(max_len(&addr));
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(len))),
        };
        Self { addr, len }
    }

    /// A single host (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: max_len(&addr),
        }
    }

    /// Network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length in bits.
    #[expect(
        clippy::len_without_is_empty,
        reason = "a prefix length, not a collection size"
    )]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// True for /0, which would match every source.
    pub fn is_everything(&self) -> bool {
        self.len == 0
    }

    /// True for /32 (IPv4) or /128 (IPv6).
    pub fn is_host(&self) -> bool {
        self.len == max_len(&self.addr)
    }

    /// True for IPv4.
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// `other` lies entirely inside `self`.
    pub fn contains(&self, other: &Prefix) -> bool {
        match (self.addr, other.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                other.len >= self.len && u32::from(b) & mask32(self.len) == u32::from(a)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                other.len >= self.len && u128::from(b) & mask128(self.len) == u128::from(a)
            }
            _ => false,
        }
    }
}

fn max_len(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl FromStr for Prefix {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Address {
            input: input.to_owned(),
        })?;
        // An IPv4-mapped IPv6 address is the IPv4 host it names.
        let (addr, shift) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), 96),
                None => (addr, 0),
            },
            v4 => (v4, 0),
        };
        let max = max_len(&addr);
        let len = match len {
            None => max,
            Some(l) => {
                let bad = || CidrError::Length {
                    input: input.to_owned(),
                    max: max + shift,
                };
                let l: u8 = l.parse().map_err(|_| bad())?;
                if l > max + shift || l < shift {
                    return Err(bad());
                }
                l - shift
            }
        };
        let prefix = Prefix::new_truncating(addr, len);
        if prefix.addr != addr {
            return Err(CidrError::HostBits {
                input: input.to_owned(),
                suggestion: prefix,
            });
        }
        Ok(prefix)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn parses_hosts_and_networks() {
        assert_eq!(p("198.51.100.7").to_string(), "198.51.100.7");
        assert!(p("198.51.100.7").is_host());
        assert_eq!(p("198.51.100.7/32").to_string(), "198.51.100.7");
        assert_eq!(p("203.0.113.0/24").len(), 24);
        assert_eq!(p("2001:db8::/32").to_string(), "2001:db8::/32");
        assert!(p("2001:db8::1").is_host());
        assert_eq!(p(" 10.0.0.0/8 ").to_string(), "10.0.0.0/8");
        assert!(p("0.0.0.0/0").is_everything());
    }

    #[test]
    fn ipv4_mapped_v6_is_the_v4_host() {
        assert_eq!(p("::ffff:198.51.100.7"), p("198.51.100.7"));
        assert_eq!(p("::ffff:198.51.100.0/120"), p("198.51.100.0/24"));
    }

    #[test]
    fn rejects_bad_input_naming_it() {
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4/33",
            "1.2.3.4/-1",
            "1.2.3.4/",
            "2001:db8::/129",
            "x/8",
            "1.2.3.4/8/8",
        ] {
            let err = bad.parse::<Prefix>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let err = "198.51.100.7/24".parse::<Prefix>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"198.51.100.7/24\" has host bits set; did you mean 198.51.100.0/24?"
        );
    }

    #[test]
    fn containment() {
        assert!(p("198.18.0.0/15").contains(&p("198.19.4.4")));
        assert!(!p("198.18.0.0/16").contains(&p("198.19.4.4")));
        assert!(p("0.0.0.0/0").contains(&p("203.0.113.0/24")));
        assert!(!p("203.0.113.0/24").contains(&p("203.0.0.0/16")));
        assert!(!p("::/0").contains(&p("1.2.3.4")));
        assert!(p("2001:db8::/32").contains(&p("2001:db8:1::5")));
    }
}

/// Property tests of prefix parsing.
///
/// Bound held: any string of up to 64 characters (any Unicode, or drawn from the characters of
/// addresses and prefixes) parses without panicking, to a prefix with no host bits or to an error
/// that quotes the input and is at most 160 bytes longer than the quoted input; every prefix
/// prints as text that parses back to it (IPv4-mapped IPv6 prefixes of /96 or longer come back
/// as the IPv4 prefix they name). 256 cases per property by default; `PROPTEST_CASES` raises it.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// Longest extra text an error adds around the quoted input.
    const ERROR_OVERHEAD_MAX: usize = 160;

    fn addrs() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            any::<u32>().prop_map(|a| IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped())),
        ]
    }

    fn prefixes() -> impl Strategy<Value = Prefix> {
        (addrs(), 0u8..=128).prop_map(|(a, len)| Prefix::new_truncating(a, len))
    }

    /// Prefixes shorter than a host.
    fn networks() -> impl Strategy<Value = Prefix> {
        prop_oneof![
            (any::<u32>(), 0u8..32)
                .prop_map(|(a, l)| Prefix::new_truncating(IpAddr::V4(a.into()), l)),
            (any::<u128>(), 0u8..128)
                .prop_map(|(a, l)| Prefix::new_truncating(IpAddr::V6(a.into()), l)),
        ]
    }

    /// Strings made of what addresses are made of, so many are near misses.
    fn near_misses() -> impl Strategy<Value = String> {
        "[0-9a-fA-F:./ x-]{0,64}"
    }

    fn check_parse(input: &str) -> Result<(), TestCaseError> {
        match input.parse::<Prefix>() {
            Ok(p) => {
                prop_assert_eq!(Prefix::new_truncating(p.addr(), p.len()), p);
                prop_assert!(p.len() <= max_len(&p.addr()), "{p}: length out of range");
                prop_assert!(p.addr().to_canonical() == p.addr(), "{p} is not normalised");
            }
            Err(e) => {
                let quoted = format!("{input:?}");
                let msg = e.to_string();
                prop_assert!(msg.contains(&quoted), "{msg} does not name {quoted}");
                prop_assert!(msg.len() <= quoted.len() + ERROR_OVERHEAD_MAX, "{msg}");
                if let CidrError::HostBits { suggestion, .. } = e {
                    prop_assert_eq!(suggestion.to_string().parse::<Prefix>(), Ok(suggestion));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn any_text_parses_or_names_itself(input in "\\PC{0,64}") {
            check_parse(&input)?;
        }

        #[test]
        fn near_misses_parse_or_name_themselves(input in near_misses()) {
            check_parse(&input)?;
        }

        /// Display then parse is the identity, up to IPv4-mapped normalisation.
        #[test]
        fn display_parses_back(p in prefixes()) {
            let back: Prefix = p.to_string().parse().map_err(|e| TestCaseError::fail(format!("{p}: {e}")))?;
            let want = match p.addr() {
                IpAddr::V6(a) if p.len() >= 96 => match a.to_ipv4_mapped() {
                    Some(v4) => Prefix::new_truncating(IpAddr::V4(v4), p.len() - 96),
                    None => p,
                },
                _ => p,
            };
            prop_assert_eq!(back, want);
            // And the text is stable from then on.
            prop_assert_eq!(back.to_string().parse::<Prefix>(), Ok(back));
        }

        /// Surrounding whitespace is ignored; a host has no `/len` in its text.
        #[test]
        fn whitespace_and_host_form(p in prefixes(), pre in "[ \t]{0,3}", post in "[ \t]{0,3}") {
            let text = p.to_string();
            prop_assert_eq!(format!("{pre}{text}{post}").parse::<Prefix>(), text.parse::<Prefix>());
            prop_assert_eq!(text.contains('/'), !p.is_host());
        }

        /// Setting any host bit is refused with the network it probably meant.
        #[test]
        fn host_bits_are_refused(p in networks(), bit in 0u32..128) {
            let max = u32::from(max_len(&p.addr()));
            prop_assume!(p.addr().to_canonical() == p.addr());
            let bit = bit % (max - u32::from(p.len()));
            let addr = match p.addr() {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) | 1 << bit)),
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) | 1 << bit)),
            };
            let input = format!("{addr}/{}", p.len());
            match input.parse::<Prefix>() {
                Err(CidrError::HostBits { suggestion, .. }) => prop_assert_eq!(suggestion, p),
                other => prop_assert!(false, "{input}: {other:?}"),
            }
        }
    }
}
