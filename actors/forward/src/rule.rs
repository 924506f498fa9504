//! Forwarding rules as the user writes them.
//!
//! `-L [BIND:]LOCAL:[HOST:]REMOTE` listens on the laptop and connects in the workspace;
//! `-R [BIND:]REMOTE:[HOST:]LOCAL` listens in the workspace and connects on the laptop. Each
//! end is a TCP port (the listening end) or `HOST:PORT` (the connecting end), or a Unix
//! socket's path (any part that starts with `/`; it cannot contain a colon). As in OpenSSH, two parts are
//! `LISTEN:TARGET`, three are `LISTEN:HOST:PORT`, four are `BIND:LISTEN:HOST:PORT`; IPv6
//! addresses go in brackets. Listening ends bind 127.0.0.1 unless a bind address is given.

use cs_protocol::forward::Endpoint;

/// Where a listening end binds when the rule names no address.
pub const BIND_DEFAULT: &str = "127.0.0.1";
/// Where a connecting end connects when the rule names only a port.
pub const HOST_DEFAULT: &str = "127.0.0.1";
/// The longest path a Unix socket may have (`sun_path` holds 108 bytes with its NUL).
pub const UNIX_PATH_BYTES_MAX: usize = 107;

/// One forward: listen at `listen`, carry each connection to `target` on the other side.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    pub listen: Endpoint,
    pub target: Endpoint,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.listen, self.target)
    }
}

/// A rule that cannot be parsed; the message names it and shows the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad forwarding rule '{rule}': {why}; expected {form}")]
pub struct RuleError {
    pub rule: String,
    pub why: String,
    pub form: &'static str,
}

const LOCAL_FORM: &str = "-L [BIND:]LOCAL:[HOST:]REMOTE, e.g. -L 8080:8080, -L 5432:db:5432 or -L /tmp/l.sock:/run/r.sock";
const REMOTE_FORM: &str =
    "-R [BIND:]REMOTE:[HOST:]LOCAL, e.g. -R 9000:9000 or -R 9000:localhost:3000";

/// Parses a `-L` rule: `listen` is on the laptop, `target` in the workspace.
pub fn parse_local(s: &str) -> Result<Rule, RuleError> {
    parse(s, LOCAL_FORM)
}

/// Parses a `-R` rule: `listen` is in the workspace, `target` on the laptop.
pub fn parse_remote(s: &str) -> Result<Rule, RuleError> {
    parse(s, REMOTE_FORM)
}

/// Splits on `:` outside brackets (so a socket path cannot contain a colon).
fn split(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut bracketed = false;
    for c in s.chars() {
        match c {
            '[' if cur.is_empty() && !bracketed => {
                bracketed = true;
                cur.push(c);
            }
            ']' if bracketed => {
                bracketed = false;
                cur.push(c);
            }
            ':' if !bracketed => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if bracketed {
        return Err("an unclosed '['".into());
    }
    parts.push(cur);
    Ok(parts)
}

fn unbracket(h: &str) -> &str {
    h.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h)
}

fn port(p: &str, what: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) => Err(format!("{what} port 0 is not a port")),
        Ok(n) => Ok(n),
        Err(_) if p.is_empty() => Err(format!("the {what} port is missing")),
        Err(_) => Err(format!("'{p}' is not a {what} port (1-65535)")),
    }
}

fn host(h: &str, what: &str) -> Result<String, String> {
    let h = unbracket(h);
    if h.is_empty() {
        return Err(format!("the {what} host is empty"));
    }
    if h.chars()
        .any(|c| c.is_whitespace() || c == '/' || c == '[' || c == ']')
    {
        return Err(format!("'{h}' is not a {what} host"));
    }
    Ok(h.to_string())
}

fn unix(p: &str) -> Result<Endpoint, String> {
    if p.len() > UNIX_PATH_BYTES_MAX {
        return Err(format!(
            "the socket path '{p}' is {} bytes, more than the {UNIX_PATH_BYTES_MAX} a Unix socket allows",
            p.len()
        ));
    }
    Ok(Endpoint::Unix {
        path: p.to_string(),
    })
}

fn parse(s: &str, form: &'static str) -> Result<Rule, RuleError> {
    let err = |why: String| RuleError {
        rule: s.to_string(),
        why,
        form,
    };
    let parts = split(s).map_err(err)?;
    let is_path = |p: &String| p.starts_with('/');
    let listen_at = |bind: &str, p: &String| -> Result<Endpoint, String> {
        if is_path(p) {
            if bind != BIND_DEFAULT {
                return Err(format!(
                    "a bind address ('{bind}') makes no sense with the socket path '{p}'"
                ));
            }
            unix(p)
        } else {
            Ok(Endpoint::Tcp {
                host: host(bind, "bind")?,
                port: port(p, "listening")?,
            })
        }
    };
    let (listen, target) = match parts.as_slice() {
        [l, t] if is_path(t) => (listen_at(BIND_DEFAULT, l), unix(t)),
        [l, t] => (
            listen_at(BIND_DEFAULT, l),
            port(t, "target").map(|port| Endpoint::Tcp {
                host: HOST_DEFAULT.to_string(),
                port,
            }),
        ),
        [b, l, t] if is_path(t) => (listen_at(b, l), unix(t)),
        [l, h, p] => (
            listen_at(BIND_DEFAULT, l),
            host(h, "target").and_then(|host| {
                Ok(Endpoint::Tcp {
                    host,
                    port: port(p, "target")?,
                })
            }),
        ),
        [b, l, h, p] => (
            listen_at(b, l),
            host(h, "target").and_then(|host| {
                Ok(Endpoint::Tcp {
                    host,
                    port: port(p, "target")?,
                })
            }),
        ),
        [_] => return Err(err("it has one part, a forward needs at least two".into())),
        _ => return Err(err(format!("it has {} parts", parts.len()))),
    };
    Ok(Rule {
        listen: listen.map_err(err)?,
        target: target.map_err(err)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(h: &str, p: u16) -> Endpoint {
        Endpoint::Tcp {
            host: h.into(),
            port: p,
        }
    }
    fn path(p: &str) -> Endpoint {
        Endpoint::Unix { path: p.into() }
    }

    #[test]
    fn the_forms_people_write() {
        let cases = [
            ("1234:1234", tcp("127.0.0.1", 1234), tcp("127.0.0.1", 1234)),
            ("8080:web:80", tcp("127.0.0.1", 8080), tcp("web", 80)),
            (
                "0.0.0.0:8080:localhost:80",
                tcp("0.0.0.0", 8080),
                tcp("localhost", 80),
            ),
            ("[::1]:8080:[::1]:80", tcp("::1", 8080), tcp("::1", 80)),
            (
                "9000:[fe80::1]:80",
                tcp("127.0.0.1", 9000),
                tcp("fe80::1", 80),
            ),
            (
                "/tmp/local.sock:/run/remote.sock",
                path("/tmp/local.sock"),
                path("/run/remote.sock"),
            ),
            (
                "5432:/var/run/postgresql/.s.PGSQL.5432",
                tcp("127.0.0.1", 5432),
                path("/var/run/postgresql/.s.PGSQL.5432"),
            ),
            (
                "/tmp/pg.sock:5432",
                path("/tmp/pg.sock"),
                tcp("127.0.0.1", 5432),
            ),
            (
                "/tmp/pg.sock:db:5432",
                path("/tmp/pg.sock"),
                tcp("db", 5432),
            ),
            (
                "127.0.0.2:7000:/run/x.sock",
                tcp("127.0.0.2", 7000),
                path("/run/x.sock"),
            ),
        ];
        for (s, listen, target) in cases {
            assert_eq!(parse_local(s), Ok(Rule { listen, target }), "{s}");
        }
    }

    #[test]
    fn bad_rules_name_the_value_and_show_the_form() {
        for (s, says) in [
            ("8080", "one part"),
            ("abc:80", "'abc' is not a listening port"),
            ("80:70000", "'70000' is not a target port"),
            ("0:80", "port 0"),
            ("8080:", "the target port is missing"),
            ("a:b:c:d:e", "5 parts"),
            ("[::1:80:80", "unclosed"),
            ("8080:bad host:80", "'bad host' is not a target host"),
        ] {
            let e = parse_local(s).unwrap_err().to_string();
            assert!(e.contains(s), "{e}");
            assert!(e.contains(says), "{s}: {e}");
            assert!(e.contains("expected -L [BIND:]LOCAL:[HOST:]REMOTE"), "{e}");
        }
        let e = parse_remote("x").unwrap_err().to_string();
        assert!(e.contains("expected -R"), "{e}");
        let long = format!("/{}:80", "a".repeat(200));
        assert!(parse_local(&long)
            .unwrap_err()
            .to_string()
            .contains("more than the 107"));
    }

    proptest::proptest! {
        #[test]
        fn ports_round_trip(l in 1u16.., r in 1u16..) {
            let rule = parse_local(&format!("{l}:{r}")).unwrap();
            proptest::prop_assert_eq!(rule.listen, tcp(BIND_DEFAULT, l));
            proptest::prop_assert_eq!(rule.target, tcp(HOST_DEFAULT, r));
        }

        #[test]
        fn never_panics(s in "[0-9a-z:/\\[\\]. ]{0,40}") {
            let _ = parse_local(&s);
        }
    }
}
