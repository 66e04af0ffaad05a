//! The detection rules run on one decoded field: libinjection for SQL injection and XSS, and
//! this module's own rules for path traversal, command injection and the SQLi/XSS shapes
//! libinjection does not flag.
//!
//! Every rule works on one of three views of the field, each built in one pass:
//! - the decoded text itself (libinjection, traversal);
//! - the *canonical* text: ASCII lowercase, SQL block comments and whitespace runs turned into
//!   one space (a newline when the run held one, since shells treat it as a separator);
//! - the *compact* text: canonical without any whitespace, for `java\tscript:`-style splits.
//!
//! Keyword rules find their keywords with Aho-Corasick automata (leftmost-longest, linear in
//! the text) and then check a context window of at most [`WINDOW`] bytes around each match, so
//! a field of `n` bytes costs `O(n)`.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};

use super::Category;

/// Most bytes a rule reads around one keyword match.
pub const WINDOW: usize = 256;

/// Most bytes of one field handed to libinjection. Its SQL tokenizer reads a bounded number of
/// tokens from the start, and its HTML tokenizer is linear, but neither exposes a work bound, so
/// the field is cut here; this module's own rules still see the whole field.
pub const LIBINJECTION_MAX: usize = 8 * 1024;

/// A rule that fired on a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// What kind of attack the rule detects.
    pub category: Category,
    /// Stable rule id, e.g. `sqli.union_select`.
    pub rule: &'static str,
    /// How much the hit adds to the request's score.
    pub score: u32,
}

/// Which categories to run, as a small copyable set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enabled {
    /// SQL injection.
    pub sqli: bool,
    /// Cross-site scripting.
    pub xss: bool,
    /// Path traversal.
    pub traversal: bool,
    /// Command injection (shell, code evaluation, template injection).
    pub cmd: bool,
}

impl Enabled {
    fn on(self, c: Category) -> bool {
        match c {
            Category::Sqli => self.sqli,
            Category::Xss => self.xss,
            Category::Traversal => self.traversal,
            Category::CmdInjection => self.cmd,
        }
    }
}

/// Score of a hit that alone is evidence of an attack; the default threshold.
pub const STRONG: u32 = 5;
/// Score of a hit that needs another one to reach the default threshold.
pub const WEAK: u32 = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Left {
    Any,
    /// Not preceded by a letter, digit or `_`.
    Word,
    /// As `Word`, and not preceded by `.` either (so `time.sleep(` is a method call).
    WordNoDot,
    /// Preceded by `(`, `,`, `=` or `[`: a name used as a value.
    ValueStart,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Right {
    Any,
    /// Not followed by a letter, digit or `_`.
    Word,
    /// Followed, after optional spaces, by `(`.
    Call,
    /// Followed by `(` or a backtick (tagged template call).
    CallOrTick,
    /// Followed by `)`, `,`, `]` or `;`: a name used as a value.
    ValueEnd,
}

/// A keyword signature on the canonical text.
struct Sig {
    pat: &'static str,
    category: Category,
    rule: &'static str,
    score: u32,
    left: Left,
    right: Right,
}

const fn sig(
    pat: &'static str,
    category: Category,
    rule: &'static str,
    score: u32,
    left: Left,
    right: Right,
) -> Sig {
    Sig {
        pat,
        category,
        rule,
        score,
        left,
        right,
    }
}

use Category::{CmdInjection as C, Sqli as S, Traversal as T, Xss as X};
use Left::{Any as LA, Word as LW, WordNoDot as LN};
use Right::{Any as RA, Call as RC, CallOrTick as RT, Word as RW};

/// Keyword signatures on the canonical text.
const SIGS: &[Sig] = &[
    // SQL injection
    sig("union select", S, "sqli.union_select", STRONG, LW, RW),
    sig("union all select", S, "sqli.union_select", STRONG, LW, RW),
    sig(
        "union distinct select",
        S,
        "sqli.union_select",
        STRONG,
        LW,
        RW,
    ),
    sig("union(select", S, "sqli.union_select", STRONG, LW, RA),
    sig("union (select", S, "sqli.union_select", STRONG, LW, RA),
    sig("benchmark", S, "sqli.time_function", STRONG, LN, RC),
    sig("sleep", S, "sqli.time_function", STRONG, LN, RC),
    sig("pg_sleep", S, "sqli.time_function", STRONG, LW, RC),
    sig("waitfor delay", S, "sqli.time_function", STRONG, LW, RW),
    sig("waitfor time", S, "sqli.time_function", STRONG, LW, RW),
    sig(
        "dbms_pipe.receive_message",
        S,
        "sqli.time_function",
        STRONG,
        LW,
        RA,
    ),
    sig("dbms_lock.sleep", S, "sqli.time_function", STRONG, LW, RA),
    sig("extractvalue", S, "sqli.error_function", STRONG, LN, RC),
    sig("updatexml", S, "sqli.error_function", STRONG, LN, RC),
    sig(
        "utl_inaddr.get_host",
        S,
        "sqli.error_function",
        STRONG,
        LW,
        RA,
    ),
    sig("ctxsys.drithsx", S, "sqli.error_function", STRONG, LW, RA),
    sig("floor(rand(", S, "sqli.error_function", STRONG, LW, RA),
    sig("information_schema", S, "sqli.schema", STRONG, LA, RA),
    sig("sysobjects", S, "sqli.schema", STRONG, LW, RW),
    sig("syscolumns", S, "sqli.schema", STRONG, LW, RW),
    sig("sqlite_master", S, "sqli.schema", STRONG, LW, RW),
    sig("msysobjects", S, "sqli.schema", STRONG, LW, RW),
    sig("mysql.user", S, "sqli.schema", STRONG, LW, RW),
    sig("pg_shadow", S, "sqli.schema", STRONG, LW, RW),
    sig("all_tables", S, "sqli.schema", WEAK, LW, RW),
    sig("@@version", S, "sqli.variable", STRONG, LA, RA),
    sig("@@", S, "sqli.variable", WEAK, LA, RA),
    sig("into outfile", S, "sqli.file", STRONG, LW, RW),
    sig("into dumpfile", S, "sqli.file", STRONG, LW, RW),
    sig("load_file", S, "sqli.file", STRONG, LW, RC),
    sig("xp_cmdshell", S, "sqli.procedure", STRONG, LA, RA),
    sig("sp_executesql", S, "sqli.procedure", STRONG, LA, RA),
    sig("sp_oacreate", S, "sqli.procedure", STRONG, LA, RA),
    sig("xp_regread", S, "sqli.procedure", STRONG, LA, RA),
    sig("exec master", S, "sqli.procedure", STRONG, LW, RA),
    sig("drop table", S, "sqli.statement", WEAK, LW, RW),
    sig("order by 0", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 1", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 2", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 3", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 4", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 5", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 6", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 7", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 8", S, "sqli.order_by", WEAK, LW, RA),
    sig("order by 9", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 0", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 1", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 2", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 3", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 4", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 5", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 6", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 7", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 8", S, "sqli.order_by", WEAK, LW, RA),
    sig("group by 9", S, "sqli.order_by", WEAK, LW, RA),
    // Cross-site scripting
    sig("<script", X, "xss.script_tag", STRONG, LA, RW),
    sig("</script", X, "xss.script_tag", STRONG, LA, RW),
    sig("<iframe", X, "xss.active_tag", STRONG, LA, RW),
    sig("<frame", X, "xss.active_tag", STRONG, LA, RW),
    sig("<frameset", X, "xss.active_tag", STRONG, LA, RW),
    sig("<object", X, "xss.active_tag", STRONG, LA, RW),
    sig("<embed", X, "xss.active_tag", STRONG, LA, RW),
    sig("<applet", X, "xss.active_tag", STRONG, LA, RW),
    sig("<meta", X, "xss.active_tag", STRONG, LA, RW),
    sig("<base", X, "xss.active_tag", STRONG, LA, RW),
    sig("<isindex", X, "xss.active_tag", STRONG, LA, RW),
    sig("<import", X, "xss.active_tag", STRONG, LA, RW),
    // Markup that restructures the page or captures input (HTML injection).
    sig("<form", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<input", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<textarea", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<button", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<xmp", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<plaintext", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<noscript", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<html", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<body", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<head", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<title", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<marquee", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<keygen", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<dialog", X, "xss.markup_injection", STRONG, LA, RW),
    sig("<layer", X, "xss.active_tag", STRONG, LA, RW),
    sig("<ilayer", X, "xss.active_tag", STRONG, LA, RW),
    sig("<bgsound", X, "xss.active_tag", STRONG, LA, RW),
    sig("<!entity", X, "xss.markup_declaration", STRONG, LA, RW),
    sig("<!attlist", X, "xss.markup_declaration", STRONG, LA, RW),
    sig("<!--[if", X, "xss.markup_declaration", STRONG, LA, RA),
    sig("<![endif]", X, "xss.markup_declaration", STRONG, LA, RA),
    sig("+adw-", X, "xss.utf7", STRONG, LA, RA),
    sig("activexobject", X, "xss.js_call", STRONG, LW, RW),
    sig("<%", X, "xss.server_tag", WEAK, LA, RA),
    sig("<? ", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("<svg", X, "xss.active_tag", WEAK, LA, RW),
    sig("<math", X, "xss.active_tag", WEAK, LA, RW),
    sig("<style", X, "xss.active_tag", WEAK, LA, RW),
    sig("<link", X, "xss.active_tag", WEAK, LA, RW),
    sig("<xml", X, "xss.active_tag", WEAK, LA, RW),
    sig("alert", X, "xss.js_call", STRONG, LN, RT),
    sig("prompt", X, "xss.js_call", STRONG, LN, RT),
    sig("confirm", X, "xss.js_call", STRONG, LN, RT),
    sig(
        "alert",
        X,
        "xss.js_call",
        STRONG,
        Left::ValueStart,
        Right::ValueEnd,
    ),
    sig(
        "prompt",
        X,
        "xss.js_call",
        STRONG,
        Left::ValueStart,
        Right::ValueEnd,
    ),
    sig(
        "confirm",
        X,
        "xss.js_call",
        STRONG,
        Left::ValueStart,
        Right::ValueEnd,
    ),
    sig("fromcharcode", X, "xss.js_call", STRONG, LA, RC),
    sig("document.cookie", X, "xss.js_call", STRONG, LW, RA),
    sig("document.domain", X, "xss.js_call", STRONG, LW, RA),
    sig("document.write", X, "xss.js_call", STRONG, LW, RC),
    sig("document.location", X, "xss.js_call", WEAK, LW, RA),
    sig("window.location", X, "xss.js_call", WEAK, LW, RA),
    sig(".innerhtml", X, "xss.js_call", WEAK, LA, RW),
    sig("top[", X, "xss.js_call", STRONG, LW, RA),
    sig("self[", X, "xss.js_call", STRONG, LW, RA),
    sig("window[", X, "xss.js_call", STRONG, LW, RA),
    sig("parent[", X, "xss.js_call", STRONG, LW, RA),
    sig("frames[", X, "xss.js_call", STRONG, LW, RA),
    // Command injection: code evaluation and template injection
    sig("() {", C, "cmdi.shellshock", STRONG, LA, RA),
    sig("(){", C, "cmdi.shellshock", STRONG, LA, RA),
    sig("/bin/sh", C, "cmdi.shell_path", STRONG, LA, RW),
    sig("/bin/bash", C, "cmdi.shell_path", STRONG, LA, RW),
    sig("/bin/zsh", C, "cmdi.shell_path", STRONG, LA, RW),
    sig("/bin/ksh", C, "cmdi.shell_path", STRONG, LA, RW),
    sig("/dev/tcp/", C, "cmdi.shell_path", STRONG, LA, RA),
    sig("/dev/udp/", C, "cmdi.shell_path", STRONG, LA, RA),
    sig("cmd.exe", C, "cmdi.shell_path", STRONG, LW, RW),
    sig("cmd /c", C, "cmdi.shell_path", STRONG, LW, RW),
    sig("/bin/", C, "cmdi.shell_path", WEAK, LA, RA),
    sig("/usr/bin/", C, "cmdi.shell_path", WEAK, LA, RA),
    sig("system", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("exec", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("shell_exec", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("passthru", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("popen", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("proc_open", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("pcntl_exec", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("phpinfo", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("phpversion", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("<!--#exec", C, "cmdi.ssi", STRONG, LA, RA),
    sig("<!--#include", C, "cmdi.ssi", STRONG, LA, RA),
    sig("eval", C, "cmdi.code_exec", STRONG, LN, RC),
    sig("<?php", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("<?=", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("${@", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("{${", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("$_get[", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("$_post[", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("$_server[", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("$_request[", C, "cmdi.code_exec", STRONG, LA, RA),
    sig("__class__", C, "cmdi.template", STRONG, LA, RA),
    sig("__globals__", C, "cmdi.template", STRONG, LA, RA),
    sig("__subclasses__", C, "cmdi.template", STRONG, LA, RA),
    // Path traversal targets; the dot-segment rule is its own scanner.
    sig("etc/passwd", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig("etc/shadow", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig("etc\\passwd", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig("etc\\shadow", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig("etc/hosts", T, "traversal.sensitive_file", STRONG, LA, RW),
    sig("etc/group", T, "traversal.sensitive_file", STRONG, LA, RW),
    sig("etc/issue", T, "traversal.sensitive_file", STRONG, LA, RW),
    sig("proc/self/", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig("win.ini", T, "traversal.sensitive_file", STRONG, LW, RW),
    sig("boot.ini", T, "traversal.sensitive_file", STRONG, LW, RW),
    sig("system.ini", T, "traversal.sensitive_file", STRONG, LW, RW),
    sig("system32", T, "traversal.sensitive_file", STRONG, LA, RW),
    sig("repair\\sam", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig("repair/sam", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig(".htaccess", T, "traversal.sensitive_file", STRONG, LA, RW),
    sig(".htpasswd", T, "traversal.sensitive_file", STRONG, LA, RW),
    sig("web.config", T, "traversal.sensitive_file", STRONG, LW, RW),
    sig("web-inf/", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig("global.asa", T, "traversal.sensitive_file", STRONG, LW, RW),
    sig(".ssh/", T, "traversal.sensitive_file", STRONG, LA, RA),
    sig("id_rsa", T, "traversal.sensitive_file", STRONG, LW, RW),
    sig(
        "wp-config.php",
        T,
        "traversal.sensitive_file",
        STRONG,
        LW,
        RW,
    ),
    sig("inetpub", T, "traversal.sensitive_file", WEAK, LW, RW),
];

/// URI schemes and CSS tricks, matched on the compact text.
const COMPACT_SIGS: &[(&str, &str)] = &[
    ("javascript:", "xss.script_uri"),
    ("vbscript:", "xss.script_uri"),
    ("livescript:", "xss.script_uri"),
    ("mocha:", "xss.script_uri"),
    ("data:text/html", "xss.script_uri"),
    ("data:image/svg+xml", "xss.script_uri"),
    ("expression(", "xss.css_expression"),
    ("-moz-binding", "xss.css_expression"),
    ("behavior:url(", "xss.css_expression"),
    ("srcdoc=", "xss.active_attribute"),
    ("formaction=", "xss.active_attribute"),
];

/// How a command name reads in ordinary text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// Not an English word: its name alone is evidence (`whoami`, `ifconfig`).
    Distinct,
    /// Also an English word or abbreviation (`cat`, `type`, `sleep`): only counts when every
    /// token after it reads as a shell argument.
    Word,
    /// As `Word`, and a bare number is a telling argument (`sleep 5`, `ping 10.0.0.1`).
    Timing,
    /// Takes a command name as its argument (`which nc`, `sudo id`).
    Lookup,
    /// A Windows tool whose first argument is one of these subcommands (`net user`).
    Sub(&'static [&'static str]),
}

/// Shell and Windows commands attackers run to probe or take over a host.
const COMMANDS: &[(&str, Cmd)] = &[
    ("whoami", Cmd::Distinct),
    ("uname", Cmd::Distinct),
    ("ifconfig", Cmd::Distinct),
    ("ipconfig", Cmd::Distinct),
    ("netstat", Cmd::Distinct),
    ("systeminfo", Cmd::Distinct),
    ("sysinfo", Cmd::Distinct),
    ("nslookup", Cmd::Distinct),
    ("netsh", Cmd::Distinct),
    ("powershell", Cmd::Distinct),
    ("wget", Cmd::Distinct),
    ("ncat", Cmd::Distinct),
    ("netcat", Cmd::Distinct),
    ("tasklist", Cmd::Distinct),
    ("wmic", Cmd::Distinct),
    ("certutil", Cmd::Distinct),
    ("bitsadmin", Cmd::Distinct),
    ("mshta", Cmd::Distinct),
    ("rundll32", Cmd::Distinct),
    ("regsvr32", Cmd::Distinct),
    ("crontab", Cmd::Distinct),
    ("chmod", Cmd::Distinct),
    ("chown", Cmd::Distinct),
    ("nmap", Cmd::Distinct),
    ("socat", Cmd::Distinct),
    ("id", Cmd::Word),
    ("ls", Cmd::Word),
    ("dir", Cmd::Word),
    ("pwd", Cmd::Word),
    ("cat", Cmd::Word),
    ("type", Cmd::Word),
    ("echo", Cmd::Word),
    ("curl", Cmd::Word),
    ("nc", Cmd::Word),
    ("sh", Cmd::Word),
    ("bash", Cmd::Word),
    ("zsh", Cmd::Word),
    ("perl", Cmd::Word),
    ("python", Cmd::Word),
    ("python3", Cmd::Word),
    ("php", Cmd::Word),
    ("ruby", Cmd::Word),
    ("node", Cmd::Word),
    ("rm", Cmd::Word),
    ("cp", Cmd::Word),
    ("mv", Cmd::Word),
    ("touch", Cmd::Word),
    ("kill", Cmd::Word),
    ("ps", Cmd::Word),
    ("env", Cmd::Word),
    (
        "net",
        Cmd::Sub(&[
            "user",
            "localgroup",
            "group",
            "view",
            "share",
            "use",
            "start",
            "stop",
            "session",
        ]),
    ),
    (
        "reg",
        Cmd::Sub(&["add", "query", "delete", "save", "export", "import"]),
    ),
    (
        "sc",
        Cmd::Sub(&["query", "create", "config", "start", "stop", "delete"]),
    ),
    ("route", Cmd::Word),
    ("head", Cmd::Word),
    ("tail", Cmd::Word),
    ("more", Cmd::Word),
    ("less", Cmd::Word),
    ("grep", Cmd::Word),
    ("find", Cmd::Word),
    ("awk", Cmd::Word),
    ("sed", Cmd::Word),
    ("xargs", Cmd::Word),
    ("base64", Cmd::Word),
    ("hostname", Cmd::Word),
    ("which", Cmd::Lookup),
    ("whereis", Cmd::Lookup),
    ("sudo", Cmd::Lookup),
    ("su", Cmd::Word),
    ("telnet", Cmd::Word),
    ("ssh", Cmd::Word),
    ("ftp", Cmd::Word),
    ("tftp", Cmd::Word),
    ("nohup", Cmd::Lookup),
    ("shutdown", Cmd::Word),
    ("reboot", Cmd::Word),
    ("del", Cmd::Word),
    ("copy", Cmd::Word),
    ("start", Cmd::Word),
    ("ping", Cmd::Timing),
    ("sleep", Cmd::Timing),
    ("timeout", Cmd::Timing),
];

/// Reusable buffers for one field's views, kept per thread so inspection does not allocate.
#[derive(Debug, Default)]
pub struct Scratch {
    canon: Vec<u8>,
    compact: Vec<u8>,
    path: Vec<u8>,
}

/// The compiled rules; built once, shared by every request.
#[derive(Debug)]
pub struct Rules {
    sigs: AhoCorasick,
    compact: AhoCorasick,
    commands: AhoCorasick,
    sql_gate: AhoCorasick,
    /// For each signature, the signatures with the same keyword (itself included): the
    /// automaton reports a keyword once, under its first signature.
    same_keyword: Vec<Vec<usize>>,
}

impl Rules {
    /// Compiles the automata.
    pub fn new() -> Self {
        let build = |pats: Vec<&str>| {
            AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .kind(Some(AhoCorasickKind::DFA))
                // Short keywords make prefilters report many false candidates; the DFA alone
                // is faster on field-sized texts.
                .prefilter(false)
                .build(pats)
                .unwrap_or_else(|e| unreachable!("static patterns compile: {e}"))
        };
        Self {
            sigs: build(SIGS.iter().map(|s| s.pat).collect()),
            same_keyword: SIGS
                .iter()
                .map(|s| (0..SIGS.len()).filter(|&j| SIGS[j].pat == s.pat).collect())
                .collect(),
            compact: build(COMPACT_SIGS.iter().map(|s| s.0).collect()),
            commands: build(COMMANDS.iter().map(|c| c.0).collect()),
            sql_gate: AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostFirst)
                .kind(Some(AhoCorasickKind::DFA))
                // Short keywords make prefilters report many false candidates; the DFA alone
                // is faster on field-sized texts.
                .prefilter(false)
                .build(SQL_GATE)
                .unwrap_or_else(|e| unreachable!("static patterns compile: {e}")),
        }
    }

    /// Runs every enabled rule on `text` (one decoded field) and reports each hit to `emit`
    /// (a rule may be reported more than once; the caller de-duplicates).
    pub fn scan(
        &self,
        text: &[u8],
        enabled: Enabled,
        scratch: &mut Scratch,
        emit: &mut dyn FnMut(Hit),
    ) {
        if text.is_empty() {
            return;
        }
        let Scratch {
            canon,
            compact,
            path,
        } = scratch;
        canonicalize(text, canon);
        let canon = &canon[..];

        for m in self.sigs.find_iter(canon) {
            // A keyword may carry several signatures with different contexts.
            for s in self.same_keyword[m.pattern().as_usize()]
                .iter()
                .map(|&i| &SIGS[i])
            {
                if enabled.on(s.category)
                    && left_ok(canon, m.start(), s.left)
                    && right_ok(canon, m.end(), s.right)
                {
                    emit(Hit {
                        category: s.category,
                        rule: s.rule,
                        score: s.score,
                    });
                }
            }
        }
        if enabled.xss {
            if memchr::memchr2(b':', b'=', canon).is_some() || memchr::memchr(b'(', canon).is_some()
            {
                compact.clear();
                compact.extend(canon.iter().copied().filter(|b| !matches!(b, b' ' | b'\n')));
                for m in self.compact.find_iter(&compact[..]) {
                    let (_, rule) = COMPACT_SIGS[m.pattern().as_usize()];
                    emit(Hit {
                        category: X,
                        rule,
                        score: STRONG,
                    });
                }
                obfuscated_hosts(compact, emit);
            }
            if memchr::memchr(b'=', canon).is_some() {
                event_handlers(canon, emit);
            }
        }
        if enabled.sqli {
            if memchr::memchr3(b'=', b'<', b'>', canon).is_some()
                || comment_tail(canon)
                || memchr::memmem::find(canon, b"like").is_some()
            {
                tautologies(canon, emit);
            }
            if memchr::memchr2(b'-', b'#', canon).is_some() {
                quote_comments(canon, emit);
            }
            string_break(canon, emit);
        }
        if enabled.cmd {
            self.commands(canon, emit);
            templates(canon, emit);
        }
        if enabled.traversal {
            traversal(canon, path, emit);
        }
        if enabled.sqli || enabled.xss {
            libinjection(text, canon, &self.sql_gate, enabled, emit);
        }
    }

    /// Command names after a shell separator, inside a substitution, or opening the value.
    fn commands(&self, canon: &[u8], emit: &mut dyn FnMut(Hit)) {
        // Without a separator or a substitution only a command opening the value counts, so
        // only the first token (a path to the binary included) needs searching.
        let joined = memchr::memchr3(b';', b'|', b'&', canon).is_some()
            || memchr::memchr2(b'\n', b'`', canon).is_some()
            || memchr::memmem::find(canon, b"$(").is_some();
        let scope = if joined {
            canon
        } else {
            let lead = canon
                .iter()
                .take_while(|b| matches!(b, b' ' | b'\'' | b'"'))
                .count();
            let first = canon[lead..]
                .iter()
                .position(|&b| b == b' ')
                .map_or(canon.len(), |p| lead + p);
            &canon[..first]
        };
        for m in self.commands.find_iter(scope) {
            let (start, end) = (m.start(), m.end());
            if !left_ok(canon, start, Left::Word) || !right_ok(canon, end, Right::Word) {
                continue;
            }
            if let Some(&next) = canon.get(end)
                && !matches!(
                    next,
                    b' ' | b'\n' | b';' | b'|' | b'&' | b')' | b'`' | b'\'' | b'"' | b'<' | b'>'
                )
            {
                continue;
            }
            let (_, kind) = COMMANDS[m.pattern().as_usize()];
            let context = command_context(canon, start);
            let args = arguments(&canon[end..], kind);
            let rule = match context {
                Context::Substitution => Some("cmdi.substitution"),
                Context::Separator
                    if kind == Cmd::Distinct
                        || matches!(args, Args::Telling | Args::Flag)
                        || (args == Args::None && !matches!(kind, Cmd::Sub(_))) =>
                {
                    Some("cmdi.separator_command")
                }
                Context::Start if kind == Cmd::Distinct || args == Args::Telling => {
                    Some("cmdi.command_line")
                }
                _ => None,
            };
            if let Some(rule) = rule {
                emit(Hit {
                    category: C,
                    rule,
                    score: STRONG,
                });
            }
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Self::new()
    }
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn left_ok(text: &[u8], start: usize, left: Left) -> bool {
    let Some(&prev) = start.checked_sub(1).and_then(|i| text.get(i)) else {
        return true;
    };
    match left {
        Left::Any => true,
        Left::Word => !is_word(prev),
        Left::WordNoDot => !is_word(prev) && prev != b'.',
        Left::ValueStart => matches!(prev, b'(' | b',' | b'=' | b'['),
    }
}

fn right_ok(text: &[u8], end: usize, right: Right) -> bool {
    let next = text.get(end).copied();
    match right {
        Right::Any => true,
        Right::Word => next.is_none_or(|b| !is_word(b)),
        Right::ValueEnd => matches!(next, Some(b')' | b',' | b']' | b';')),
        Right::Call | Right::CallOrTick => {
            let after = text[end..]
                .iter()
                .take(WINDOW)
                .find(|&&b| b != b' ')
                .copied();
            after == Some(b'(') || (right == Right::CallOrTick && after == Some(b'`'))
        }
    }
}

/// Builds the canonical view of `text` into `out` (see the module docs).
fn canonicalize(text: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    let mut space: Option<u8> = None;
    while i < text.len() {
        let b = text[i];
        if b == b'/' && text.get(i + 1) == Some(&b'*') {
            if text.get(i + 2) == Some(&b'!') {
                // MySQL runs the body of `/*!50000 ... */`: drop only the marker.
                i += 3;
                while i < text.len() && text[i].is_ascii_digit() {
                    i += 1;
                }
            } else {
                i = memchr::memmem::find(&text[i + 2..], b"*/")
                    .map_or(text.len(), |p| i + 2 + p + 2);
            }
            space.get_or_insert(b' ');
            continue;
        }
        if b == b'*' && text.get(i + 1) == Some(&b'/') {
            i += 2;
            space.get_or_insert(b' ');
            continue;
        }
        if b.is_ascii_whitespace() || b == 0x0b || b == 0 {
            if b == b'\n' || b == b'\r' {
                space = Some(b'\n');
            } else {
                space.get_or_insert(b' ');
            }
            i += 1;
            continue;
        }
        if let Some(s) = space.take() {
            out.push(s);
        }
        out.push(b.to_ascii_lowercase());
        i += 1;
    }
    if let Some(s) = space {
        out.push(s);
    }
}

/// URLs whose host is an IPv4 address spelled to slip past filters: one decimal number
/// (`http://1113982867/`), hex parts (`0x42.0x0000066...`) or octal parts (`0102.0146...`).
fn obfuscated_hosts(compact: &[u8], emit: &mut dyn FnMut(Hit)) {
    for at in memchr::memmem::find_iter(compact, b"://") {
        let host_start = at + 3;
        let host: &[u8] = compact[host_start..]
            .iter()
            .take(64)
            .position(|b| matches!(b, b'/' | b'"' | b'\'' | b'>' | b'?' | b'#' | b':'))
            .map_or(
                &compact[host_start..(host_start + 64).min(compact.len())],
                |end| &compact[host_start..host_start + end],
            );
        if host.is_empty()
            || !host
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b'x'))
        {
            continue;
        }
        let parts: Vec<&[u8]> = host.split(|&b| b == b'.').collect();
        let numeric = parts.iter().all(|p| {
            !p.is_empty()
                && (p.iter().all(u8::is_ascii_digit)
                    || (p.starts_with(b"0x")
                        && p.len() > 2
                        && p[2..].iter().all(u8::is_ascii_hexdigit)))
        });
        let disguised = parts
            .iter()
            .any(|p| p.starts_with(b"0x") || (p.len() > 1 && p[0] == b'0'))
            || (parts.len() == 1 && host.len() > 3);
        if numeric && disguised && parts.len() <= 4 {
            emit(Hit {
                category: X,
                rule: "xss.obfuscated_host",
                score: STRONG,
            });
            return;
        }
    }
}

/// Event-handler attributes (`onerror=`) after a delimiter an attribute can follow.
fn event_handlers(canon: &[u8], emit: &mut dyn FnMut(Hit)) {
    let mut from = 0;
    while let Some(off) = memchr::memchr(b'o', &canon[from..]) {
        let at = from + off;
        from = at + 1;
        if canon.get(at + 1) != Some(&b'n') {
            continue;
        }
        let delimited = at == 0
            || matches!(
                canon[at - 1],
                b' ' | b'\n' | b'/' | b'"' | b'\'' | b'`' | b';'
            );
        if !delimited {
            continue;
        }
        let name = canon[at + 2..]
            .iter()
            .take(WINDOW)
            .take_while(|b| b.is_ascii_lowercase())
            .count();
        if !(3..=24).contains(&name) {
            continue;
        }
        let mut j = at + 2 + name;
        if canon.get(j) == Some(&b' ') {
            j += 1;
        }
        if canon.get(j) != Some(&b'=') {
            continue;
        }
        // Inside markup or after a quote that closes an attribute, this is an attribute.
        let before = &canon[at.saturating_sub(WINDOW)..at];
        let markup = memchr::memrchr3(b'<', b'"', b'\'', before).is_some()
            || memchr::memchr(b'`', before).is_some();
        let score = if markup { STRONG } else { WEAK };
        emit(Hit {
            category: X,
            rule: "xss.event_handler",
            score,
        });
    }
}

/// A value that starts inside a SQL string, closes it, applies an operator and opens a new
/// string for the application's own closing quote: `a' or 'b`, `x'||'y`, `1' xor '0`,
/// `aa'like-'aa`. Only the first quote of the value is looked at, so quoted words in prose
/// (`she said 'yes' or 'no'`) do not match. Double-quoted strings are left to libinjection:
/// search syntaxes quote words that way (`wood" + "sign`).
fn string_break(canon: &[u8], emit: &mut dyn FnMut(Hit)) {
    const OPS: &[&[u8]] = &[
        b"sounds like",
        b"not like",
        b"not regexp",
        b"not rlike",
        b"regexp",
        b"rlike",
        b"like",
        b"xor",
        b"div",
        b"mod",
        b"and",
        b"or",
        b"is",
        b"||",
        b"&&",
        b"|",
        b"&",
        b"^",
        b"+",
        b"-",
        b"*",
        b"/",
        b"%",
        b"=",
    ];
    let Some(at) = memchr::memchr2(b'\'', b'"', canon) else {
        return;
    };
    // The value must open inside a single-quoted string and close it right after its data: a
    // quote first thing, or after a space, opens a quoted word instead (`select 'and'`).
    if at == 0 || canon[at] != b'\'' || canon[at - 1] == b' ' {
        return;
    }
    let quote = canon[at];
    let skip = |mut i: usize, extra: &[u8]| {
        while i < canon.len() && (canon[i] == b' ' || extra.contains(&canon[i])) {
            i += 1;
        }
        i
    };
    let i = skip(at + 1, b"");
    let Some(op) = OPS.iter().find(|op| canon[i..].starts_with(op)) else {
        return;
    };
    let end = i + op.len();
    if op[0].is_ascii_alphabetic() && canon.get(end).is_some_and(|b| is_word(*b)) {
        return;
    }
    let j = skip(end, b"+-!~");
    if canon.get(j) == Some(&quote) && canon.get(j + 1) != Some(&quote) {
        emit(Hit {
            category: S,
            rule: "sqli.string_break",
            score: STRONG,
        });
    }
}

/// A quote followed by a SQL comment (`admin'--`, `x" #`, `1')/*`): the string is closed and
/// the rest of the statement commented out. Strong when nothing quoted follows.
fn quote_comments(canon: &[u8], emit: &mut dyn FnMut(Hit)) {
    let mut from = 0;
    while let Some(off) = memchr::memchr2(b'\'', b'"', &canon[from..]) {
        let at = from + off;
        from = at + 1;
        let mut j = at + 1;
        let limit = (at + 8).min(canon.len());
        while j < limit && matches!(canon[j], b' ' | b')' | b';') {
            j += 1;
        }
        let rest = &canon[j..];
        if rest.starts_with(b"--") || rest.starts_with(b"#") {
            let tail = &rest[..rest.len().min(WINDOW)];
            let score = if tail
                .iter()
                .any(|b| b.is_ascii_alphanumeric() || matches!(b, b'\'' | b'"'))
            {
                WEAK
            } else {
                STRONG
            };
            emit(Hit {
                category: S,
                rule: "sqli.quote_comment",
                score,
            });
            if score == STRONG {
                return;
            }
        }
    }
}

/// SQL ending in a comment: a value whose end is `--` or `#` and which holds a SQL clause
/// keyword (`order by 5--`, `having 1=1#`, `or x=y-- `).
fn comment_tail(canon: &[u8]) -> bool {
    let trimmed = canon.trim_ascii_end();
    (trimmed.ends_with(b"--") || trimmed.ends_with(b"#"))
        && trimmed.len() > 3
        && memchr::memchr3(b' ', b'\'', b'"', trimmed).is_some()
}

/// One operand of a comparison: a number, a quoted string or an identifier (read at most
/// [`WINDOW`] bytes). A string left open at the end of the text counts: the application's
/// own closing quote ends it (`x' or 'a'='a`). Returns its length.
fn operand(s: &[u8]) -> Option<usize> {
    match s.first()? {
        b'0'..=b'9' => Some(
            s.iter()
                .take(WINDOW)
                .take_while(|b| b.is_ascii_digit() || **b == b'.')
                .count(),
        ),
        q @ (b'\'' | b'"') => match s[1..].iter().take(WINDOW).position(|b| b == q) {
            Some(close) => Some(close + 2),
            None if s.len() <= WINDOW => Some(s.len()),
            None => None,
        },
        b'a'..=b'z' | b'_' => Some(s.iter().take(WINDOW).take_while(|b| is_word(**b)).count()),
        _ => None,
    }
}

/// Strips the quotes of a quoted operand, so `'1'`, `'1` and `1` compare equal.
fn unquote(op: &[u8]) -> &[u8] {
    match op {
        [q @ (b'\'' | b'"'), inner @ .., last] if q == last => inner,
        [b'\'' | b'"', inner @ ..] => inner,
        _ => op,
    }
}

/// Boolean tautologies: `or 1=1`, `and 'a'='a'`, `having 1=1`, `|| x=x`: a logical operator
/// then two equal operands compared (strong), or two different ones (weak: `or 2>1`, and
/// prose such as `and 2 < 4`), or a bare `or true` at the end of the value (weak).
fn tautologies(canon: &[u8], emit: &mut dyn FnMut(Hit)) {
    const OPS: &[&[u8]] = &[b"or", b"and", b"xor", b"||", b"&&", b"having", b"where"];
    let mut best = 0;
    let mut i = 0;
    while i < canon.len() {
        let b = canon[i];
        if !matches!(b, b'o' | b'a' | b'x' | b'|' | b'&' | b'h' | b'w') {
            i += 1;
            continue;
        }
        let Some(op) = OPS.iter().find(|op| canon[i..].starts_with(op)) else {
            i += 1;
            continue;
        };
        let wordy = op[0].is_ascii_alphabetic();
        if wordy
            && (i > 0 && is_word(canon[i - 1])
                || canon
                    .get(i + op.len())
                    .is_some_and(|b| is_word(*b) && !b.is_ascii_digit()))
        {
            i += 1;
            continue;
        }
        let mut j = i + op.len();
        while matches!(canon.get(j), Some(b' ' | b'(')) {
            j += 1;
        }
        if let Some(a) = operand(&canon[j..]) {
            let left = &canon[j..j + a];
            let mut k = j + a;
            if canon.get(k) == Some(&b' ') {
                k += 1;
            }
            let cmp = [
                &b"<=>"[..],
                b"<>",
                b"!=",
                b">=",
                b"<=",
                b"=",
                b">",
                b"<",
                b"like ",
                b"is ",
            ]
            .iter()
            .find(|c| canon[k..].starts_with(c))
            .map(|c| c.len());
            if let Some(c) = cmp {
                let equality = canon[k] == b'=' || canon[k] == b'l' || canon[k] == b'i';
                k += c;
                if canon.get(k) == Some(&b' ') {
                    k += 1;
                }
                if let Some(bl) = operand(&canon[k..]) {
                    let right = &canon[k..k + bl];
                    let literal = !left[0].is_ascii_alphabetic() || unquote(left) != left;
                    let score = if equality && unquote(left) == unquote(right) {
                        STRONG
                    } else if literal || left == right {
                        WEAK
                    } else {
                        0
                    };
                    best = best.max(score);
                }
            } else if matches!(left, b"true" | b"1") {
                let rest = canon[k..].trim_ascii();
                if rest.is_empty() || rest.starts_with(b"--") || rest.starts_with(b"#") {
                    best = best.max(WEAK);
                }
            }
        }
        if best == STRONG {
            break;
        }
        i += op.len();
    }
    if best > 0 {
        emit(Hit {
            category: S,
            rule: "sqli.tautology",
            score: best,
        });
    }
    if comment_tail(canon) {
        emit(Hit {
            category: S,
            rule: "sqli.comment_tail",
            score: WEAK,
        });
    }
}

/// Where a command name stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    /// Inside `$( )` or backticks.
    Substitution,
    /// After `;`, `|`, `&` or a newline.
    Separator,
    /// At the start of the value.
    Start,
    Other,
}

fn command_context(canon: &[u8], start: usize) -> Context {
    let mut j = start;
    // An absolute path to the binary (`/usr/bin/id`, `c:\windows\system32\cmd`).
    if j > 0 && matches!(canon[j - 1], b'/' | b'\\') {
        let floor = j.saturating_sub(WINDOW);
        while j > floor
            && matches!(canon[j - 1], b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'/' | b'\\' | b':')
        {
            j -= 1;
        }
    }
    while j > 0 && canon[j - 1] == b' ' {
        j -= 1;
    }
    if j == 0 {
        return Context::Start;
    }
    match canon[j - 1] {
        b'`' => Context::Substitution,
        b'(' if j >= 2 && canon[j - 2] == b'$' => Context::Substitution,
        b';' | b'|' | b'&' | b'\n' => Context::Separator,
        b'\'' | b'"' if j == 1 => Context::Start,
        _ => Context::Other,
    }
}

/// How the tokens after a command name read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Args {
    /// No argument before the end or the next separator.
    None,
    /// Shell-looking arguments, at least one of them telling (a flag, a path, a URL).
    Telling,
    /// Shell-looking arguments whose telling ones are all flags (`ls -la`); search syntax
    /// looks the same (`cross stitch -pdf`).
    Flag,
    /// Shell-looking arguments, none telling (`cat 6`).
    Plain,
    /// At least one token reads as prose.
    Prose,
}

fn arguments(rest: &[u8], kind: Cmd) -> Args {
    let rest = &rest[..rest.len().min(WINDOW)];
    let stop = rest
        .iter()
        .position(|b| matches!(b, b';' | b'|' | b'&' | b'\n' | b'`' | b')'))
        .unwrap_or(rest.len());
    let mut result = Args::None;
    // After a path or a flag, words may be part of a path with spaces or a flag's value.
    let mut licensed = false;
    for (n, tok) in rest[..stop]
        .split(|&b| b == b' ')
        .filter(|t| !t.is_empty())
        .enumerate()
    {
        let first = tok[0];
        let pathish = matches!(
            first,
            b'/' | b'\\' | b'.' | b'~' | b'$' | b'*' | b'>' | b'<' | b'"' | b'\''
        ) || tok.contains(&b'/')
            || tok.contains(&b'\\');
        let flag = first == b'-' && tok.len() > 1;
        let telling = pathish
            || (kind == Cmd::Timing && first.is_ascii_digit())
            || (kind == Cmd::Lookup && COMMANDS.iter().any(|(c, _)| c.as_bytes() == tok))
            || matches!(kind, Cmd::Sub(subs) if n == 0 && subs.iter().any(|s| s.as_bytes() == tok));
        let plain = tok.iter().all(|b| b.is_ascii_digit() || *b == b'.') || tok.contains(&b'=');
        if telling {
            result = Args::Telling;
            licensed |= pathish || matches!(kind, Cmd::Sub(_));
        } else if flag {
            if result != Args::Telling {
                result = Args::Flag;
            }
        } else if plain || licensed {
            if result == Args::None {
                result = Args::Plain;
            }
        } else {
            return Args::Prose;
        }
    }
    result
}

/// Template expressions that compute: `{{7*7}}`, `${7*7}`, `{{ x.__class__ }}`, `{% ... %}`.
fn templates(canon: &[u8], emit: &mut dyn FnMut(Hit)) {
    let mut from = 0;
    while let Some(off) = memchr::memchr3(b'{', b'$', b'#', &canon[from..]) {
        let at = from + off;
        from = at + 1;
        let (body_start, close): (usize, &[u8]) = match &canon[at..] {
            [b'{', b'{', ..] => (at + 2, b"}}"),
            [b'{', b'%', ..] => (at + 2, b"%}"),
            [b'$' | b'#', b'{', ..] => (at + 2, b"}"),
            _ => continue,
        };
        let window = &canon[body_start..canon.len().min(body_start + WINDOW)];
        let Some(end) = memchr::memmem::find(window, close) else {
            continue;
        };
        let body = &window[..end];
        let computes = body.windows(3).any(|w| {
            w[0].is_ascii_digit()
                && matches!(w[1], b'*' | b'+' | b'-' | b'/')
                && w[2].is_ascii_digit()
        }) || body.windows(2).any(|w| w == b"__");
        let statement = close == b"%}" && {
            let word = body.trim_ascii_start();
            [
                &b"for "[..],
                b"if ",
                b"set ",
                b"import ",
                b"include ",
                b"extends ",
                b"macro ",
                b"print ",
                b"exec ",
            ]
            .iter()
            .any(|k| word.starts_with(k))
        };
        if computes || statement {
            emit(Hit {
                category: C,
                rule: "cmdi.template",
                score: STRONG,
            });
            return;
        }
        if close == b"}}" && body.iter().any(|b| b.is_ascii_alphabetic()) {
            emit(Hit {
                category: C,
                rule: "cmdi.template",
                score: WEAK,
            });
        }
    }
}

/// Dot-dot segments (`../`, `..\`, `....//`, `..;/`), and runs of `./`.
fn traversal(canon: &[u8], path: &mut Vec<u8>, emit: &mut dyn FnMut(Hit)) {
    let dotted =
        memchr::memchr(b'.', canon).is_some() && memchr::memchr2(b'/', b'\\', canon).is_some();
    if !dotted && memchr::memmem::find(canon, b"0x2").is_none() {
        return;
    }
    // Spell separators one way; `0x2e`-style hex spellings become the bytes they name.
    path.clear();
    if memchr::memmem::find(canon, b"0x").is_none() {
        path.extend(canon.iter().map(|&b| if b == b'\\' { b'/' } else { b }));
    }
    let mut i = if path.is_empty() { 0 } else { canon.len() };
    while i < canon.len() {
        if canon[i..].starts_with(b"0x2e") {
            path.push(b'.');
            i += 4;
        } else if canon[i..].starts_with(b"0x2f") || canon[i..].starts_with(b"0x5c") {
            path.push(b'/');
            i += 4;
        } else {
            path.push(if canon[i] == b'\\' { b'/' } else { canon[i] });
            i += 1;
        }
    }
    let mut dotdot = 0u32;
    let mut dot_runs = 0u32;
    for seg in path.split(|&b| b == b'/') {
        let seg = match memchr::memchr(b';', seg) {
            Some(p) => &seg[..p],
            None => seg,
        };
        let seg = seg.trim_ascii();
        if seg.len() >= 2 && seg.iter().all(|&b| b == b'.') {
            dotdot += 1;
        } else if seg == b"." {
            dot_runs += 1;
        }
    }
    if dotdot >= 2 {
        emit(Hit {
            category: T,
            rule: "traversal.dot_segments",
            score: STRONG,
        });
    } else if dotdot == 1 || dot_runs >= 3 {
        emit(Hit {
            category: T,
            rule: "traversal.dot_segments",
            score: WEAK,
        });
    }
}

/// Words and marks without which libinjection's SQL grammar finds no injection in text whose
/// only quotes are apostrophes inside words. Checking them first keeps libinjection, the
/// costliest rule, off most ordinary text such as user agents and prose.
const SQL_GATE: &[&str] = &[
    "--",
    "@@",
    "0x",
    "select",
    "union",
    "insert",
    "update",
    "delete",
    "drop",
    "exec",
    "execute",
    "declare",
    "waitfor",
    "sleep",
    "benchmark",
    "having",
    "order by",
    "group by",
    "into",
    "where",
    "limit",
    "procedure",
    "case",
    "when",
    "null",
    "between",
    "rlike",
    "regexp",
    "like",
    "char",
    "concat",
    "cast",
    "convert",
    "substring",
    "ascii",
    "version",
    "database",
    "schema",
    "exists",
    "shutdown",
    "truncate",
    "alter",
    "create",
    "grant",
    "or",
    "and",
    "xor",
    "||",
    "&&",
    "not",
    "div",
    "mod",
];

/// Whether libinjection's SQLi detector could find anything in `canon`.
fn sql_gate(gate: &AhoCorasick, canon: &[u8]) -> bool {
    // A quote matters when SQL punctuation stands next to it (`'=`, `')`, `1'--`, `';`):
    // apostrophes and quoted words in prose (`rock 'n' roll`, `l'Église`) have letters or
    // spaces around them. Double quotes alone do not count: they delimit tokens in
    // JSON-looking values and structured headers (`"Chromium";v="124"`). An injection without
    // such punctuation needs a keyword or an operator, which the search below finds.
    let sql_mark = |b: Option<&u8>| {
        b.is_some_and(|b| {
            matches!(
                b,
                b'=' | b'<'
                    | b'>'
                    | b'('
                    | b')'
                    | b';'
                    | b'|'
                    | b'&'
                    | b'+'
                    | b'-'
                    | b'#'
                    | b'*'
                    | b'/'
                    | b','
                    | b'%'
                    | b'!'
                    | b'^'
                    | b'@'
                    | b'0'..=b'9'
            )
        })
    };
    let quoted = canon.iter().enumerate().any(|(i, &b)| {
        b == b'`'
            || (b == b'\''
                && (sql_mark(canon[i + 1..].iter().find(|&&c| c != b' '))
                    || sql_mark(canon[..i].iter().rev().find(|&&c| c != b' '))))
    });
    if quoted {
        return true;
    }
    gate.find_iter(canon).any(|m| {
        let pat = SQL_GATE[m.pattern().as_usize()].as_bytes();
        if !pat[0].is_ascii_alphabetic() && !matches!(pat, b"||" | b"&&") {
            return true;
        }
        if pat[0].is_ascii_alphabetic()
            && !(left_ok(canon, m.start(), Left::Word) && right_ok(canon, m.end(), Right::Word))
        {
            return false;
        }
        if matches!(
            pat,
            b"char"
                | b"concat"
                | b"cast"
                | b"convert"
                | b"substring"
                | b"ascii"
                | b"version"
                | b"database"
                | b"schema"
                | b"exists"
                | b"sleep"
                | b"benchmark"
        ) {
            // A function name counts only when called.
            return right_ok(canon, m.end(), Right::Call);
        }
        if matches!(
            pat,
            b"or" | b"and" | b"xor" | b"||" | b"&&" | b"not" | b"like" | b"div" | b"mod"
        ) {
            // A logical operator joins SQL only when an operand that is not a word follows: a
            // number, a string, a parenthesis, a variable or a unary operator before a number
            // (`not-a.brand` is a word).
            let rest = &canon[m.end()..];
            let at = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
            return match rest.get(at) {
                Some(b'0'..=b'9' | b'\'' | b'"' | b'`' | b'(' | b'@' | b'!' | b'~') => true,
                Some(b'-' | b'+') => rest.get(at + 1).is_some_and(u8::is_ascii_digit),
                _ => false,
            };
        }
        true
    })
}

/// Whether a libinjection fingerprint is one of the short shapes ordinary text also takes, in
/// a text that lacks what makes the shape an attack (libinjection's own whitelist does the same
/// for other shapes):
/// - number or word then a comment (`1c`, `nc`, `sc`): an attack ends there, prose goes on
///   (`50% off -- today only!`), and a quote, `)` or a space must precede the comment;
/// - strings and operators only (`sos`, `s&s`, `so`) or operands joined by a logical operator
///   (`1&1`): an attack compares something (`=`, `<`, `>`, `(`), prose does not
///   (`"NOT" STUFFER`, `80% ACRYLIC AND 20% WOOL`);
/// - a T-SQL statement word called with a bareword argument (`T(n`): `print(f"...")` is
///   Python.
fn prose_fingerprint(fp: &[u8], text: &[u8]) -> bool {
    let fp = &fp[..fp.iter().position(|&b| b == 0).unwrap_or(fp.len())];
    let compares = text.iter().any(|b| matches!(b, b'=' | b'<' | b'>' | b'('));
    match fp {
        [b'1' | b'n' | b's', b'c'] => {
            let marker = memchr::memmem::find(text, b"--")
                .or_else(|| memchr::memchr(b'#', text))
                .unwrap_or(text.len());
            let ends_there = !text[marker..].iter().any(u8::is_ascii_alphanumeric);
            let head = &text[..marker];
            let trimmed = head.trim_ascii_end();
            let closed = trimmed
                .last()
                .is_some_and(|b| matches!(b, b'\'' | b'"' | b')'))
                || trimmed.len() < head.len();
            !(ends_there && closed)
        }
        b"sos" | b"s&s" | b"so" | b"s&" | b"1&1" | b"n&1" | b"1&n" | b"n&n" => !compares,
        [b'T', b'(', b'n', ..] => true,
        _ => false,
    }
}

/// libinjection's SQLi and XSS detectors, each run only when the text could hold what its
/// grammar looks for.
fn libinjection(
    text: &[u8],
    canon: &[u8],
    gate: &AhoCorasick,
    enabled: Enabled,
    emit: &mut dyn FnMut(Hit),
) {
    let text = &text[..text.len().min(LIBINJECTION_MAX)];
    // One word (letters, digits, `_-.`) is no SQL statement and no markup.
    if text.len() < 2
        || text
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return;
    }
    if enabled.sqli && sql_gate(gate, canon) {
        let mut state = libinjectionrs::SqliState::new(text, libinjectionrs::SqliFlags::FLAG_NONE);
        if state.detect() && !prose_fingerprint(state.fingerprint.as_slice(), text) {
            emit(Hit {
                category: S,
                rule: "sqli.libinjection",
                score: STRONG,
            });
        }
    }
    // Outside markup, libinjection's HTML grammar needs an attribute: a name then `=`, with a
    // space, a slash or a quote before the name to separate it from the value it breaks out
    // of (`x" onmouseover=...`); `;v="124"` in a structured header is no attribute.
    let html = memchr::memchr2(b'<', b'`', text).is_some()
        || memchr::memchr_iter(b'=', text).any(|i| {
            let before = text[..i].trim_ascii_end();
            let name = before
                .iter()
                .rev()
                .take(WINDOW)
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':'))
                .count();
            let start = before.len() - name;
            name > 0
                && before[start].is_ascii_alphabetic()
                && start > 0
                && matches!(
                    before[start - 1],
                    b' ' | b'\t' | b'\n' | b'\r' | b'/' | b'"' | b'\''
                )
        });
    if enabled.xss && html && libinjectionrs::detect_xss(text).is_injection() {
        emit(Hit {
            category: X,
            rule: "xss.libinjection",
            score: STRONG,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(text: &str) -> Vec<&'static str> {
        let rules = Rules::new();
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        let all = Enabled {
            sqli: true,
            xss: true,
            traversal: true,
            cmd: true,
        };
        rules.scan(text.as_bytes(), all, &mut scratch, &mut |h| {
            if h.score >= STRONG && !out.contains(&h.rule) {
                out.push(h.rule);
            }
        });
        out
    }

    #[test]
    fn canonical_view() {
        let mut out = Vec::new();
        canonicalize(b"UNION/**/SELECT\t\t1 /*!50000AND*/ x\r\ny", &mut out);
        assert_eq!(out, b"union select 1 and x\ny");
    }

    #[test]
    fn attacks_fire() {
        assert!(hits("1 UNION/**/ALL SELECT null--").contains(&"sqli.union_select"));
        assert!(hits("x' or 'a'='a").contains(&"sqli.tautology"));
        assert!(hits("1 AND SLEEP(5)").contains(&"sqli.time_function"));
        assert!(hits("a' or 'b").contains(&"sqli.string_break"));
        assert!(hits("aa'like-'aa").contains(&"sqli.string_break"));
        assert!(hits("<svg/onload=alert(1)>").contains(&"xss.event_handler"));
        assert!(hits("java\tscript:alert`1`").contains(&"xss.script_uri"));
        assert!(
            hits("<form action=//evil.example><input name=pw>").contains(&"xss.markup_injection")
        );
        assert!(hits("; cat /etc/passwd").contains(&"cmdi.separator_command"));
        assert!(hits("a|/usr/bin/id").contains(&"cmdi.separator_command"));
        assert!(hits("$(whoami)").contains(&"cmdi.substitution"));
        assert!(hits("uname -a").contains(&"cmdi.command_line"));
        assert!(hits("{{7*7}}").contains(&"cmdi.template"));
        assert!(hits("..\\..\\windows\\win.ini").contains(&"traversal.dot_segments"));
        assert!(hits("....//....//x").contains(&"traversal.dot_segments"));
    }

    #[test]
    fn prose_does_not_fire() {
        for text in [
            "Dogs; cat toys and more",
            "type 2 diabetes",
            "Tom & Jerry",
            "select a color from the list",
            "the union selected a leader",
            "O'Brien",
            "Rock 'n' roll or jazz",
            "time.sleep(1)",
            "if (a < b) { return a; }",
            "see ../docs/readme.md",
            "cat 6 cable",
            "sleep 8 hours",
            "turn the lights on=off",
            "she said 'yes' or 'no'",
            "select 'and' or 'or'",
            "Jane's' + 'x",
        ] {
            assert!(hits(text).is_empty(), "{text}: {:?}", hits(text));
        }
    }
}
