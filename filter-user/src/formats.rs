//! Blocklist file formats: plain (one IP or CIDR per line), FireHOL netset, and Spamhaus DROP in
//! both its text and JSON-lines forms. Parsing is strict: a bad line is an error naming its line.

use serde::Deserialize;

use crate::cidr::Prefix;

/// A list format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Recognise the format from the content.
    #[default]
    Auto,
    /// One IP or CIDR per line; `#` and `;` start comments.
    Plain,
    /// FireHOL netset: plain with `#` header comments.
    Netset,
    /// Spamhaus DROP: text (`1.2.3.0/24 ; SBL123`) or JSON lines (`{"cidr":"1.2.3.0/24",...}`).
    Spamhaus,
}

/// A line that did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{source_name}:{line}: {reason}")]
pub struct FormatError {
    /// File name (or `-`).
    pub source_name: String,
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub reason: String,
}

#[derive(Deserialize)]
struct SpamhausJson {
    cidr: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Parse one line into a prefix; `Ok(None)` for blank lines, comments and metadata records.
pub fn parse_line(format: Format, line: &str) -> Result<Option<Prefix>, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.starts_with('{') && matches!(format, Format::Auto | Format::Spamhaus) {
        let rec: SpamhausJson =
            serde_json::from_str(trimmed).map_err(|e| format!("invalid JSON record: {e}"))?;
        return match (rec.cidr, rec.kind.as_deref()) {
            (Some(cidr), _) => cidr
                .parse()
                .map(Some)
                .map_err(|e: crate::cidr::CidrError| e.to_string()),
            (None, Some("metadata")) => Ok(None),
            (None, _) => Err("JSON record without \"cidr\"".into()),
        };
    }
    let content = trimmed.split(['#', ';']).next().unwrap_or("").trim();
    if content.is_empty() {
        return Ok(None);
    }
    // Some lists append fields after the address ("1.2.3.4 tab comment"): take the first token.
    let token = content.split_whitespace().next().unwrap_or(content);
    token
        .parse()
        .map(Some)
        .map_err(|e: crate::cidr::CidrError| e.to_string())
}

/// Parse a whole list. Stops at the first `max_errors` bad lines and returns them all.
pub fn parse_all(
    format: Format,
    source_name: &str,
    text: &str,
    max_errors: usize,
) -> Result<Vec<Prefix>, Vec<FormatError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    // Lists saved by Windows tools start with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, line) in text.lines().enumerate() {
        match parse_line(format, line) {
            Ok(Some(p)) => out.push(p),
            Ok(None) => {}
            Err(reason) => {
                errors.push(FormatError {
                    source_name: source_name.to_owned(),
                    line: i + 1,
                    reason,
                });
                if errors.len() >= max_errors {
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_with_comments() {
        let text = "# header\n198.18.0.1\n\n198.18.1.0/24 # scanner\n; semicolon comment\n2001:db8::/32\n198.18.2.2\tsome note\n";
        let got = parse_all(Format::Auto, "t", text, 10).unwrap();
        let want: Vec<Prefix> = ["198.18.0.1", "198.18.1.0/24", "2001:db8::/32", "198.18.2.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn spamhaus_text_and_json() {
        let text = "; Spamhaus DROP List\n1.10.16.0/20 ; SBL256894\n";
        assert_eq!(
            parse_all(Format::Spamhaus, "t", text, 10).unwrap(),
            vec!["1.10.16.0/20".parse().unwrap()]
        );
        let json = "{\"cidr\":\"1.10.16.0/20\",\"sblid\":\"SBL256894\",\"rir\":\"apnic\"}\n{\"type\":\"metadata\",\"timestamp\":1700000000,\"size\":1,\"records\":1}\n";
        assert_eq!(
            parse_all(Format::Auto, "t", json, 10).unwrap(),
            vec!["1.10.16.0/20".parse().unwrap()]
        );
    }

    #[test]
    fn netset_with_crlf_and_a_byte_order_mark() {
        let text = "\u{feff}#\r\n# FireHOL netset\r\n#\r\n198.18.0.0/16\r\n2001:db8::1\r\n";
        let got = parse_all(Format::Netset, "t", text, 10).unwrap();
        assert_eq!(
            got,
            vec![
                "198.18.0.0/16".parse().unwrap(),
                "2001:db8::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn errors_stop_at_the_cap() {
        let garbage = "<html>\n".repeat(10_000);
        let errs = parse_all(Format::Auto, "t", &garbage, 10).unwrap_err();
        assert_eq!(errs.len(), 10);
    }

    #[test]
    fn bad_lines_are_named() {
        let errs = parse_all(
            Format::Plain,
            "list.txt",
            "198.18.0.1\nnot-an-ip\n198.18.0.300\n",
            10,
        )
        .unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].line, 2);
        assert!(
            errs[0].to_string().starts_with("list.txt:2: "),
            "{}",
            errs[0]
        );
        assert!(errs[1].to_string().contains("198.18.0.300"));
        let errs = parse_all(Format::Auto, "j", "{\"cidr\": 5}\n", 10).unwrap_err();
        assert!(errs[0].reason.contains("invalid JSON"));
    }
}

/// Property tests of the list formats.
///
/// Bound held: any line of up to 200 characters, in every format, parses without panicking; a
/// prefix written with any surrounding whitespace, comment or trailing field (plain, netset,
/// Spamhaus text) or as a Spamhaus JSON record comes back as that prefix; a line that is not an
/// address is refused with an error quoting it; and a whole list of up to 64 lines yields at most
/// one prefix per line and at most `max_errors` errors, each naming its source and a line that
/// exists. 256 cases per property by default; `PROPTEST_CASES` raises it.
#[cfg(test)]
mod proptests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use super::*;

    const FORMATS: [Format; 4] = [
        Format::Auto,
        Format::Plain,
        Format::Netset,
        Format::Spamhaus,
    ];

    fn prefixes() -> impl Strategy<Value = Prefix> {
        prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, l)| Prefix::new_truncating(IpAddr::V4(a.into()), l)),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, l)| Prefix::new_truncating(IpAddr::V6(a.into()), l)),
        ]
    }

    /// Lines that look like list lines, and lines that are anything at all.
    fn lines() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,200}",
            "[0-9a-f:./ #;{}\"\t,a-z]{0,200}",
            (prefixes(), "[ \t]{0,2}[#;]?[ -~]{0,30}").prop_map(|(p, tail)| format!("{p}{tail}")),
        ]
    }

    proptest! {
        #[test]
        fn any_line_parses_or_fails_cleanly(line in lines()) {
            for format in FORMATS {
                if let Ok(Some(p)) = parse_line(format, &line) {
                    // Whatever comes out is a prefix the CLI would accept as typed.
                    prop_assert_eq!(p.to_string().parse::<Prefix>(), Ok(p));
                }
            }
        }

        #[test]
        fn written_prefixes_come_back(
            p in prefixes(),
            lead in "[ \t]{0,3}",
            tail in prop_oneof![
                Just(String::new()),
                "[ \t]{1,3}",
                "[ \t]*[#;][ -~]{0,30}",
                "[ \t]{1,3}[!-~&&[^#;]]{1,12}",
            ],
        ) {
            let p = p.to_string().parse::<Prefix>().expect("normalised");
            let line = format!("{lead}{p}{tail}");
            for format in FORMATS {
                prop_assert_eq!(parse_line(format, &line), Ok(Some(p)), "{:?}: {:?}", format, line);
            }
            let json = format!("{{\"cidr\":\"{p}\",\"sblid\":\"SBL1\",\"rir\":\"ripencc\"}}");
            for format in [Format::Auto, Format::Spamhaus] {
                prop_assert_eq!(parse_line(format, &json), Ok(Some(p)));
            }
        }

        #[test]
        fn garbage_is_refused_naming_it(token in "[g-zG-Z!-\"$-*<-@\\[-`|~][!-~&&[^#;]]{0,30}") {
            for format in FORMATS {
                match parse_line(format, &token) {
                    Err(e) => prop_assert!(e.contains(&format!("{token:?}")), "{:?}: {}", format, e),
                    Ok(v) => prop_assert!(false, "{:?} accepted {:?} as {:?}", format, token, v),
                }
            }
        }

        #[test]
        fn whole_lists_are_bounded(
            lines in proptest::collection::vec(lines(), 0..64),
            max_errors in 1usize..8,
        ) {
            let text = lines.join("\n");
            let count = text.lines().count();
            for format in FORMATS {
                match parse_all(format, "feed.txt", &text, max_errors) {
                    Ok(prefixes) => prop_assert!(prefixes.len() <= count),
                    Err(errors) => {
                        prop_assert!(!errors.is_empty() && errors.len() <= max_errors);
                        for e in &errors {
                            prop_assert!((1..=count).contains(&e.line));
                            let shown = e.to_string();
                            let prefix = format!("feed.txt:{}: ", e.line);
                            prop_assert!(shown.starts_with(&prefix), "{}", shown);
                        }
                    }
                }
            }
        }
    }
}
