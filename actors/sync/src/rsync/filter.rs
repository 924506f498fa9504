//! rsync's filter rules: `--exclude`, `--include`, `--exclude-from`, and `--filter` with
//! `-`/`+` (`exclude`/`include`) rules, matched as rsync 3.x matches them (a port of
//! `rule_matches` in exclude.c and of wildmatch.c).
//!
//! - The first matching rule wins; a path no rule matches is included.
//! - A leading `/` anchors the pattern at the transfer root; a trailing `/` matches
//!   directories only.
//! - A pattern with a `/` (not counting a trailing one) or a `**` is matched against the whole
//!   path (unanchored ones at any directory boundary: `sub/foo` matches `a/sub/foo`), other
//!   patterns against the last component.
//! - `*` matches anything but `/`, `**` anything, `?` one character but `/`, `[...]` a class
//!   (`[!...]`/`[^...]` negated, ranges, `[:alpha:]` and the other POSIX classes); a trailing
//!   `dir/***` matches `dir` itself and everything under it. A backslash escapes the next
//!   character, but only in a pattern that has a wildcard (`*`, `?`, `[`); otherwise it is
//!   literal, as in rsync.
//! - Paths are relative to the transfer root (`foo/a` for `rsync src/foo dst`, `a` for
//!   `rsync src/foo/ dst`); the root itself (`.`) is never excluded.
//!
//! Supported rule forms: `- PAT`, `+ PAT`, `exclude PAT`, `include PAT` (a space or an `_`
//! before the pattern), the `!` modifier (`-! */`: the rule applies when the pattern does not
//! match) and the clear rule `!`. Merge files, dir-merge, hide/show/protect/risk and the other
//! modifiers are refused with an error naming the rule.

/// A bad or unsupported filter rule; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

/// One include/exclude rule, parsed as rsync's `add_rule` parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    include: bool,
    /// The pattern without its trailing `/` (a leading `/` is kept: it anchors).
    pattern: String,
    /// A trailing `/`: directories only.
    dir_only: bool,
    /// The `!` modifier: the rule applies when the pattern does NOT match.
    negate: bool,
    /// `/`s in `pattern` (a leading one counts).
    slashes: usize,
    /// Contains `*`, `?` or `[`.
    wild: bool,
    /// Contains `**`.
    wild2: bool,
    /// Starts with `**`.
    wild2_prefix: bool,
    /// Ends with `***`.
    wild3_suffix: bool,
}

impl Rule {
    fn new(include: bool, negate: bool, pattern: &str) -> Rule {
        let mut pattern = pattern.to_string();
        let mut dir_only = false;
        if pattern.len() > 1 && pattern.ends_with('/') {
            pattern.pop();
            dir_only = true;
        }
        let wild = pattern.contains(['*', '?', '[']);
        let wild2 = wild && pattern.contains("**");
        Rule {
            include,
            slashes: pattern.matches('/').count(),
            wild,
            wild2,
            wild2_prefix: wild2 && pattern.starts_with("**"),
            wild3_suffix: wild2 && pattern.ends_with("***"),
            dir_only,
            negate,
            pattern,
        }
    }

    /// Whether the rule applies to `path` (rsync's `rule_matches`, negation included).
    fn applies(&self, path: &str, is_dir: bool) -> bool {
        let hit = !self.negate;
        if path.is_empty() {
            return false;
        }
        let mut name = path;
        if self.slashes == 0 && !self.wild2 {
            if let Some(i) = name.rfind('/') {
                name = &name[i + 1..];
            }
        }
        if !is_dir && self.dir_only {
            return !hit;
        }
        let mut text = String::with_capacity(name.len() + 2);
        if self.wild2_prefix {
            // Lets `**/foo` match `foo` at the top.
            text.push('/');
        }
        text.push_str(name);
        if is_dir && self.wild3_suffix {
            // Lets `dir/***` match `dir` itself.
            text.push('/');
        }
        let (anchored, pattern) = match self.pattern.strip_prefix('/') {
            Some(p) => (true, p),
            None => (false, self.pattern.as_str()),
        };
        let matched = if self.wild {
            let where_ = if !anchored && self.slashes > 0 && !self.wild2 {
                Where::Trailing(self.slashes + 1)
            } else if !anchored && !self.wild2_prefix && self.wild2 {
                Where::AnySlash
            } else {
                Where::Start
            };
            wildmatch_at(pattern.as_bytes(), text.as_bytes(), where_)
        } else if anchored {
            name == pattern
        } else {
            let (l1, l2) = (name.len(), pattern.len());
            l2 <= l1
                && name.ends_with(pattern)
                && (l1 == l2 || name.as_bytes()[l1 - l2 - 1] == b'/')
        };
        if matched {
            hit
        } else {
            !hit
        }
    }
}

/// The rules, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// `--exclude PATTERN`.
    pub fn exclude(&mut self, pattern: &str) {
        if !pattern.is_empty() {
            self.rules.push(Rule::new(false, false, pattern));
        }
    }
    /// `--include PATTERN`.
    pub fn include(&mut self, pattern: &str) {
        if !pattern.is_empty() {
            self.rules.push(Rule::new(true, false, pattern));
        }
    }
    /// `--filter RULE`: `- PATTERN`, `+ PATTERN`, `exclude PATTERN`, `include PATTERN` (a
    /// space or `_` before the pattern), with the `!` modifier (`-! PATTERN`, `exclude,! P`),
    /// and `!` (clear the rules so far). Other rule kinds and modifiers are refused by name.
    pub fn filter(&mut self, rule: &str) -> Result<(), FilterError> {
        let unsupported =
            || FilterError(format!("filter rule '{rule}' is not supported by cs rsync"));
        let bad = |why: &str| FilterError(format!("invalid filter rule '{rule}': {why}"));
        let r = rule.trim_end_matches(['\n', '\r']);
        if r == "!" || r == "clear" {
            self.rules.clear();
            return Ok(());
        }
        // The rule's name: a long word followed by `,`/space/`_`, or a single character.
        let (include, rest) = if let Some(rest) = strip_word(r, "exclude") {
            (false, rest.strip_prefix(',').unwrap_or(rest))
        } else if let Some(rest) = strip_word(r, "include") {
            (true, rest.strip_prefix(',').unwrap_or(rest))
        } else if let Some(rest) = r.strip_prefix('-') {
            (false, rest.strip_prefix(',').unwrap_or(rest))
        } else if let Some(rest) = r.strip_prefix('+') {
            (true, rest.strip_prefix(',').unwrap_or(rest))
        } else if r.is_empty() || r.starts_with(['#', ';']) {
            // rsync skips blank and comment lines in rule files; a lone `-f ''` is harmless.
            return Ok(());
        } else {
            return Err(unsupported());
        };
        // Modifiers up to the space or `_` before the pattern.
        let mut negate = false;
        let mut chars = rest.char_indices();
        let pattern = loop {
            match chars.next() {
                None => return Err(bad("no pattern")),
                Some((i, ' ' | '_')) => break &rest[i + 1..],
                Some((_, '!')) => negate = true,
                Some((_, '/' | 'C' | 's' | 'r' | 'p' | 'x' | 'e' | 'n' | 'w')) => {
                    return Err(unsupported())
                }
                Some((_, c)) => return Err(bad(&format!("unknown modifier '{c}'"))),
            }
        };
        if pattern.is_empty() {
            return Err(bad("no pattern"));
        }
        self.rules.push(Rule::new(include, negate, pattern));
        Ok(())
    }
    /// The lines of an `--exclude-from` file: blank lines and `;`/`#` comments skipped; a line
    /// starting with `- ` or `+ ` is an exclude or an include, a line `!` clears the rules so
    /// far, any other line is an exclude pattern.
    pub fn exclude_from(&mut self, text: &str) {
        self.rule_lines(text, false)
    }
    /// The lines of an `--include-from` file (as [`Rules::exclude_from`], includes by default).
    pub fn include_from(&mut self, text: &str) {
        self.rule_lines(text, true)
    }
    fn rule_lines(&mut self, text: &str, include: bool) {
        for l in text.split(['\n', '\r']) {
            if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
                continue;
            }
            if l == "!" {
                self.rules.clear();
            } else if let Some(p) = l.strip_prefix("- ") {
                self.exclude(p);
            } else if let Some(p) = l.strip_prefix("+ ") {
                self.include(p);
            } else if include {
                self.include(l);
            } else {
                self.exclude(l);
            }
        }
    }
    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
    /// Whether `path` (relative to the transfer root, `/`-separated) is excluded: the first
    /// rule that matches decides; none matching means included. The root `.` never is.
    pub fn is_excluded(&self, path: &str, is_dir: bool) -> bool {
        if path == "." || path.is_empty() {
            return false;
        }
        let path = path.strip_prefix("./").unwrap_or(path);
        self.rules
            .iter()
            .find(|r| r.applies(path, is_dir))
            .is_some_and(|r| !r.include)
    }
}

/// `word` followed by `,`, a space or `_` (rsync's long rule names).
fn strip_word<'a>(s: &'a str, word: &str) -> Option<&'a str> {
    let rest = s.strip_prefix(word)?;
    rest.starts_with([',', ' ', '_']).then_some(rest)
}

/// Where `wildmatch_array` may start matching in the text.
#[derive(Clone, Copy)]
enum Where {
    /// At the start only.
    Start,
    /// At the last N `/`-separated elements.
    Trailing(usize),
    /// At the start or after any `/`.
    AnySlash,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum M {
    False,
    True,
    AbortAll,
    AbortToStarStar,
}

fn wildmatch_at(p: &[u8], text: &[u8], where_: Where) -> bool {
    match where_ {
        Where::Start => dowild(p, text) == M::True,
        Where::Trailing(n) => {
            let mut count = n;
            let mut start = None;
            for i in (0..text.len()).rev() {
                if text[i] == b'/' {
                    count -= 1;
                    if count == 0 {
                        start = Some(i + 1);
                        break;
                    }
                }
            }
            let start = match start {
                Some(s) => s,
                None if count == 1 => 0,
                None => return false,
            };
            dowild(p, &text[start..]) == M::True
        }
        Where::AnySlash => {
            let mut m = dowild(p, text);
            if m == M::True {
                return true;
            }
            if m == M::AbortAll {
                return false;
            }
            let mut i = 0;
            loop {
                if i >= text.len() {
                    return false;
                }
                let c = text[i];
                i += 1;
                if c == b'/' {
                    m = dowild(p, &text[i..]);
                    if m != M::False && m != M::AbortToStarStar {
                        break;
                    }
                }
            }
            m == M::True
        }
    }
}

/// rsync's `dowild` on one text (wildmatch.c).
fn dowild(p: &[u8], text: &[u8]) -> M {
    let (mut pi, mut ti) = (0usize, 0usize);
    while pi < p.len() {
        let mut p_ch = p[pi];
        let t_ch = text.get(ti).copied().unwrap_or(0);
        if ti >= text.len() && p_ch != b'*' {
            return M::AbortAll;
        }
        match p_ch {
            b'?' => {
                if t_ch == b'/' {
                    return M::False;
                }
            }
            b'*' => {
                pi += 1;
                let special = if p.get(pi) == Some(&b'*') {
                    while p.get(pi) == Some(&b'*') {
                        pi += 1;
                    }
                    true
                } else {
                    false
                };
                if pi >= p.len() {
                    // A trailing `**` matches everything, a trailing `*` anything without `/`.
                    if !special && text[ti.min(text.len())..].contains(&b'/') {
                        return M::False;
                    }
                    return M::True;
                }
                let mut t = ti;
                loop {
                    if t >= text.len() {
                        break;
                    }
                    let m = dowild(&p[pi..], &text[t..]);
                    if m != M::False {
                        if !special || m != M::AbortToStarStar {
                            return m;
                        }
                    } else if !special && text[t] == b'/' {
                        return M::AbortToStarStar;
                    }
                    t += 1;
                }
                return M::AbortAll;
            }
            b'[' => {
                pi += 1;
                p_ch = p.get(pi).copied().unwrap_or(0);
                let negated = p_ch == b'!' || p_ch == b'^';
                if negated {
                    pi += 1;
                    p_ch = p.get(pi).copied().unwrap_or(0);
                }
                let mut prev_ch = 0u8;
                let mut matched = false;
                loop {
                    if p_ch == 0 {
                        return M::AbortAll;
                    }
                    if p_ch == b'\\' {
                        pi += 1;
                        p_ch = p.get(pi).copied().unwrap_or(0);
                        if p_ch == 0 {
                            return M::AbortAll;
                        }
                        if t_ch == p_ch {
                            matched = true;
                        }
                    } else if p_ch == b'-'
                        && prev_ch != 0
                        && p.get(pi + 1).is_some_and(|&c| c != b']')
                    {
                        pi += 1;
                        p_ch = p[pi];
                        if p_ch == b'\\' {
                            pi += 1;
                            p_ch = p.get(pi).copied().unwrap_or(0);
                            if p_ch == 0 {
                                return M::AbortAll;
                            }
                        }
                        if t_ch <= p_ch && t_ch >= prev_ch {
                            matched = true;
                        }
                        p_ch = 0;
                    } else if p_ch == b'[' && p.get(pi + 1) == Some(&b':') {
                        let s = pi + 2;
                        let mut e = s;
                        while e < p.len() && p[e] != b']' {
                            e += 1;
                        }
                        if e >= p.len() {
                            return M::AbortAll;
                        }
                        if e == s || p[e - 1] != b':' {
                            // No `:]`: a plain `[` in the set.
                            p_ch = b'[';
                            if t_ch == p_ch {
                                matched = true;
                            }
                        } else {
                            pi = e;
                            let class = &p[s..e - 1];
                            let c = t_ch;
                            let yes = match class {
                                b"alnum" => c.is_ascii_alphanumeric(),
                                b"alpha" => c.is_ascii_alphabetic(),
                                b"blank" => c == b' ' || c == b'\t',
                                b"cntrl" => c.is_ascii_control(),
                                b"digit" => c.is_ascii_digit(),
                                b"graph" => c.is_ascii_graphic(),
                                b"lower" => c.is_ascii_lowercase(),
                                b"print" => c.is_ascii_graphic() || c == b' ',
                                b"punct" => c.is_ascii_punctuation(),
                                b"space" => c.is_ascii_whitespace() || c == 0x0b,
                                b"upper" => c.is_ascii_uppercase(),
                                b"xdigit" => c.is_ascii_hexdigit(),
                                _ => return M::AbortAll,
                            };
                            if yes {
                                matched = true;
                            }
                            p_ch = 0;
                        }
                    } else if t_ch == p_ch {
                        matched = true;
                    }
                    prev_ch = p_ch;
                    pi += 1;
                    p_ch = p.get(pi).copied().unwrap_or(0);
                    if p_ch == b']' {
                        break;
                    }
                }
                if matched == negated || t_ch == b'/' {
                    return M::False;
                }
            }
            _ => {
                if p_ch == b'\\' {
                    pi += 1;
                    p_ch = p.get(pi).copied().unwrap_or(0);
                }
                if t_ch != p_ch {
                    return M::False;
                }
            }
        }
        pi += 1;
        ti += 1;
    }
    if ti < text.len() {
        M::False
    } else {
        M::True
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(specs: &[&str]) -> Rules {
        let mut r = Rules::default();
        for s in specs {
            r.filter(s).unwrap();
        }
        r
    }
    fn ex(specs: &[&str], path: &str, is_dir: bool) -> bool {
        rules(specs).is_excluded(path, is_dir)
    }

    #[test]
    fn basename_patterns() {
        assert!(ex(&["- *.o"], "a.o", false));
        assert!(ex(&["- *.o"], "x/y/a.o", false));
        assert!(!ex(&["- *.o"], "a.c", false));
        assert!(!ex(&["- *.o"], "a.o/b", false));
        assert!(ex(&["- foo"], "a/foo", true));
        assert!(ex(&["- foo"], "foo", false));
        assert!(!ex(&["- foo"], "afoo", false));
        assert!(!ex(&["- foo"], "foo/bar", false));
    }

    #[test]
    fn anchored_and_dir_only() {
        assert!(ex(&["- /foo"], "foo", false));
        assert!(!ex(&["- /foo"], "a/foo", false));
        assert!(ex(&["- foo/"], "foo", true));
        assert!(ex(&["- foo/"], "a/foo", true));
        assert!(!ex(&["- foo/"], "foo", false));
        assert!(ex(&["- /foo/"], "foo", true));
        assert!(!ex(&["- /foo/"], "foo", false));
        assert!(!ex(&["- /*.c"], "a/b.c", false));
        assert!(ex(&["- /*.c"], "b.c", false));
    }

    #[test]
    fn infix_slash_matches_trailing_elements() {
        assert!(ex(&["- sub/foo"], "sub/foo", false));
        assert!(ex(&["- sub/foo"], "a/sub/foo", false));
        assert!(!ex(&["- sub/foo"], "asub/foo", false));
        assert!(ex(&["- foo/*/bar"], "foo/x/bar", false));
        assert!(ex(&["- foo/*/bar"], "q/foo/x/bar", false));
        assert!(!ex(&["- foo/*/bar"], "foo/x/y/bar", false));
        assert!(ex(&["- b/*.c"], "a/b/x.c", false));
        assert!(!ex(&["- b/*.c"], "a/b/c/x.c", false));
        assert!(!ex(&["- a/*"], "x", false));
    }

    #[test]
    fn double_star() {
        assert!(ex(&["- /foo/**/bar"], "foo/x/bar", false));
        assert!(ex(&["- /foo/**/bar"], "foo/x/y/bar", false));
        assert!(!ex(&["- /foo/**/bar"], "foo/bar", false));
        assert!(ex(&["- **/bar"], "bar", false));
        assert!(ex(&["- **/bar"], "a/b/bar", false));
        assert!(ex(&["- foo/**"], "x/foo/a/b", false));
        assert!(!ex(&["- foo/**"], "foo", true));
        assert!(ex(&["- **.o"], "a/b.o", false));
        // `**` with no slash still matches the full path.
        assert!(ex(&["- a**z"], "a/b/z", false));
    }

    #[test]
    fn triple_star() {
        assert!(ex(&["- dir/***"], "dir", true));
        assert!(ex(&["- dir/***"], "dir/a", false));
        assert!(ex(&["- dir/***"], "dir/a/b", true));
        assert!(!ex(&["- dir/***"], "dir", false));
        assert!(ex(&["- /dir/***"], "dir/x", false));
        assert!(!ex(&["- /dir/***"], "a/dir/x", false));
    }

    #[test]
    fn single_chars_and_classes() {
        assert!(ex(&["- ?.c"], "a.c", false));
        assert!(!ex(&["- ?.c"], "ab.c", false));
        assert!(!ex(&["- a?b"], "a/b", false));
        assert!(ex(&["- [ab].c"], "b.c", false));
        assert!(!ex(&["- [ab].c"], "c.c", false));
        assert!(ex(&["- [!ab].c"], "c.c", false));
        assert!(ex(&["- [^ab].c"], "c.c", false));
        assert!(ex(&["- [a-c]x"], "bx", false));
        assert!(!ex(&["- [a-c]x"], "dx", false));
        assert!(ex(&["- [[:digit:]]*"], "1abc", false));
        assert!(!ex(&["- [[:digit:]]*"], "abc", false));
        assert!(ex(&["- []]"], "]", false));
        assert!(ex(&["- [a-]"], "-", false));
    }

    #[test]
    fn backslashes() {
        // With a wildcard, a backslash escapes.
        assert!(ex(&["- \\**"], "*x", false));
        assert!(!ex(&["- \\**"], "x", false));
        // Without one, it is literal.
        assert!(ex(&["- foo\\bar"], "foo\\bar", false));
        assert!(!ex(&["- foo\\bar"], "foobar", false));
    }

    #[test]
    fn first_match_wins() {
        let r = rules(&["+ */", "+ *.c", "- *"]);
        assert!(!r.is_excluded("x", true));
        assert!(!r.is_excluded("x/a.c", false));
        assert!(r.is_excluded("x/a.h", false));
        let r = rules(&["+ foo/", "+ foo/bar.c", "- *"]);
        assert!(!r.is_excluded("foo", true));
        assert!(!r.is_excluded("foo/bar.c", false));
        assert!(r.is_excluded("foo/baz.c", false));
        assert!(r.is_excluded("other", true));
        let r = rules(&["- *.c", "+ a.c"]);
        assert!(r.is_excluded("a.c", false));
    }

    #[test]
    fn root_never_excluded() {
        assert!(!ex(&["- *"], ".", true));
        assert!(!ex(&["- /."], ".", true));
        assert!(ex(&["- *"], "a", true));
    }

    #[test]
    fn negated_rules() {
        // `-! */`: exclude all non-directories.
        let r = rules(&["-! */"]);
        assert!(r.is_excluded("a", false));
        assert!(!r.is_excluded("a", true));
    }

    #[test]
    fn rule_syntax() {
        let mut r = Rules::default();
        r.filter("exclude *.o").unwrap();
        r.filter("include keep").unwrap();
        r.filter("-_*.tmp").unwrap();
        r.filter("+,! x").unwrap();
        assert!(r.is_excluded("a.o", false));
        assert!(r.is_excluded("a.tmp", false));
        // `+,! x`: everything not named x is included from here on.
        assert!(!r.is_excluded("zz", false));
        // Spaces after the separator are part of the pattern.
        let r = rules(&["-  a"]);
        assert!(r.is_excluded(" a", false));
        assert!(!r.is_excluded("a", false));
        // `!` clears.
        let r = rules(&["- *", "!"]);
        assert!(!r.is_excluded("a", false));
    }

    #[test]
    fn unsupported_rules_are_refused_by_name() {
        for rule in [
            ":- .gitignore",
            ". rules",
            "dir-merge .x",
            "merge f",
            "P foo",
            "H foo",
            "S foo",
            "R foo",
            "protect foo",
            "hide foo",
            "-/ /etc/passwd",
            "-s foo",
            "+r foo",
            "-p foo",
            "-C",
        ] {
            let e = Rules::default().filter(rule).unwrap_err();
            assert!(e.0.contains(&format!("'{rule}'")), "{rule}: {e}");
        }
        let e = Rules::default().filter(":- .gitignore").unwrap_err();
        assert_eq!(
            e.0,
            "filter rule ':- .gitignore' is not supported by cs rsync"
        );
        assert!(Rules::default().filter("-").is_err());
        assert!(Rules::default().filter("-q foo").is_err());
    }

    #[test]
    fn exclude_from_files() {
        let mut r = Rules::default();
        r.exclude_from("# comment\n; other\n\n+ keep.o\n- drop\n*.o\r\nplain\n");
        assert!(!r.is_excluded("keep.o", false));
        assert!(r.is_excluded("a.o", false));
        assert!(r.is_excluded("drop", false));
        assert!(r.is_excluded("plain", false));
        let mut r = Rules::default();
        r.exclude_from("*.o\n!\nx\n");
        assert!(!r.is_excluded("a.o", false));
        assert!(r.is_excluded("x", false));
        let mut r = Rules::default();
        r.include_from("a\n- b\n");
        r.exclude("*");
        assert!(!r.is_excluded("a", false));
        assert!(r.is_excluded("b", false));
        assert!(r.is_excluded("c", false));
    }
}
