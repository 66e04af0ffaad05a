//! Splits the parts of a request into the fields detection looks at: `name=value` pairs of a
//! query string or form body, cookies, and the strings of a JSON document. Each splitter is one
//! forward pass that borrows from its input.

/// Iterates over the `name=value` pairs of a query string or an
/// `application/x-www-form-urlencoded` body, still encoded. A pair without `=` is a name with
/// an empty value.
pub fn pairs(input: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    input
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| match memchr::memchr(b'=', pair) {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        })
}

/// Iterates over the `name=value` pairs of a `Cookie` header value.
pub fn cookies(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    header.split(|&b| b == b';').filter_map(|c| {
        let c = c.trim_ascii();
        if c.is_empty() {
            return None;
        }
        Some(match memchr::memchr(b'=', c) {
            Some(eq) => (c[..eq].trim_ascii(), c[eq + 1..].trim_ascii()),
            None => (&c[..0], c),
        })
    })
}

/// One string of a JSON document, as written between its quotes (escapes not yet decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonString<'a> {
    /// The bytes between the quotes.
    pub raw: &'a [u8],
    /// Whether `raw` holds a backslash, so escapes need decoding.
    pub escaped: bool,
    /// Whether the string is an object key (a `:` follows it).
    pub key: bool,
}

/// Most bytes of a name [`is_plain_name`] accepts.
pub const PLAIN_NAME_MAX: usize = 64;

/// Whether a parameter name or JSON key is a plain identifier (letters, digits, `_`, `-`, `.`,
/// `[`, `]`, at most [`PLAIN_NAME_MAX`] bytes): such a name carries nothing but a word, so it
/// need not be inspected.
pub fn is_plain_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= PLAIN_NAME_MAX
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'[' | b']'))
}

/// Iterates over every string (keys and values) of a JSON document in one pass. It does not
/// validate the document: what is not inside a string is skipped (numbers, booleans and `null`
/// carry no payload), and an unterminated string runs to the end of the input.
pub struct JsonStrings<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> JsonStrings<'a> {
    /// Starts scanning `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Self { input, pos: 0 }
    }
}

impl<'a> Iterator for JsonStrings<'a> {
    type Item = JsonString<'a>;

    fn next(&mut self) -> Option<JsonString<'a>> {
        let rest = self.input.get(self.pos..)?;
        let open = self.pos + memchr::memchr(b'"', rest)?;
        let mut i = open + 1;
        let mut escaped = false;
        loop {
            match memchr::memchr2(b'"', b'\\', &self.input[i..]) {
                Some(off) if self.input[i + off] == b'\\' => {
                    escaped = true;
                    i += off + 2;
                    if i >= self.input.len() {
                        i = self.input.len();
                        break;
                    }
                }
                Some(off) => {
                    i += off;
                    break;
                }
                None => {
                    i = self.input.len();
                    break;
                }
            }
        }
        let raw = &self.input[open + 1..i];
        self.pos = i + 1;
        let key = self
            .input
            .get(i + 1..)
            .and_then(|rest| rest.iter().find(|b| !b.is_ascii_whitespace()))
            == Some(&b':');
        Some(JsonString { raw, escaped, key })
    }
}

/// Decodes the escapes of a JSON string into `out` the way a JSON parser does (`\uXXXX` with
/// surrogate pairs, `\n`, `\"`, ...). Malformed escapes are kept as written.
pub fn json_unescape(raw: &[u8], out: &mut Vec<u8>) {
    super::decode::escapes(raw, out);
}

/// Iterates over the contents of the non-file parts of a `multipart/form-data` body
/// (`content_type` carries the boundary). Parts that carry a `filename` are uploads and are
/// skipped. Without a usable boundary the whole body is one part.
pub fn multipart_text_parts<'a>(body: &'a [u8], content_type: &str) -> MultipartParts<'a> {
    let boundary = content_type.split(';').find_map(|param| {
        let (k, v) = param.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    });
    match boundary {
        Some(b) if !b.is_empty() => MultipartParts {
            body,
            delimiter: Some(format!("--{b}").into_bytes()),
            pos: 0,
        },
        _ => MultipartParts {
            body,
            delimiter: None,
            pos: 0,
        },
    }
}

/// Iterator returned by [`multipart_text_parts`].
pub struct MultipartParts<'a> {
    body: &'a [u8],
    delimiter: Option<Vec<u8>>,
    pos: usize,
}

impl<'a> Iterator for MultipartParts<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let Some(delim) = &self.delimiter else {
            if self.pos == 0 && !self.body.is_empty() {
                self.pos = self.body.len();
                return Some(self.body);
            }
            return None;
        };
        loop {
            let rest = self.body.get(self.pos..)?;
            let start = memchr::memmem::find(rest, delim)? + delim.len();
            let after = &rest[start..];
            let len = memchr::memmem::find(after, delim).unwrap_or(after.len());
            self.pos += start + len;
            let part = &after[..len];
            if part.starts_with(b"--") {
                // The closing delimiter.
                self.pos = self.body.len() + 1;
                return None;
            }
            let Some(head_end) = memchr::memmem::find(part, b"\r\n\r\n") else {
                continue;
            };
            let head = &part[..head_end];
            let is_file = head
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"filename="));
            if is_file {
                continue;
            }
            let content = &part[head_end + 4..];
            return Some(content.strip_suffix(b"\r\n").unwrap_or(content));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs() {
        let got: Vec<_> = pairs(b"a=1&&b&c=x=y").collect();
        assert_eq!(
            got,
            vec![(&b"a"[..], &b"1"[..]), (b"b", b""), (b"c", b"x=y")]
        );
    }

    #[test]
    fn cookie_pairs() {
        let got: Vec<_> = cookies(b"sid=abc; theme = dark ;flag;").collect();
        assert_eq!(
            got,
            vec![
                (&b"sid"[..], &b"abc"[..]),
                (b"theme", b"dark"),
                (b"", b"flag")
            ]
        );
    }

    #[test]
    fn multipart_parts() {
        let body = b"--xy\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nhello\r\n--xy\r\n\
Content-Disposition: form-data; name=\"f\"; filename=\"x.png\"\r\n\r\n<binary>\r\n--xy--\r\n";
        let got: Vec<_> =
            multipart_text_parts(body, "multipart/form-data; boundary=\"xy\"").collect();
        assert_eq!(got, vec![&b"hello"[..]]);
        let got: Vec<_> = multipart_text_parts(b"raw", "multipart/form-data").collect();
        assert_eq!(got, vec![&b"raw"[..]]);
    }

    #[test]
    fn json_strings() {
        let doc = br#"{"name":"O\"Brien","n":[1,true,"x\\"],"bad":"unterminated"#;
        let keys: Vec<_> = JsonStrings::new(doc).map(|s| s.key).collect();
        assert_eq!(keys, vec![true, false, true, false, true, false]);
        let got: Vec<_> = JsonStrings::new(doc).map(|s| (s.raw, s.escaped)).collect();
        assert_eq!(
            got,
            vec![
                (&b"name"[..], false),
                (br#"O\"Brien"#, true),
                (b"n", false),
                (br"x\\", true),
                (b"bad", false),
                (b"unterminated", false),
            ]
        );
        assert_eq!(JsonStrings::new(b"\"a\\").count(), 1);
        assert_eq!(JsonStrings::new(b"").count(), 0);
    }
}
