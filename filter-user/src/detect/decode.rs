//! Decoders that undo the encodings attackers wrap payloads in, and the bounded loop that
//! applies them.
//!
//! Every decoder is one forward pass that writes at most as many bytes as it reads, so a value
//! never grows while it is decoded and [`normalize`] costs at most `4 * MAX_ROUNDS` passes over
//! its input. [`Work`] counts the bytes read so tests can hold that bound without a clock.

/// Decoding rounds [`normalize`] applies at most (each round: percent, HTML entities, escapes,
/// Unicode folding). Three rounds undo triple encoding; attackers rarely go deeper because the
/// application itself decodes at most once or twice.
pub const MAX_ROUNDS: usize = 3;

/// Bytes read by the decoders, summed over passes: the work counter tests assert on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Input bytes read by every decoding pass so far.
    pub bytes: u64,
}

impl Work {
    fn add(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_add(n as u64);
    }
}

/// Whether `input` contains anything a decoder would change: lets the caller skip decoding for
/// the plain values that make up most traffic.
pub fn needs_decoding(input: &[u8], plus_as_space: bool) -> bool {
    input
        .iter()
        .any(|&b| matches!(b, b'%' | b'&' | b'\\') || b >= 0xC0 || (plus_as_space && b == b'+'))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Reads `n` hex digits at the start of `s`.
fn hex_n(s: &[u8], n: usize) -> Option<u32> {
    if s.len() < n {
        return None;
    }
    s[..n]
        .iter()
        .try_fold(0u32, |acc, &b| Some(acc << 4 | u32::from(hex(b)?)))
}

/// Appends `cp` as UTF-8; invalid code points (surrogates, out of range) become U+FFFD.
fn push_char(out: &mut Vec<u8>, cp: u32) {
    let c = char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER);
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// Percent-decodes `input` into `out`: `%XX`, IIS-style `%uXXXX`, and `+` as a space when
/// `plus_as_space` (query strings and forms). Malformed escapes stay as they are. Returns
/// whether anything changed.
pub fn percent(input: &[u8], plus_as_space: bool, out: &mut Vec<u8>) -> bool {
    let mut changed = false;
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            if let Some(v) = hex_n(&input[i + 1..], 2) {
                out.push(v as u8);
                i += 3;
                changed = true;
                continue;
            }
            if matches!(input.get(i + 1), Some(b'u' | b'U'))
                && let Some(cp) = hex_n(&input[i + 2..], 4)
            {
                // 6 bytes in, at most 3 out.
                push_char(out, cp);
                i += 6;
                changed = true;
                continue;
            }
        } else if b == b'+' && plus_as_space {
            out.push(b' ');
            i += 1;
            changed = true;
            continue;
        }
        out.push(b);
        i += 1;
    }
    changed
}

/// Named entities worth decoding: those that spell characters with meaning in HTML, SQL, shells
/// or paths. Each expands to fewer bytes than its name, which keeps decoding non-growing.
const ENTITIES: &[(&[u8], &[u8])] = &[
    (b"lt", b"<"),
    (b"gt", b">"),
    (b"amp", b"&"),
    (b"quot", b"\""),
    (b"apos", b"'"),
    (b"nbsp", b" "),
    (b"tab", b"\t"),
    (b"newline", b"\n"),
    (b"colon", b":"),
    (b"semi", b";"),
    (b"comma", b","),
    (b"period", b"."),
    (b"sol", b"/"),
    (b"bsol", b"\\"),
    (b"lpar", b"("),
    (b"rpar", b")"),
    (b"lsqb", b"["),
    (b"rsqb", b"]"),
    (b"lcub", b"{"),
    (b"rcub", b"}"),
    (b"equals", b"="),
    (b"excl", b"!"),
    (b"quest", b"?"),
    (b"num", b"#"),
    (b"dollar", b"$"),
    (b"percnt", b"%"),
    (b"ast", b"*"),
    (b"plus", b"+"),
    (b"grave", b"`"),
    (b"verbar", b"|"),
    (b"vert", b"|"),
    (b"hat", b"^"),
    (b"lowbar", b"_"),
    (b"commat", b"@"),
];

/// Entities browsers also accept without the closing `;`.
const LEGACY_NO_SEMICOLON: &[&[u8]] = &[b"lt", b"gt", b"amp", b"quot", b"nbsp"];

/// Longest entity name in [`ENTITIES`], the bound on how far a name is read.
const ENTITY_NAME_MAX: usize = 7;

/// Longest digit run read in a numeric reference: browsers accept leading zeros
/// (`&#0000060;`), so the run is consumed whole but only this many digits are kept.
const NUMERIC_DIGITS_MAX: usize = 8;

/// Decodes HTML character references into `out`: numeric (`&#60;`, `&#x3c;`, with or without
/// `;`, any leading zeros) and a table of named ones. Returns whether anything changed.
pub fn html_entities(input: &[u8], out: &mut Vec<u8>) -> bool {
    let mut changed = false;
    let mut i = 0;
    while i < input.len() {
        if input[i] != b'&' {
            out.push(input[i]);
            i += 1;
            continue;
        }
        if let Some(used) = numeric_reference(&input[i..], out) {
            i += used;
            changed = true;
            continue;
        }
        if let Some(used) = named_reference(&input[i..], out) {
            i += used;
            changed = true;
            continue;
        }
        out.push(b'&');
        i += 1;
    }
    changed
}

/// `s` starts with `&`. Decodes `&#...` and returns the bytes consumed.
fn numeric_reference(s: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    if s.get(1) != Some(&b'#') {
        return None;
    }
    let (radix, start) = match s.get(2) {
        Some(b'x' | b'X') => (16, 3),
        _ => (10, 2),
    };
    let mut j = start;
    let mut value: u32 = 0;
    let mut significant = 0;
    while j < s.len() {
        let Some(d) = (s[j] as char).to_digit(radix) else {
            break;
        };
        if value != 0 || d != 0 {
            significant += 1;
        }
        if significant <= NUMERIC_DIGITS_MAX {
            value = value * radix + d;
        } else {
            value = u32::MAX;
        }
        j += 1;
    }
    if j == start {
        return None;
    }
    if s.get(j) == Some(&b';') {
        j += 1;
    }
    // At least `&#N` (3 bytes) consumed; a code point is at most 4 bytes, and only values
    // from 0x10000 up (needing 5+ digits, so 7+ bytes consumed) take 4.
    push_char(out, if value == 0 { 0xFFFD } else { value });
    Some(j)
}

/// `s` starts with `&`. Decodes a named reference from [`ENTITIES`] and returns the bytes
/// consumed.
fn named_reference(s: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let name_end = s[1..]
        .iter()
        .take(ENTITY_NAME_MAX + 1)
        .position(|b| !b.is_ascii_alphabetic())
        .map_or(s.len().min(ENTITY_NAME_MAX + 2), |p| p + 1);
    let name = &s[1..name_end];
    let semicolon = s.get(name_end) == Some(&b';');
    for (entity, value) in ENTITIES {
        if name.eq_ignore_ascii_case(entity) {
            if !semicolon && !LEGACY_NO_SEMICOLON.contains(entity) {
                return None;
            }
            out.extend_from_slice(value);
            return Some(name_end + usize::from(semicolon));
        }
    }
    // Legacy references also match as a prefix: `&ltscript` is `<script`.
    if !semicolon {
        for entity in LEGACY_NO_SEMICOLON {
            if name.len() > entity.len() && name[..entity.len()].eq_ignore_ascii_case(entity) {
                let value = ENTITIES
                    .iter()
                    .find(|(e, _)| e == entity)
                    .map(|(_, v)| *v)?;
                out.extend_from_slice(value);
                return Some(1 + entity.len());
            }
        }
    }
    None
}

/// Decodes backslash escapes as JavaScript and JSON spell them into `out`: `\uXXXX` (with
/// surrogate pairs), `\u{X..}`, `\xHH`, `\n`, `\r`, `\t`, `\/`, `\\`, `\"`, `\'`. Other
/// backslashes stay, so Windows paths keep their separators. Returns whether anything changed.
pub fn escapes(input: &[u8], out: &mut Vec<u8>) -> bool {
    let mut changed = false;
    let mut i = 0;
    while i < input.len() {
        if input[i] != b'\\' || i + 1 >= input.len() {
            out.push(input[i]);
            i += 1;
            continue;
        }
        let rest = &input[i + 2..];
        let (used, decoded) = match input[i + 1] {
            b'u' | b'U' => unicode_escape(rest),
            b'x' | b'X' => match hex_n(rest, 2) {
                Some(v) => (4, Some(v)),
                None => (0, None),
            },
            b'n' => (2, Some(u32::from(b'\n'))),
            b'r' => (2, Some(u32::from(b'\r'))),
            b't' => (2, Some(u32::from(b'\t'))),
            c @ (b'/' | b'\\' | b'"' | b'\'') => (2, Some(u32::from(c))),
            _ => (0, None),
        };
        match decoded {
            Some(cp) => {
                push_char(out, cp);
                i += used;
                changed = true;
            }
            None => {
                out.push(b'\\');
                i += 1;
            }
        }
    }
    changed
}

/// `rest` follows `\u`. Returns (bytes consumed including `\u`, code point).
fn unicode_escape(rest: &[u8]) -> (usize, Option<u32>) {
    if rest.first() == Some(&b'{') {
        let digits = rest[1..]
            .iter()
            .take(7)
            .take_while(|b| hex(**b).is_some())
            .count();
        if (1..=6).contains(&digits) && rest.get(1 + digits) == Some(&b'}') {
            let cp = hex_n(&rest[1..], digits);
            return (2 + digits + 2, cp);
        }
        return (0, None);
    }
    let Some(hi) = hex_n(rest, 4) else {
        return (0, None);
    };
    if (0xD800..0xDC00).contains(&hi)
        && rest.get(4) == Some(&b'\\')
        && matches!(rest.get(5), Some(b'u' | b'U'))
        && let Some(lo) = hex_n(&rest[6..], 4)
        && (0xDC00..0xE000).contains(&lo)
    {
        let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
        return (12, Some(cp));
    }
    (6, Some(hi))
}

/// Folds spellings that parsers or file systems treat as ASCII back to ASCII: overlong UTF-8
/// (`C0 AE` is `.`), fullwidth forms (U+FF01..U+FF5E) and the slash look-alikes U+2215 and
/// U+2216. Returns whether anything changed.
pub fn fold_unicode(input: &[u8], out: &mut Vec<u8>) -> bool {
    let mut changed = false;
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if (b == 0xC0 || b == 0xC1) && i + 1 < input.len() {
            let next = input[i + 1];
            // Overlong two-byte form of an ASCII byte; a lone C0 before ASCII is dropped the
            // way lenient decoders do.
            let ascii = if next >= 0x80 {
                ((b & 0x01) << 6) | (next & 0x3F)
            } else {
                next
            };
            out.push(ascii);
            i += 2;
            changed = true;
            continue;
        }
        if b == 0xE0 && i + 2 < input.len() && input[i + 1] & 0xE0 == 0x80 {
            // Overlong three-byte form of an ASCII byte (E0 80 AE).
            let ascii = ((input[i + 1] & 0x01) << 6) | (input[i + 2] & 0x3F);
            out.push(ascii);
            i += 3;
            changed = true;
            continue;
        }
        if b == 0xEF && i + 2 < input.len() {
            let cp = (u32::from(b & 0x0F) << 12)
                | (u32::from(input[i + 1] & 0x3F) << 6)
                | u32::from(input[i + 2] & 0x3F);
            if input[i + 1] & 0xC0 == 0x80
                && input[i + 2] & 0xC0 == 0x80
                && (0xFF01..=0xFF5E).contains(&cp)
            {
                out.push((cp - 0xFEE0) as u8);
                i += 3;
                changed = true;
                continue;
            }
        }
        if b == 0xE2 && i + 2 < input.len() && input[i + 1] == 0x88 {
            let ascii = match input[i + 2] {
                0x95 => Some(b'/'),
                0x96 => Some(b'\\'),
                _ => None,
            };
            if let Some(a) = ascii {
                out.push(a);
                i += 3;
                changed = true;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    changed
}

/// Decodes `input` into `out` for up to [`MAX_ROUNDS`] rounds, stopping as soon as a round
/// changes nothing. `plus_as_space` applies to the first round only: after that a `+` is data
/// the client encoded on purpose. `tmp` is scratch space. Returns the rounds that changed
/// something.
pub fn normalize(
    input: &[u8],
    plus_as_space: bool,
    out: &mut Vec<u8>,
    tmp: &mut Vec<u8>,
    work: &mut Work,
) -> usize {
    out.clear();
    out.extend_from_slice(input);
    let mut rounds = 0;
    for round in 0..MAX_ROUNDS {
        let plus = plus_as_space && round == 0;
        if !needs_decoding(out, plus) {
            break;
        }
        let mut changed = false;
        tmp.clear();
        work.add(out.len());
        changed |= percent(out, plus, tmp);
        out.clear();
        work.add(tmp.len());
        changed |= html_entities(tmp, out);
        tmp.clear();
        work.add(out.len());
        changed |= escapes(out, tmp);
        out.clear();
        work.add(tmp.len());
        changed |= fold_unicode(tmp, out);
        if !changed {
            break;
        }
        rounds += 1;
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(s: &str, plus: bool) -> String {
        let (mut out, mut tmp, mut work) = (Vec::new(), Vec::new(), Work::default());
        normalize(s.as_bytes(), plus, &mut out, &mut tmp, &mut work);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn percent_forms() {
        assert_eq!(norm("a%20b+c", true), "a b c");
        assert_eq!(norm("a+b", false), "a+b");
        assert_eq!(norm("%253Cscript%253E", false), "<script>");
        assert_eq!(norm("%u003Cb%u003E", false), "<b>");
        assert_eq!(norm("100%", false), "100%");
        assert_eq!(norm("%zz%4", false), "%zz%4");
        // `+` from a decoded `%2B` is data, not a space.
        assert_eq!(norm("1%2B1", true), "1+1");
    }

    #[test]
    fn entity_forms() {
        assert_eq!(norm("&lt;img&gt;", false), "<img>");
        assert_eq!(norm("&#60;&#x3C;&#X3c;&#0000060", false), "<<<<");
        assert_eq!(norm("java&#x09;script&colon;", false), "java\tscript:");
        assert_eq!(norm("&ltscript", false), "<script");
        assert_eq!(
            norm("Tom &amp; Jerry &unknown; &", false),
            "Tom & Jerry &unknown; &"
        );
        assert_eq!(norm("AT&T", false), "AT&T");
    }

    #[test]
    fn escape_forms() {
        assert_eq!(norm(r"\u003cscript\u003e", false), "<script>");
        assert_eq!(norm(r"\x3c\u{3e}", false), "<>");
        assert_eq!(norm(r"\ud83d\ude00", false), "😀");
        assert_eq!(norm(r"C:\boot.ini", false), r"C:\boot.ini");
        assert_eq!(norm(r"a\nb", false), "a\nb");
    }

    #[test]
    fn unicode_folding() {
        assert_eq!(norm("%c0%ae%c0%ae%c0%af", false), "../");
        assert_eq!(norm("%uff0e%uff0e%u2215", false), "../");
        assert_eq!(norm("\u{FF1C}script\u{FF1E}", false), "<script>");
    }

    #[test]
    fn rounds_are_bounded() {
        // Four layers of encoding: three are undone, the fourth is left.
        assert_eq!(norm("%25252541", false), "%41");
        assert_eq!(norm("%252541", false), "A");
    }

    proptest! {
        #[test]
        fn decoders_never_grow_or_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (mut out, mut tmp, mut work) = (Vec::new(), Vec::new(), Work::default());
            normalize(&input, true, &mut out, &mut tmp, &mut work);
            prop_assert!(out.len() <= input.len());
            prop_assert!(work.bytes <= (4 * MAX_ROUNDS * input.len()) as u64);
            let mut o = Vec::new();
            percent(&input, true, &mut o);
            prop_assert!(o.len() <= input.len());
            for f in [html_entities as fn(&[u8], &mut Vec<u8>) -> bool, escapes, fold_unicode] {
                let mut o = Vec::new();
                f(&input, &mut o);
                prop_assert!(o.len() <= input.len());
            }
        }

        #[test]
        fn encoding_alphabet_never_grows(input in "[%&#;xXuU0-9a-fA-F\\\\{}+c.]{0,256}") {
            let (mut out, mut tmp, mut work) = (Vec::new(), Vec::new(), Work::default());
            normalize(input.as_bytes(), true, &mut out, &mut tmp, &mut work);
            prop_assert!(out.len() <= input.len());
            prop_assert!(work.bytes <= (4 * MAX_ROUNDS * input.len()) as u64);
        }
    }
}
